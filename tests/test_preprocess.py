"""A user's image becomes the digit MNIST's normalisation would have made of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import on_paper
from mnist_cnn.checkpoints import open_model
from mnist_cnn.data import scale
from mnist_cnn.preprocess import ImageError, center_of_mass, open_image, preprocess, preprocess_file


@pytest.fixture(scope="module")
def seven(mnist) -> np.ndarray:
    return mnist["test"][0][0]  # the first test digit, a 7


def transparent(digit: np.ndarray, *, color=(20, 20, 60), canvas=(300, 260), at=(90, 20), size=140) -> Image.Image:
    """A drawing app's export: coloured strokes on a fully transparent background."""
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC))
    rgba = np.zeros((canvas[1], canvas[0], 4), np.uint8)
    rgba[..., :3] = color
    rgba[at[1]:at[1] + size, at[0]:at[0] + size, 3] = big
    return Image.fromarray(rgba, "RGBA")


def jpeg(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_output_is_mnist_like_box_and_centre_of_mass(seven):
    digit = preprocess(on_paper(seven))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    rows, cols = np.nonzero(digit > 0.2 * 255)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 in (20, 21)
    row, col = center_of_mass(digit.astype(np.float64))
    assert abs(row - 14) <= 1 and abs(col - 14) <= 1
    assert digit.max() == 255 and digit[0].max() == 0  # white on black, clean border


def test_polarity_and_transparency_give_the_same_digit(seven):
    reference = preprocess(on_paper(seven)).astype(int)
    variants = {
        "light on dark": Image.fromarray(255 - np.asarray(on_paper(seven))),
        "rgba dark strokes": transparent(seven),
        "rgba white strokes": transparent(seven, color=(255, 255, 255)),
        "palette": on_paper(seven).convert("P"),
        "cmyk": on_paper(seven).convert("CMYK"),
        "16-bit": Image.fromarray(np.asarray(on_paper(seven)).astype(np.uint16) * 257),
    }
    for name, image in variants.items():
        digit = preprocess(image).astype(int)
        overlap = np.minimum(digit, reference).sum() / np.maximum(digit, reference).sum()
        assert overlap > 0.8, (name, overlap)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_common_format_reads(tmp_path, seven, fmt):
    """Each format gives the digit the picture itself gives (the test above checks that one):
    the lossless formats exactly, JPEG and WebP (lossy at their default quality) within their
    compression noise (measured 2026-12-01: mean 1.3 and 1.9 grey levels off, centre of mass
    0.09 px away, overlap 0.94 and 0.92)."""
    image = on_paper(seven)
    path = tmp_path / f"digit.{fmt.lower()}"
    image.save(path, fmt, **({"save_all": True, "append_images": [Image.new("L", image.size, 255)]}
                             if fmt == "GIF" else {}))  # a 2-frame GIF: the first frame counts
    digit, reference = preprocess_file(path).astype(int), preprocess(image).astype(int)
    if fmt not in ("JPEG", "WEBP"):
        assert np.array_equal(digit, reference)
        return
    assert np.abs(digit - reference).mean() <= 4
    shift = np.subtract(center_of_mass(digit.astype(np.float64)), center_of_mass(reference.astype(np.float64)))
    assert np.abs(shift).max() <= 0.25
    assert np.minimum(digit, reference).sum() / np.maximum(digit, reference).sum() >= 0.88


def test_no_ink_is_an_error_not_a_guess(tmp_path):
    for image in (Image.new("L", (64, 64), 255), Image.new("RGBA", (64, 64), (0, 0, 0, 0)),
                  Image.fromarray(np.full((50, 50), 128, np.uint8))):
        with pytest.raises(ImageError, match="no digit found"):
            preprocess(image)


def test_broken_missing_and_huge_images_are_refused(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageError, match="broken.png: not an image mnist-cnn reads"):
        open_image(broken)
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    Image.effect_noise((300, 300), 60).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[:2000])
    with pytest.raises(ImageError, match="truncated.jpg: broken image"):
        open_image(truncated)
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "nope.png")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 megapixels, a few kB on disk
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageError, match="over the limit"):
        open_image(bomb)
    small = tmp_path / "small.png"
    Image.new("L", (100, 100)).save(small)
    with pytest.raises(ImageError, match="100x100 pixels is over the limit of 9,999"):
        open_image(small, max_pixels=9_999)


def test_user_style_images_keep_the_models_accuracy(mnist, mnist_model):
    """On test digits made to look like users' files, accuracy stays within 2 points of the
    accuracy on the clean MNIST images."""
    model = open_model(mnist_model).model
    images, labels = mnist["test"][0][:400], mnist["test"][1][:400].astype(np.int64)
    rng = np.random.default_rng(0)

    def accuracy(digits: np.ndarray) -> float:
        with torch.inference_mode():
            predicted = model(scale(torch.from_numpy(digits)[:, None])).argmax(1).numpy()
        return float((predicted == labels).mean())

    clean = accuracy(images)
    makers = {
        "paper, large canvas, off-centre": lambda d, i: on_paper(
            d, at=(int(rng.integers(0, 250)), int(rng.integers(0, 130))), rng=rng),
        "rgba, transparent background": lambda d, i: transparent(d),
        "jpeg of a scan": lambda d, i: jpeg(on_paper(d, size=int(rng.integers(60, 200)), rng=rng)),
        "small and thick, light on dark": lambda d, i: Image.fromarray(d).resize((40, 52)),
    }
    for name, make in makers.items():
        user = np.stack([preprocess(make(d, i)) for i, d in enumerate(images)])
        assert accuracy(user) >= clean - 0.02, (name, accuracy(user), clean)


# The stored pixels for each EXIF orientation, from the upright image (Pillow's transposes):
# what a phone writes when it was turned (3, 6, 8) or the picture mirrored (2, 4, 5, 7).
STORED_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


def with_orientation(image: Image.Image, orientation: int, fmt: str = "PNG", **options) -> bytes:
    exif = image.getexif()
    exif[0x0112] = orientation  # the Orientation tag
    buffer = io.BytesIO()
    image.save(buffer, fmt, exif=exif, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
def test_exif_orientation_is_applied(tmp_path, seven, orientation):
    upright = on_paper(seven)  # 420x300, the 7 off-centre: any wrong turn shows
    stored = upright.transpose(STORED_FOR_ORIENTATION[orientation])
    assert not np.array_equal(preprocess(stored), preprocess(upright))  # the turn matters
    path = tmp_path / "phone.png"
    path.write_bytes(with_orientation(stored, orientation))
    assert np.array_equal(preprocess_file(path), preprocess_file(with_orientation(upright, 1)))
    decoded = Image.open(path)
    assert decoded.size == stored.size  # Pillow alone keeps the sideways pixels
    assert np.array_equal(preprocess(decoded), preprocess(upright))  # preprocess turns them too


def test_exif_turned_jpeg_photo_reads_upright(seven):
    """A phone's JPEG turned 90°: the same digit as the upright JPEG, up to JPEG's rounding."""
    upright = on_paper(seven).convert("RGB")
    reference = preprocess_file(with_orientation(upright, 1, "JPEG", quality=95)).astype(int)
    turned = upright.transpose(Image.Transpose.ROTATE_90)
    digit = preprocess_file(with_orientation(turned, 6, "JPEG", quality=95)).astype(int)
    overlap = np.minimum(digit, reference).sum() / np.maximum(digit, reference).sum()
    assert overlap > 0.9, overlap
    ignored = preprocess_file(with_orientation(turned, 1, "JPEG", quality=95)).astype(int)
    assert np.minimum(ignored, reference).sum() / np.maximum(ignored, reference).sum() < 0.6


def test_high_percentile_is_numpys_percentile():
    from mnist_cnn.preprocess import high_percentile

    rng = np.random.default_rng(0)
    cases = [rng.random((40, 30), dtype=np.float32), np.zeros((9, 9), np.float32),
             np.ones((5, 7), np.float32), (rng.random((28, 28)) > 0.9).astype(np.float32),
             rng.integers(0, 3, (50, 50)).astype(np.float32), np.float32([[0.5]])]
    for values in cases:
        for q in (99.9, 99.0, 90.0, 50.0):
            assert high_percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-6)
