"""Image bytes to model input: decoding with validation, then torchvision preprocessing."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from app.errors import InvalidImage, TooLarge

# The formats the API accepts. Pillow's other readers are never tried: some (ICO, ICNS) decode an
# embedded image while opening, before any size can be checked.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")

# Magic numbers of formats Pillow reads but we refuse, to name them in the refusal.
REFUSED_SIGNATURES = {b"\x00\x00\x01\x00": "ICO", b"icns": "ICNS", b"\x01\xda": "SGI", b"Image type": "PIL IM"}

# torchvision's ImageNet statistics, which its pretrained classifiers expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def limit_pillow(max_pixels: int) -> None:
    """Set Pillow's own bomb check (process-wide) to our pixel limit: it also guards what open_image
    never sees, such as the frames of an animated GIF or a multi-page TIFF. Pillow refuses at twice
    MAX_IMAGE_PIXELS and warns above it."""
    Image.MAX_IMAGE_PIXELS = max(1, max_pixels // 2)


def open_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Read an image's header only, refusing empty files, formats not in FORMATS and oversized images."""
    if not data:
        raise InvalidImage(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"{name}: over the pixel limit ({exc})") from None
    except UnidentifiedImageError:
        kind = next((f"{k} file, " for magic, k in REFUSED_SIGNATURES.items() if data.startswith(magic)), "")
        raise InvalidImage(f"{name}: {kind}not an image in a format we read (PNG, JPEG, GIF, BMP, WebP, TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"{name}: not a readable image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} pixels")
    return image


def decode_image(data: bytes, max_pixels: int, name: str = "image", draft_size: int | None = None) -> Image.Image:
    """Decode and fully load an image, refusing empty, truncated, unreadable or oversized files.

    With draft_size, a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) whose
    sides stay at or above draft_size: a 12-megapixel photo meant for a 256-pixel resize costs
    a fraction of a full decode.
    """
    image = open_image(data, max_pixels, name)
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"{name}: not a readable image ({exc})") from None
    return image


def check_pixel_budget(images: Sequence[tuple[str, bytes]], max_pixels: int, budget: int) -> None:
    """Refuse a request whose images hold more pixels together than the budget, from their headers alone."""
    total = 0
    for name, data in images:
        width, height = open_image(data, max_pixels, name).size
        total += width * height
        if total > budget:
            raise TooLarge(f"the images of this request hold over {budget} pixels together (at {name}); send fewer or smaller")


def resize_side(image_size: int) -> int:
    """The shorter side an image is resized to before the centre crop."""
    return round(image_size * 256 / 224)


@lru_cache
def pixel_transform(image_size: int) -> T.Compose:
    """Resize, centre-crop and convert to uint8 CHW, as torchvision's classification references do."""
    return T.Compose(
        [
            T.Resize(resize_side(image_size), antialias=True),
            T.CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


def to_pixels(image: Image.Image, transform: T.Compose) -> torch.Tensor:
    """A decoded image as a uint8 (3, S, S) tensor; grayscale and palette images become RGB."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return transform(image)


def image_to_pixels(data: bytes, image_size: int, max_pixels: int, name: str = "image") -> torch.Tensor:
    """Image bytes as model pixels: the one decode and preprocessing path of serving, training and the benchmarks."""
    image = decode_image(data, max_pixels, name, draft_size=resize_side(image_size))
    return to_pixels(image, pixel_transform(image_size))


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, S, S) pixels to the normalised float input of the model, on pixels' device."""
    mean = torch.tensor(MEAN, device=pixels.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels.device, dtype=dtype).view(1, 3, 1, 1)
    return (pixels.to(dtype) / 255 - mean) / std


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels onto the device: pinned and asynchronous on CUDA."""
    if device.type == "cuda":
        return pixels.pin_memory().to(device, non_blocking=True)
    return pixels


def to_model_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels onto the device, normalised there (channels-last on CUDA)."""
    if device.type == "cuda":
        return normalize(to_device(pixels, device)).contiguous(memory_format=torch.channels_last)
    return normalize(pixels)
