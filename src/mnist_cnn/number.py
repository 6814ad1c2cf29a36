"""Whole numbers: every digit written in an image, left to right (`predict --number`,
POST /api/read, `read_number`). The image is cut into digits by `mnist_cnn.segment`; each
piece is normalised as a single digit is and classified by the same predictor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mnist_cnn.calibrate import DEFAULT_MIN_CONFIDENCE
from mnist_cnn.preprocess import EMPTY_FOLDER, ImageError, input_files, open_image
from mnist_cnn.segment import segment

UNSURE_MARK = "?"  # stands in `text` for a piece whose answer is unsure


@dataclass
class NumberReading:
    """What was read in one image: one entry per digit, left to right, or an error."""

    path: str
    digits: list[dict[str, Any]] = field(default_factory=list)  # label, name, probability, unsure, box
    images: list[np.ndarray] = field(default_factory=list)  # the 28x28 digit each piece became
    error: str | None = None

    @property
    def text(self) -> str:
        names = [UNSURE_MARK if d["unsure"] else d["name"] for d in self.digits]
        return ("" if all(len(n) == 1 for n in names) else " ").join(names)

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "text": self.text, "digits": self.digits}

    def to_text(self) -> str:
        if self.error is not None:
            return f"{self.path}: error: {self.error}"
        parts = [f"{d['name']}{UNSURE_MARK if d['unsure'] else ''} {100 * d['probability']:.1f}%"
                 for d in self.digits]
        return f"{self.path}: {self.text} ({', '.join(parts)})"


def read_image(predictor, image: Image.Image, *, min_confidence: float, source: str = "image") -> NumberReading:
    """One opened image → its digits (ImageError when it holds none)."""
    pieces = segment(image, classify=predictor.probabilities, source=source)
    if not pieces:
        raise ImageError(f"{source}: no digit found (the image is blank or has no contrast)")
    images = [piece.digit for piece in pieces]
    rows = predictor.probabilities(np.stack(images))
    classes = tuple(predictor.classes)
    digits = []
    for piece, row in zip(pieces, rows):
        label = int(np.argmax(row))
        digits.append({"label": label, "name": classes[label], "probability": float(row[label]),
                       "unsure": bool(row[label] < min_confidence), "box": [int(v) for v in piece.box]})
    return NumberReading(path=source, digits=digits, images=images)


def read_number_files(predictor, inputs: list[str], *, min_confidence: float | None = None) -> list[NumberReading]:
    """Each image (folders expanded, "-" standard input) read as a number, in input order; a
    bad file gives a reading with `error` set and the others are still read."""
    if min_confidence is None:
        min_confidence = getattr(predictor, "min_confidence", DEFAULT_MIN_CONFIDENCE)
    readings: list[NumberReading] = []
    for text, path in input_files(inputs):
        if path is None:
            readings.append(NumberReading(path=text, error=EMPTY_FOLDER))
            continue
        try:
            readings.append(read_image(predictor, open_image(path), min_confidence=min_confidence,
                                       source=str(path)))
        except ImageError as error:
            readings.append(NumberReading(path=str(path), error=str(error).removeprefix(f"{path}: ")))
    return readings
