import io
import struct

import pytest
from PIL import Image

from app.errors import InvalidImage, TooLarge
from app.images import check_pixel_budget, decode_image, image_to_pixels, limit_pillow, normalize, pixel_transform, to_pixels

LIMIT = 40_000_000


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_a_good_image_decodes():
    assert decode_image(encode(Image.new("RGB", (10, 7))), LIMIT).size == (10, 7)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty file"),
        (b"this is not an image", "not an image in a format we read"),
        (encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "not a readable image"),  # truncated
    ],
)
def test_bad_bytes_are_refused_by_name(data, message):
    with pytest.raises(InvalidImage, match=f"photo.jpg: {message}"):
        decode_image(data, LIMIT, "photo.jpg")


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (8000, 6000)))  # 48 megapixels in a few kilobytes
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImage, match="8000x6000 pixels is over the limit"):
        decode_image(bomb, LIMIT, "bomb.png")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_becomes_three_channels_of_the_model_size(mode):
    image = decode_image(encode(Image.new(mode, (50, 30)), "TIFF"), LIMIT)
    pixels = to_pixels(image, pixel_transform(24))
    assert pixels.shape == (3, 24, 24)
    assert normalize(pixels[None]).shape == (1, 3, 24, 24)


def ico_holding(png: bytes) -> bytes:
    """An ICO file whose directory says 16x16 but whose one entry is this PNG (Pillow's ICO reader decodes it on open)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


@pytest.mark.parametrize(
    "data,named",
    [
        (ico_holding(encode(Image.new("1", (6000, 6000)))), "ICO file, "),  # 36 megapixels behind a 16x16 header
        (encode(Image.new("RGB", (8, 8)), "ICO"), "ICO file, "),
        (encode(Image.new("RGB", (8, 8)), "SGI"), "SGI file, "),
        (encode(Image.new("RGB", (8, 8)), "IM"), "PIL IM file, "),
        (encode(Image.new("RGB", (8, 8)), "TGA"), ""),  # TGA has no magic number to name it by
    ],
)
def test_formats_outside_the_allow_list_are_never_opened(data, named):
    with pytest.raises(InvalidImage, match=f"icon: {named}not an image in a format we read"):
        decode_image(data, LIMIT, "icon")


def test_a_jpeg_decodes_at_the_smallest_scale_the_resize_needs():
    photo = encode(Image.new("RGB", (2000, 1500), "green"), "JPEG")
    assert decode_image(photo, LIMIT).size == (2000, 1500)
    assert decode_image(photo, LIMIT, draft_size=256).size == (500, 375)  # 1/4 scale; 1/8 would be under 256
    assert image_to_pixels(photo, 224, LIMIT).shape == (3, 224, 224)


def test_a_request_over_its_pixel_budget_is_refused_from_the_headers():
    images = [(f"img{i}.png", encode(Image.new("1", (1000, 1000)))) for i in range(3)]
    check_pixel_budget(images[:2], LIMIT, budget=2_500_000)
    with pytest.raises(TooLarge, match="over 2500000 pixels together .at img2.png"):
        check_pixel_budget(images, LIMIT, budget=2_500_000)


def test_pillow_itself_refuses_images_over_the_limit_once_the_service_sets_it(monkeypatch):
    """Any Pillow reader, not only ours, refuses past the service's limit (ours: 40,000 pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    buffer = io.BytesIO()
    Image.new("RGB", (250, 250)).save(buffer, "PNG")  # 62,500 pixels
    Image.open(io.BytesIO(buffer.getvalue())).close()  # Pillow's default limit lets it through
    limit_pillow(40_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(buffer.getvalue()))
    with pytest.raises(InvalidImage, match="over the pixel limit"):
        decode_image(buffer.getvalue(), 40_000)
