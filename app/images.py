"""Image bytes to model input: decoding with validation, then torchvision preprocessing."""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from app.errors import InvalidImage

# torchvision's ImageNet statistics, which its pretrained classifiers expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode and fully load an image, refusing empty, truncated, unreadable or oversized files."""
    if not data:
        raise InvalidImage(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            # Checked from the header, before the pixels are decompressed.
            if width * height > max_pixels:
                raise InvalidImage(f"{name}: {width}x{height} pixels is over the limit of {max_pixels} pixels")
            image.load()
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"{name}: over the pixel limit ({exc})") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"{name}: not an image in a format we read (PNG, JPEG, GIF, BMP, WebP, TIFF)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"{name}: not a readable image ({exc})") from None
    return image


def pixel_transform(image_size: int) -> T.Compose:
    """Resize, centre-crop and convert to uint8 CHW, as torchvision's classification references do."""
    return T.Compose(
        [
            T.Resize(round(image_size * 256 / 224), antialias=True),
            T.CenterCrop(image_size),
            T.PILToTensor(),
        ]
    )


def to_pixels(image: Image.Image, transform: T.Compose) -> torch.Tensor:
    """A decoded image as a uint8 (3, S, S) tensor; grayscale and palette images become RGB."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return transform(image)


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, S, S) pixels to the normalised float input of the model, on pixels' device."""
    mean = torch.tensor(MEAN, device=pixels.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels.device, dtype=dtype).view(1, 3, 1, 1)
    return (pixels.to(dtype) / 255 - mean) / std


def to_model_input(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels onto the device (pinned and asynchronous on CUDA), normalised there."""
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
        return normalize(pixels).contiguous(memory_format=torch.channels_last)
    return normalize(pixels)
