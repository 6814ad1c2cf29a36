"""A user's image → the 28×28 digit MNIST's own normalisation would have made of it.

MNIST digits are white on black, size-normalised into a 20×20 box keeping their aspect
ratio (with antialiasing), then placed in 28×28 with their centre of mass at the centre.
Naive demos skip this and fail on real handwriting; every path that feeds user images to a
model (predict, explain, the web app, exported models' demos) goes through `preprocess`.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_cnn import MnistCnnError
from mnist_cnn.idx import IMAGE_SIZE
from mnist_cnn.fileio import read_file, read_stream

BOX_SIZE = 20  # MNIST fits each digit's longer side into 20 pixels
MAX_PIXELS = 40_000_000  # larger images are refused (decompression bombs), from the header
# Formats Pillow decodes by itself, checked before any decoding: no EPS (Pillow runs Ghostscript
# on it), no ICO/ICNS (they decode their embedded image inside Image.open), nothing exotic.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # PPM: Pillow's PNM reader
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, TIFF, WebP or PNM"
# A digit needs far fewer pixels than a phone photo has: a JPEG is decoded at the smallest of
# 1/2, 1/4, 1/8 scale that keeps this many pixels, any other large image is shrunk right after.
DECODE_PIXELS = 1_000_000
MAX_FILE_BYTES = 200_000_000  # an image file (or stdin) is read whole; larger ones are refused
STDIN = "-"  # as an image path: read the image from standard input
ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2–8 turned and/or mirrored
INK_THRESHOLD = 0.2  # after normalising to [0, 1]: what counts as ink when cropping
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                  ".ppm", ".pbm", ".pnm"}


class ImageError(MnistCnnError):
    """An image that cannot be read or holds no digit."""


def read_image_bytes(source: str | Path) -> bytes:
    """A regular file's bytes, or standard input's for "-", at most MAX_FILE_BYTES."""
    if str(source) == STDIN:
        if sys.stdin is None or sys.stdin.isatty():
            raise ImageError(f"{STDIN}: standard input is a terminal; pipe an image into it")
        return read_stream(sys.stdin.buffer, name=STDIN, error=ImageError, max_bytes=MAX_FILE_BYTES)
    return read_file(source, error=ImageError, max_bytes=MAX_FILE_BYTES)


# The first bytes of formats people send by mistake, to name them when they are refused.
REFUSED_SIGNATURES = {b"%!PS": "EPS/PostScript", b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF",
                      b"\x00\x00\x01\x00": "ICO", b"icns": "ICNS",
                      b"8BPS": "PSD", b"<svg": "SVG", b"<?xml": "SVG/XML"}


def not_allowed(name: str, data: bytes) -> ImageError:
    kind = next((kind for magic, kind in REFUSED_SIGNATURES.items() if data.startswith(magic)), None)
    what = f"{kind} files are not supported" if kind else "not an image mnist-cnn reads"
    return ImageError(f"{name}: {what} (send {FORMAT_NAMES})")


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: phones store pixels as the sensor saw them and
    an EXIF Orientation tag saying how to turn (or mirror) them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": then no turn
        if image.getexif().get(ORIENTATION, 1) not in range(2, 9):
            return image
        return ImageOps.exif_transpose(image)


def shrink(image: Image.Image, pixels: int) -> Image.Image:
    """`image` made at most about `pixels` large by an integer box reduction (cheap, and the
    digit is later resized to 20x20 anyway); smaller images and 16-bit ones are kept."""
    factor = int((image.width * image.height / pixels) ** 0.5)
    if factor < 2:
        return image
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P" or (image.mode == "RGB" and "transparency" in image.info):
        # as to_gray would convert it, so that transparency survives the reduction
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode not in ("L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F", "CMYK", "LAB"):
        return image
    return image.reduce(factor)


def open_image(source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS,
               decode_pixels: int | None = None,
               charge: Callable[[int], None] | None = None) -> Image.Image:
    """Decode the first frame of a PNG, JPEG, GIF, BMP, TIFF, WebP or PNM image (a path, "-"
    for standard input, or the bytes), turned upright as its EXIF orientation says.

    Only those formats are tried (no other Pillow plugin sees the bytes), and the size the
    header states is checked against `max_pixels` before any pixel is decoded. With
    `decode_pixels`, a large JPEG is decoded at reduced scale and any other large image is
    shrunk right after decoding. `charge(pixels)`, when given, is called with the number of
    pixels about to be decoded and may raise ImageError to refuse them (a budget)."""
    name = "image" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else read_image_bytes(source)
    with io.BytesIO(data) as handle:
        try:
            with warnings.catch_warnings():
                # Pillow's UserWarnings about a damaged file ("Truncated File Read") would
                # break the one-line output; the image decodes or raises, and that is said.
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle, formats=ALLOWED_FORMATS)  # reads the header only
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{name}: {width}x{height} pixels is over the limit of "
                                     f"{max_pixels:,}; scale the image down first")
                image.seek(0)  # first frame of a GIF, TIFF or WebP animation
                if decode_pixels is not None and width * height > decode_pixels:
                    scale = (decode_pixels / (width * height)) ** 0.5
                    image.draft(None, (max(1, int(width * scale + 1)), max(1, int(height * scale + 1))))
                if charge is not None:
                    charge(image.width * image.height)
                image.load()
                image = upright(image)
                if decode_pixels is not None:
                    image = shrink(image, decode_pixels)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name}: refused as a decompression bomb (too many pixels)") from None
        except UnidentifiedImageError:
            raise not_allowed(name, data) from None
        # Found by fuzzing (tests/test_fuzz.py), beyond the usual OSError and ValueError:
        # NotImplementedError for a DDS pixel format Pillow lacks, TypeError for a TIFF tag or
        # an IM size of the wrong type ("0.8*24").
        except (OSError, SyntaxError, ValueError, EOFError, NotImplementedError, TypeError) as error:
            raise ImageError(f"{name}: broken image ({error})") from None
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name}: empty image")
    return image


def to_gray(image: Image.Image) -> np.ndarray:
    """Any mode → float32 luminance in [0, 1]. Transparent pixels become background: the
    image is flattened onto white when its visible pixels are dark, onto black when light."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        values[~np.isfinite(values)] = 0.0  # NaN or inf in a float TIFF: no ink there
        high = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        if image.mode == "F" and values.max() <= 1.0:
            high = 1.0
        return np.clip(values / high, 0, 1).astype(np.float32)
    if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema()[0] == 255:
        # Opaque (as a canvas' PNG is): its luminance by Pillow's integer conversion (as for RGB),
        # not through a float copy of every channel (~4x slower).
        image = image.convert("L")
    elif image.mode in ("RGBA", "LA", "RGBa", "La") or (image.mode == "RGB" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        alpha = rgba[..., 3]
        visible = alpha > 0.5
        if not visible.any() or visible.all():
            background = 1.0 if luminance.mean() < 0.5 else 0.0
        else:
            background = 1.0 if luminance[visible].mean() < 0.5 else 0.0
        return luminance * alpha + background * (1 - alpha)
    if image.mode == "CMYK":
        image = image.convert("RGB")
    if image.mode == "LAB":  # (a TIFF may hold CIELAB) Pillow converts it to nothing else
        image = image.getchannel("L")
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def high_percentile(values: np.ndarray, q: float) -> float:
    """`np.percentile(values, q)` (linear interpolation) for q near 100, without
    partitioning the whole image: the values that decide it are among the largest, so they
    are taken above a threshold first (often just the maximum: saturated ink)."""
    flat = values.ravel()
    rank = q / 100 * (flat.size - 1)
    low = int(rank)
    needed = flat.size - low  # the values at sorted positions low, low + 1, ..., size - 1
    top = flat.max()
    chosen = flat
    for threshold in (top, (top + flat.mean()) / 2):
        above = flat[flat >= threshold]
        if above.size >= needed:
            chosen = above
            break
    first = chosen.size - needed  # sorted position `low` of flat, within `chosen`
    pair = np.partition(chosen, [first, min(first + 1, chosen.size - 1)])
    a, b = pair[first], pair[min(first + 1, chosen.size - 1)]
    t = flat.dtype.type(rank - low) if flat.dtype.kind == "f" else rank - low
    # numpy's own lerp, in the values' precision: the same result to within a rounding
    return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


def median(values: np.ndarray) -> float:
    """np.median of a 1-D array, the same value (the mean of the two middle values, in their
    precision), without np.median's import of numpy.ma: 50 ms on every CLI prediction."""
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    low, high = (values.size - 1) // 2, values.size // 2
    middle = np.partition(values, [low, high])
    return float((middle[low] + middle[high]) / 2)


def normalise_ink(gray: np.ndarray) -> np.ndarray:
    """White ink on black, background at 0, ink at 1. The background is the median of the
    border pixels; an image whose background is light is inverted."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = median(border)
    ink = 1.0 - gray if background > 0.5 else gray
    background = 1.0 - background if background > 0.5 else background
    peak = high_percentile(ink, 99.9)
    if peak - background < 0.1:
        return np.zeros_like(ink)
    return np.clip((ink - background) / (peak - background), 0, 1)


def center_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, column) of the ink's centre of mass, as MNIST centred its digits by."""
    total = image.sum()
    rows, cols = np.indices(image.shape)
    return float((rows * image).sum() / total), float((cols * image).sum() / total)


def preprocess(image: Image.Image, *, source: str = "image") -> np.ndarray:
    """A PIL image → uint8 (28, 28), white digit on black, as MNIST's own files store it."""
    try:
        ink = normalise_ink(to_gray(upright(image)))
    except ValueError as error:  # a mode Pillow cannot convert to grayscale
        raise ImageError(f"{source}: cannot read image mode {image.mode} ({error})") from None
    return fit_digit(ink, source=source)


def fit_digit(ink: np.ndarray, *, source: str = "image") -> np.ndarray:
    """Normalised ink (white on black, in [0, 1]) → uint8 (28, 28): cropped to the ink, fitted
    into 20×20 and centred by centre of mass, as MNIST's digits were. (Also each piece of a
    number: mnist_cnn.segment.)"""
    mask = ink > INK_THRESHOLD
    if not mask.any():
        raise ImageError(f"{source}: no digit found (the image is blank or has no contrast)")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = crop.shape
    scale = BOX_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray((crop * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
    box = np.asarray(resized, dtype=np.float32)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    row_mass, col_mass = center_of_mass(box) if box.sum() > 0 else (size[1] / 2, size[0] / 2)
    # Shift so the centre of mass lands on the canvas centre, kept inside the canvas.
    top = int(np.clip(round(IMAGE_SIZE / 2 - row_mass), 0, IMAGE_SIZE - size[1]))
    left = int(np.clip(round(IMAGE_SIZE / 2 - col_mass), 0, IMAGE_SIZE - size[0]))
    canvas[top:top + size[1], left:left + size[0]] = box
    return np.clip(canvas, 0, 255).astype(np.uint8)


def preprocess_file(source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS,
                    charge: Callable[[int], None] | None = None) -> np.ndarray:
    """A path, "-" or bytes → the digit; decoded no larger than DECODE_PIXELS where it can be."""
    name = "image" if isinstance(source, bytes) else str(source)
    image = open_image(source, max_pixels=max_pixels, decode_pixels=DECODE_PIXELS, charge=charge)
    return preprocess(image, source=name)


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given ("-", standard input, too); folders → their image files (by suffix),
    sorted, not recursive."""
    expanded: list[Path] = []
    for text in paths:
        path = Path(text)
        if text != STDIN and path.is_dir():
            expanded += sorted(p for p in path.iterdir()
                               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            expanded.append(path)
    return expanded


EMPTY_FOLDER = "no image files in this folder"  # the error of an input folder input_files found empty


def input_files(inputs: list[str]) -> Iterator[tuple[str, Path | None]]:
    """Each input in order with its files, folders expanded as `expand_paths` does:
    (input, file) pairs, and (input, None) for a folder holding no image file (EMPTY_FOLDER)."""
    for text in inputs:
        paths = expand_paths([text])
        if Path(text).is_dir() and not paths:
            yield text, None
        for path in paths:
            yield text, path


def to_image(digit: np.ndarray) -> Image.Image:
    """A preprocessed 28×28 digit as a PIL image (mode L)."""
    return Image.fromarray(digit.astype(np.uint8))


