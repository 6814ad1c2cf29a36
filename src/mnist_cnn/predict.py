"""Predictions on a user's own images, through MNIST's normalisation (see preprocess)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_cnn import MnistCnnError
from mnist_cnn.data import get_spec, scale
from mnist_cnn.preprocess import ImageError, expand_paths, preprocess_file, to_image

BACKENDS = ("torch", "onnxruntime")


class TorchPredictor:
    """A trained model (run folder, model.safetensors or checkpoint.pt) in eval mode."""

    def __init__(self, model_path: str | Path, *, device: str = "auto"):
        from mnist_cnn.checkpoint import load_model
        from mnist_cnn.runtime import resolve_device

        self.device = resolve_device(device)
        self.model, self.config = load_model(model_path, device=self.device)
        self.classes = get_spec(self.config.dataset).classes

    def probabilities(self, digits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, 28, 28) → float32 (N, classes) softmax probabilities."""
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(digits), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(digits[start:start + batch_size]))
                x = scale(x.to(self.device).unsqueeze(1))
                outputs.append(torch.softmax(self.model(x).float(), dim=1).cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(self.classes)), np.float32)


def make_predictor(model_path: str | Path, *, backend: str = "torch", device: str = "auto"):
    if backend == "torch":
        return TorchPredictor(model_path, device=device)
    if backend == "onnxruntime":
        from mnist_cnn.export import OnnxPredictor

        return OnnxPredictor(model_path)
    raise MnistCnnError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


@dataclass
class Prediction:
    path: str
    probabilities: list[float] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    error: str | None = None

    @property
    def label(self) -> int:
        return int(np.argmax(self.probabilities))

    def top(self, k: int) -> list[dict[str, Any]]:
        order = np.argsort(self.probabilities)[::-1][:k]
        return [{"label": int(i), "name": self.classes[i], "probability": float(self.probabilities[i])}
                for i in order]

    def to_json(self, k: int = 3) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "name": self.classes[self.label],
                "probability": float(self.probabilities[self.label]),
                "probabilities": [float(p) for p in self.probabilities], "top": self.top(k)}

    def to_text(self, k: int = 1) -> str:
        if self.error is not None:
            return f"{self.path}: error: {self.error}"
        digits = self.classes == tuple(str(d) for d in range(10))
        parts = [(f"{t['label']}" if digits else f"{t['name']} [{t['label']}]")
                 + f" ({100 * t['probability']:.2f}%)" for t in self.top(k)]
        return f"{self.path}: " + ", ".join(parts)


def _unique_name(stem: str, used: set[str]) -> str:
    name, counter = f"{stem}.png", 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}.png"
    used.add(name)
    return name


def predict_files(predictor, inputs: list[str], *,
                  save_preprocessed: str | Path | None = None) -> list[Prediction]:
    """Preprocess each file and predict, in input order; a bad file gives a Prediction with
    `error` set and the others are still processed."""
    results: list[Prediction] = []
    digits: list[np.ndarray] = []
    pending: list[Prediction] = []  # results waiting for the model, in the order of `digits`
    for text in inputs:
        paths = expand_paths([text])
        if Path(text).is_dir() and not paths:
            results.append(Prediction(path=text, error="no image files in this folder"))
        for path in paths:
            try:
                digits.append(preprocess_file(path))
            except ImageError as error:
                results.append(Prediction(path=str(path), error=str(error).removeprefix(f"{path}: ")))
                continue
            pending.append(Prediction(path=str(path), classes=predictor.classes))
            results.append(pending[-1])
    if save_preprocessed is not None:
        save_digits(Path(save_preprocessed), [Path(p.path) for p in pending], digits)
    if digits:
        for prediction, row in zip(pending, predictor.probabilities(np.stack(digits))):
            prediction.probabilities = row.tolist()
    return results


def save_digits(folder: Path, paths: list[Path], digits: list[np.ndarray]) -> None:
    """Write each 28×28 digit the model saw as FOLDER/<stem>.png (names made unique)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MnistCnnError(f"--save-preprocessed {folder}: cannot create ({error.strerror})") from None
    used: set[str] = set()
    for path, digit in zip(paths, digits):
        to_image(digit).save(folder / _unique_name(path.stem, used))
