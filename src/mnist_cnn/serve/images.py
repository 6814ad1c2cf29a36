"""A client's bytes → the 28×28 digit through `mnist_cnn.preprocess` (the path the CLI uses),
or an ImageError with a one-line reason; and a model's answer as the API's JSON."""

from __future__ import annotations

import base64
import io
from typing import Any, Callable

import numpy as np

from mnist_cnn.preprocess import ALLOWED_FORMATS, ImageError, preprocess_file, to_image
from mnist_cnn.serve.limits import OverBudget
from mnist_cnn.serve.settings import TOP_K

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def refuse_unsupported(data: bytes) -> None:
    """The formats the API refuses although Pillow could read them: animations (which frame
    did the user mean?), 16-bit and floating-point images, and CMYK (print files)."""
    if data[:8] == PNG_SIGNATURE and len(data) > 24 and data[12:16] == b"IHDR" and data[24] == 16:
        raise ImageError("16-bit PNG is not supported; save it with 8 bits per channel")
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
    except Exception:  # noqa: BLE001 - whatever it is, preprocess_file names it
        return
    with image:
        if image.mode in HIGH_DEPTH_MODES:
            raise ImageError(f"{image.mode} images (16-bit or floating point) are not supported; "
                             "save it with 8 bits per channel")
        if image.mode == "CMYK":
            raise ImageError("CMYK images are not supported; save it as RGB or grayscale")
        try:
            animated = bool(getattr(image, "is_animated", False))
        except Exception:  # noqa: BLE001
            return
        if animated:
            raise ImageError("animated images are not supported; send a single frame")


def read_digit(data: bytes, charge: Callable[[int], None] | None = None) -> np.ndarray:
    """Bytes from a client → the uint8 (28, 28) digit, or ImageError with a one-line reason.
    `charge(pixels)` is told what decoding will cost before it starts (see serve.limits)."""
    if not data:
        raise ImageError("empty body: no image")
    refuse_unsupported(data)
    try:
        return preprocess_file(data, charge=charge)
    except ImageError as error:
        raise ImageError(str(error).removeprefix("image: ")) from None
    except OverBudget:
        raise
    except Exception as error:  # noqa: BLE001 - a Pillow plugin failing on hostile bytes
        raise ImageError(f"cannot decode the image ({type(error).__name__})") from None


def png_base64(digit: np.ndarray) -> str:
    buffer = io.BytesIO()
    to_image(digit).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prediction(row: np.ndarray, classes: tuple[str, ...], model: str, *, top: int = TOP_K,
               min_confidence: float = 0.0) -> dict[str, Any]:
    """One row of probabilities → the API's answer: `predict --json`'s record (see
    mnist_cnn.predict.Prediction), without a path, with the model's name."""
    from mnist_cnn.predict import Prediction

    record = Prediction(probabilities=row, classes=classes, min_confidence=min_confidence)
    return {**record.to_json(top), "model": model}
