"""Property-based tests: whatever bytes a user's file holds, the IDX reader and the image
preprocessing give a result or the project's own error — never another exception, a hang or
unbounded memory."""

from __future__ import annotations

import gzip
import io
import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from mnist_cnn.idx import (
    IMAGE_MAGIC,
    IMAGE_SIZE,
    INT_LABEL_MAGIC,
    LABEL_MAGIC,
    DataError,
    parse_idx,
    parse_images,
    parse_labels,
    read_bytes,
)
from mnist_cnn.preprocess import ImageError, preprocess, preprocess_file

# Failures found so far are pinned below with @example. (.hypothesis/ ignores itself in git.)
FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=5000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MAGICS = [IMAGE_MAGIC, LABEL_MAGIC, INT_LABEL_MAGIC, 0x0803, 0x0D01, 0x0800, 0x08FF, 0]
counter = itertools.count()


@st.composite
def idx_like(draw) -> bytes:
    """Bytes shaped like an IDX file: a plausible magic, dimensions from 0 to 2^32-1 (up to
    70 of them, some that multiply past 2^64), and a payload of about the size the header
    claims."""
    magic = draw(st.sampled_from(MAGICS) | st.integers(0, 2**32 - 1))
    ndim = min(magic & 0xFF, 70)
    dims = draw(st.lists(st.sampled_from([0, 1, 2, IMAGE_SIZE, 2**31, 2**32 - 1])
                         | st.integers(0, 2**32 - 1), min_size=ndim, max_size=ndim))
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    claimed = math.prod(dims) * (4 if (magic >> 8) & 0xFF == 0x0C else 1)
    exact = bytes(claimed) if claimed <= 50_000 else b""
    payload = draw(st.sampled_from([exact, exact[:-1], exact + b"\0"]) | st.binary(max_size=8))
    return draw(st.sampled_from([header + payload, header[:draw(st.integers(0, len(header)))]]))


def parse_all(data: bytes) -> None:
    for parse in (parse_idx, parse_images, parse_labels,
                  lambda d, source: parse_labels(d, source=source, column=1)):
        try:
            array = parse(data, source="fuzz")
        except DataError as error:
            assert "\n" not in str(error) and str(error).startswith("fuzz: ")
            continue
        assert isinstance(array, np.ndarray)



@FAST
@given(st.binary(max_size=2000) | idx_like())
@example(bytes.fromhex("00000803" "80000000" "80000000" "00000004"))  # 2^31·2^31·4 wraps to 0
@example(bytes.fromhex("00000841") + bytes.fromhex("00000001") * 65 + b"\0")  # 65 dimensions
def test_idx_parsers_return_an_array_or_a_data_error(data):
    parse_all(data)


@FAST
@given(idx_like(), st.integers(0, 5))
def test_idx_labels_column_any_header(data, column):
    try:
        labels = parse_labels(data, source="fuzz", column=column)
    except DataError:
        return
    assert labels.ndim == 1 and (labels.size == 0 or 0 <= labels.min() <= labels.max() < 10)


def valid_idx(rng: np.random.Generator, images: bool) -> bytes:
    count = int(rng.integers(0, 4))
    shape = (count, IMAGE_SIZE, IMAGE_SIZE) if images else (count,)
    array = rng.integers(0, 10, size=shape, dtype=np.uint8)
    magic = IMAGE_MAGIC if images else LABEL_MAGIC
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape) + array.tobytes()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid file with a few bytes overwritten, inserted or cut off."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


IDX_SEEDS = [valid_idx(np.random.default_rng(seed), images=seed % 2 == 0) for seed in range(6)]
GZIP_SEEDS = [gzip.compress(seed, mtime=0) for seed in IDX_SEEDS]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@SLOW
@given(st.binary(max_size=300) | mutated(IDX_SEEDS) | mutated(GZIP_SEEDS)
       | mutated(GZIP_SEEDS).map(lambda d: gzip.compress(d, mtime=0)))
def test_read_bytes_of_any_file_raw_or_gzip(folder, data):
    path = folder / f"{next(counter)}.idx"
    path.write_bytes(data)
    try:
        content = read_bytes(path)
    except DataError as error:
        assert "\n" not in str(error) and str(error).startswith(str(path))
        return
    finally:
        path.unlink()
    assert isinstance(content, bytes)
    if data[:2] != b"\x1f\x8b":
        assert content == data
    parse_all(content)


@SLOW
@given(st.integers(0, 3 << 20), st.sampled_from([1, 6, 9]), st.integers(1, 2))
def test_gzip_bombs_stop_at_the_cap(folder, size, level, members):
    """Zeros compress ~1000:1: the cap holds for the decompressed bytes, not the file's."""
    path = folder / f"{next(counter)}.gz"
    path.write_bytes(gzip.compress(bytes(size), compresslevel=level, mtime=0) * members)
    cap = 1 << 20
    try:
        content = read_bytes(path, max_bytes=cap)
    except DataError as error:
        assert size * members > cap and "decompresses to more than 1,048,576 bytes" in str(error)
        return
    finally:
        path.unlink()
    assert size * members <= cap and content == bytes(size * members)


SEED_KINDS = [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("1", "PNG"),
              ("LA", "PNG"), ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"),
              ("P", "GIF"), ("RGB", "BMP"), ("F", "TIFF"), ("LAB", "TIFF"),
              ("CMYK", "TIFF"), ("RGB", "WEBP"), ("L", "PPM"), ("RGB", "DDS"),
              ("RGB", "TGA"), ("L", "ICO"), ("L", "PCX"), ("RGBA", "QOI"), ("L", "IM")]
# Pillow reads these too, but open_image tries only its allowlist (no other plugin sees the bytes).
REFUSED_FORMATS = {"DDS", "TGA", "ICO", "PCX", "QOI", "IM"}


def image_seeds() -> list[bytes]:
    """Small valid images in the formats users send, several modes each."""
    array = np.zeros((24, 18), np.uint8)
    array[4:20, 6:11] = 220
    base = Image.fromarray(array)
    seeds = []
    for mode, fmt in SEED_KINDS:
        buffer = io.BytesIO()
        image = Image.fromarray(array.astype(np.uint16) * 257) if mode == "I;16" else base.convert(mode)
        if fmt == "PNG" and mode == "L":  # with an EXIF orientation, which the reader applies
            exif = image.getexif()
            exif[0x0112] = 6
            image.save(buffer, fmt, exif=exif)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # IM, until Pillow 15
                image.save(buffer, fmt)
        seeds.append(buffer.getvalue())
    return seeds


IMAGE_SEEDS = image_seeds()
IM_DEPRECATED = "ignore:IM image format is deprecated:DeprecationWarning"


def check_image(data: bytes, **options) -> None:
    try:
        digit = preprocess_file(data, **options)
    except ImageError as error:
        assert "\n" not in str(error) and str(error).startswith("image: ")
        return
    assert digit.shape == (IMAGE_SIZE, IMAGE_SIZE) and digit.dtype == np.uint8


@pytest.mark.parametrize("index", range(len(IMAGE_SEEDS)))
@pytest.mark.filterwarnings(IM_DEPRECATED)
def test_every_seed_image_preprocesses(index):
    if SEED_KINDS[index][1] in REFUSED_FORMATS:
        with pytest.raises(ImageError, match=r"^image: (not an image mnist-cnn reads|ICO files are "
                                             r"not supported) \(send PNG, JPEG, .*\)$"):
            preprocess_file(IMAGE_SEEDS[index])
        return
    digit = preprocess_file(IMAGE_SEEDS[index])
    assert digit.max() > 100


@FAST
@given(st.binary(max_size=3000))
def test_preprocess_any_bytes(data):
    check_image(data)


def dds_of_unknown_pixel_format() -> bytes:
    """Found by fuzzing: Pillow raises NotImplementedError for it."""
    data = bytearray(next(seed for seed in IMAGE_SEEDS if seed[:4] == b"DDS "))
    data[80:84] = bytes(4)  # the pixel format's flags
    return bytes(data)


# Found by fuzzing: a TIFF whose strip offset tag holds text; Pillow raises TypeError.
TIFF_OF_A_STRING_OFFSET = bytes.fromhex(
    "49492a0026000000f3c7f0447f1e111d61043c7f0447f1e111d61043c7f0447f1c7c0040f8000900"
    "00010300010000001200000001010300010000001800000002010300010000000100000003010300"
    "01390000040000000601030054000000010000001101020001000000080000001601030001000000"
    "1800000017010400010000001d0000001c010300010000000100000000000000")


def im_of_fractional_size() -> bytes:
    """Found by fuzzing: Pillow's IM reader takes "0.8" as a width, then load() raises TypeError."""
    data = next(seed for seed in IMAGE_SEEDS if seed.startswith(b"Image type:"))
    return data.replace(b"18*24", b".8*24")


@SLOW
@given(mutated(IMAGE_SEEDS))
@example(dds_of_unknown_pixel_format())
@example(im_of_fractional_size())
@example(TIFF_OF_A_STRING_OFFSET)
# Pillow's warnings about damaged files are silenced by open_image; any other is an error.
@pytest.mark.filterwarnings("error", IM_DEPRECATED)
def test_preprocess_mutated_images(data):
    check_image(data, max_pixels=4_000_000)


@st.composite
def pixel_images(draw) -> Image.Image:
    """Any small image, pixels anything: 8-bit, 16-bit, int32 and float ones (NaN, ±inf too)."""
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    mode = draw(st.sampled_from(["L", "I;16", "I", "F", "RGBA", "LA"]))
    if mode == "F":
        pixels = draw(arrays(np.float32, shape, elements=st.floats(width=32)))
    elif mode == "I":
        pixels = draw(arrays(np.int32, shape))
    elif mode == "I;16":
        pixels = draw(arrays(np.uint16, shape))
    else:
        channels = {"L": (), "RGBA": (4,), "LA": (2,)}[mode]
        pixels = draw(arrays(np.uint8, shape + channels))
        if mode == "LA":
            return Image.fromarray(pixels[..., 0]).convert("LA") if draw(st.booleans()) else \
                Image.merge("LA", [Image.fromarray(pixels[..., 0]), Image.fromarray(pixels[..., 1])])
    return Image.fromarray(pixels, mode if mode != "I;16" else None)


@FAST
@given(pixel_images())
@pytest.mark.filterwarnings("error")  # numpy's "invalid value" warnings too: NaN must not leak
def test_preprocess_any_pixels(image):
    try:
        digit = preprocess(image)
    except ImageError as error:
        assert "\n" not in str(error)
        return
    assert digit.shape == (IMAGE_SIZE, IMAGE_SIZE) and digit.dtype == np.uint8
