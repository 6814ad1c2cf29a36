"""The served models: loaded once at start-up, named by their run folder (never their path),
and handed to the routes as a dependency (see serve.deps)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_cnn import MnistCnnError
from mnist_cnn.runs import CHECKPOINT_FILE, MODEL_FILE, ONNX_FILE, TORCHSCRIPT_FILE, model_folder
from mnist_cnn.serve.settings import ServeSettings

RUN_FILES = {MODEL_FILE, CHECKPOINT_FILE, ONNX_FILE, TORCHSCRIPT_FILE}
INFO_KEYS = ("backend", "architecture", "parameters", "dataset", "classes", "recipe", "test_accuracy")


@dataclass
class ServedModel:
    """A loaded predictor, its public name (never its path) and what /api/models says of it."""

    name: str
    predictor: Any
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.predictor.classes)

    @property
    def min_confidence(self) -> float:
        """Below this top probability the answer is marked unsure (the model's calibrated
        threshold; see mnist_cnn.calibrate)."""
        return float(getattr(self.predictor, "min_confidence", 0.0))

    def probabilities(self, digits: np.ndarray, *, metrics=None) -> np.ndarray:
        """uint8 (N, 28, 28) → (N, classes), timed into `metrics.inference` when given."""
        with self.lock:  # one forward pass at a time per model; the CPU is shared anyway
            began = time.perf_counter()
            rows = self.predictor.probabilities(digits)
            if metrics is not None:
                metrics.inference.labels(self.name).observe(time.perf_counter() - began)
        return rows


def model_name(path: Path) -> str:
    """A run folder's name; for a file, its folder's name when it is a run's standard file."""
    path = Path(path).resolve()
    if path.is_dir() or path.name in RUN_FILES:
        return model_folder(path).name
    return path.name.split(".")[0] or path.name


def describe_model(predictor: Any) -> dict[str, Any]:
    """What /api/models reports of a predictor (its `describe()`, without the server's path)."""
    described = predictor.describe()
    return {key: described.get(key) for key in INFO_KEYS}


def _predictor(path: Path, settings: ServeSettings):
    from mnist_cnn.predict import OnnxPredictor, make_predictor

    if settings.backend == "onnxruntime":
        # One intra-op thread: requests run in parallel, and idle ONNX Runtime threads spin.
        return OnnxPredictor(path, threads=1)
    return make_predictor(path, backend=settings.backend, device=settings.device)


def load_models(settings: ServeSettings) -> list[ServedModel]:
    """Load every model once; names are made unique by a suffix (-2, -3, ...)."""
    if not settings.model_paths:
        raise MnistCnnError("no model to serve; give --model RUN_DIR_OR_MODEL")
    models: list[ServedModel] = []
    used: set[str] = set()
    for path in settings.model_paths:
        predictor = _predictor(path, settings)
        name, counter = model_name(path), 1
        while name in used:
            counter += 1
            name = f"{model_name(path)}-{counter}"
        used.add(name)
        models.append(ServedModel(name=name, predictor=predictor, info=describe_model(predictor)))
    return models
