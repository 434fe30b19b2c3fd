"""The one preprocessing path: every mode to RGB, every kind of bad file to a reason."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from emotion_ray.images import ALPHA_BACKGROUND, decode_image, has_image_extension, pixels_from_arrow, pixels_to_arrow

pytestmark = pytest.mark.fast


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (40, 30), (10, 200, 30)),
        lambda: Image.new("L", (40, 30), 128),
        lambda: Image.new("1", (40, 30), 1),
        lambda: Image.new("RGB", (40, 30), (10, 200, 30)).convert("P"),
        lambda: Image.new("RGBA", (40, 30), (10, 200, 30, 255)),
        lambda: Image.new("LA", (40, 30), (128, 255)),
        lambda: Image.new("CMYK", (40, 30), (0, 0, 0, 0)),
        lambda: Image.new("I;16", (40, 30), 30000),
        lambda: Image.new("I", (40, 30), 30000),
    ],
    ids=["RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I"],
)
def test_every_mode_becomes_rgb_of_the_target_size(make):
    img = make()
    fmt = "TIFF" if img.mode in ("CMYK", "I") else "PNG"
    decoded = decode_image(encode(img, fmt), 16)
    assert decoded.error is None, decoded.error
    assert decoded.pixels.shape == (16, 16, 3) and decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height) == (40, 30)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    decoded = decode_image(encode(Image.new("I;16", (8, 8), 30000)), 8)
    assert decoded.pixels[0, 0].tolist() == [round(30000 / 257)] * 3


def test_transparency_is_composited_on_the_documented_background():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    decoded = decode_image(encode(img), 8)
    assert decoded.pixels[0, 0].tolist() == list(ALPHA_BACKGROUND)
    half = decode_image(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128))), 8)
    assert 120 <= half.pixels[0, 0, 0] <= 135


def test_palette_transparency_is_composited():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    decoded = decode_image(encode(img, transparency=0), 8)
    assert decoded.pixels[0, 0].tolist() == list(ALPHA_BACKGROUND)


def test_channels_are_rgb_not_bgr():
    decoded = decode_image(encode(Image.new("RGB", (8, 8), (250, 5, 5))), 8)
    assert decoded.pixels[..., 0].min() > 200 and decoded.pixels[..., 2].max() < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif, quality=95), 20)
    assert (decoded.width, decoded.height) == (20, 40)  # the displayed size, as a viewer shows it
    # After rotating clockwise, the white left half is on top.
    assert decoded.pixels[:5].mean() > 200 and decoded.pixels[-5:].mean() < 60


def test_large_jpeg_uses_draft_mode_and_still_matches_closely():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((1024, 1024))
    data = encode(base, "JPEG", quality=90)
    decoded = decode_image(data, 64)
    exact = np.asarray(base.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int16)
    assert decoded.error is None
    assert np.abs(decoded.pixels.astype(np.int16) - exact).mean() < 12


def test_empty_file():
    assert decode_image(b"", 8).error.startswith("empty")


def test_not_an_image():
    assert decode_image(b"hello, I am text", 8).error.startswith("not_an_image")


def test_truncated_jpeg():
    data = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")
    assert decode_image(data[: len(data) // 2], 8).error.startswith("truncated")


def test_decompression_bomb_is_refused_from_the_header():
    data = encode(Image.new("L", (3000, 3000), 0))
    decoded = decode_image(data, 8, max_pixels=1_000_000)
    assert decoded.error.startswith("too_large") and decoded.width == 3000


def test_oversized_file_is_refused():
    data = encode(Image.new("RGB", (50, 50), 0))
    assert decode_image(data, 8, max_file_bytes=10).error.startswith("too_large")


def test_gif_and_webp_and_bmp_decode():
    for fmt in ("GIF", "WEBP", "BMP"):
        assert decode_image(encode(Image.new("RGB", (20, 20), (9, 9, 9)), fmt), 8).error is None


def test_extension_matching_is_case_insensitive():
    assert has_image_extension("a/B.JPG") and has_image_extension("x.WebP")
    assert not has_image_extension("notes.txt") and not has_image_extension("jpg")


def test_pixels_round_trip_through_arrow_with_failed_rows():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), None,
              rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), None]
    column = pixels_to_arrow(images)
    assert column.null_count == 2 and len(column) == 4
    assert column[0].as_py() == images[0].tobytes() and column[2].as_py() == images[2].tobytes()
    back = pixels_from_arrow(pa.chunked_array([column.slice(0, 1), column.slice(1)]), 8)
    np.testing.assert_array_equal(back, np.stack([images[0], images[2]]))
    np.testing.assert_array_equal(pixels_from_arrow(column.slice(2), 8), images[2][None])  # offset slice
    assert pixels_from_arrow(pixels_to_arrow([None]), 8).shape == (0, 8, 8, 3)


def test_grey_images_resize_before_rgb_with_identical_pixels():
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90), dtype=np.uint8), "L")
    reference = np.asarray(grey.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(encode(grey, "PNG"), 32).pixels, reference)


@pytest.mark.parametrize("mode, key, colour", [("RGB", (255, 0, 255), (255, 0, 255)), ("L", 30, 30)])
def test_png_colour_key_transparency_is_composited_like_alpha(mode, key, colour):
    img = Image.new(mode, (8, 8), colour)
    decoded = decode_image(encode(img, "PNG", transparency=key), 8)
    assert decoded.error is None and (decoded.pixels == 255).all()  # the keyed colour is the background


def test_a_cut_webp_is_truncated_like_jpeg_and_png():
    data = encode(Image.new("RGB", (64, 64), (10, 120, 200)), "WEBP")
    reasons = {decode_image(data[: len(data) // 2], 8).error.split(":")[0]}
    for fmt in ("JPEG", "PNG"):
        whole = encode(Image.effect_noise((64, 64), 60).convert("RGB"), fmt)
        reasons.add(decode_image(whole[: len(whole) // 2], 8).error.split(":")[0])
    assert reasons == {"truncated"}
