import io

import pytest
from PIL import Image

from app.errors import InvalidImage
from app.images import decode_image, normalize, pixel_transform, to_pixels

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
