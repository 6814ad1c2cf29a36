"""Predictions on a user's own images, through MNIST's normalisation (see preprocess)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import numpy as np

from mnist_cnn import MnistCnnError
from mnist_cnn.calibrate import (DEFAULT_MIN_CONFIDENCE, model_min_confidence, model_temperature,
                                  read_calibration, temper)
from mnist_cnn.config import BACKENDS, TrainConfig
from mnist_cnn.data import scale_array
from mnist_cnn.idx import IMAGE_SIZE
from mnist_cnn.preprocess import EMPTY_FOLDER, ImageError, input_files, preprocess_file, to_image
from mnist_cnn.checkpoints import read_model_info
from mnist_cnn.runs import ONNX_FILE, CheckpointError, model_folder

if TYPE_CHECKING:  # torch is imported where it is used: the onnxruntime path never does
    import torch


@runtime_checkable
class Predictor(Protocol):
    """What predict, the Python API and serve use of a trained model, whatever runs it:
    TorchPredictor, OnnxPredictor, or an EnsemblePredictor of either."""

    backend: str  # one of config.BACKENDS
    classes: tuple[str, ...]
    config: TrainConfig  # the recipe it was trained with
    path: Path  # the file its weights came from
    info: dict[str, Any]  # model.json, where there is one
    min_confidence: float  # below this top probability an answer is "unsure"

    def probabilities(self, digits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, 28, 28) digits → float32 (N, classes) calibrated probabilities."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the model is, for people and for the server's /api/models."""
        ...


class TorchPredictor:
    """A trained model (run folder, model.safetensors, checkpoint.pt or tutorial weights)
    in eval mode."""

    backend = "torch"

    def __init__(self, source: str | Path, *, device: "torch.device | str" = "cpu"):
        from mnist_cnn.checkpoints import open_model

        self.device = device  # resolved by the caller (make_predictor, the CLI, the Python API)
        loaded = open_model(source, device=device)
        self.model, self.config, self.path, self.info = loaded.model, loaded.config, loaded.path, loaded.info
        self.classes = loaded.classes
        self.temperature, self.min_confidence = _calibration(self.path, self.info)

    def probabilities(self, digits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 (N, 28, 28) → float32 (N, classes) softmax probabilities."""
        import torch

        outputs = []
        with torch.inference_mode():
            for start in range(0, len(digits), batch_size):
                x = torch.from_numpy(scale_array(digits[start:start + batch_size])[:, None])
                logits = self.model(x.to(self.device)).float() / self.temperature
                outputs.append(torch.softmax(logits, dim=1).cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(self.classes)), np.float32)

    def describe(self) -> dict[str, Any]:
        return _description(self, parameters=sum(p.numel() for p in self.model.parameters()))


def resolve_onnx_path(source: str | Path) -> Path:
    """A run folder → its model.onnx (made by `mnist-cnn export`); a file as is."""
    path = Path(source)
    if path.is_dir():
        if (path / ONNX_FILE).is_file():
            return path / ONNX_FILE
        raise CheckpointError(f"{path}: no {ONNX_FILE} here; create it with "
                              f"mnist-cnn export --model {path} --format onnx")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix != ".onnx" and (path.parent / ONNX_FILE).is_file():
        return path.parent / ONNX_FILE  # model.safetensors given: its exported sibling
    return path


class OnnxPredictor:
    """An exported model under ONNX Runtime: no torch import anywhere on this path."""

    backend = "onnxruntime"

    def __init__(self, source: str | Path, *, threads: int | None = None):
        from mnist_cnn.fileio import require_regular_file

        try:
            import onnxruntime
        except ImportError:
            raise MnistCnnError("--backend onnxruntime needs onnxruntime: pip install 'mnist-cnn[onnx]'") from None
        self.path = require_regular_file(resolve_onnx_path(source), error=CheckpointError)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{self.path}: not a loadable ONNX model "
                                  f"({str(error).strip().splitlines()[0][:200]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes = tuple(json.loads(metadata["classes"]))
        except (KeyError, ValueError, TypeError):
            self.classes = tuple(str(i) for i in range(self.session.get_outputs()[0].shape[1]))
        try:
            self.config = TrainConfig.from_dict(json.loads(metadata["config"]))
        except (KeyError, ValueError, TypeError):
            self.config = TrainConfig()
        self.info = read_model_info(self.path)
        # The exported graph ends in the uncalibrated softmax; the temperature is applied here.
        self.temperature, self.min_confidence = _calibration(self.path.with_suffix(".safetensors"), self.info)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 1, 28, 28) in [0, 1] → (N, classes) probabilities."""
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, digits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        outputs = [temper(self.run(scale_array(digits[start:start + batch_size])[:, None]), self.temperature)
                   for start in range(0, len(digits), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), np.float32)

    def describe(self) -> dict[str, Any]:
        return _description(self, parameters=self.info.get("parameters"))


class EnsemblePredictor:
    """Several models predicting together: the mean of their probabilities."""

    def __init__(self, members: Sequence[Predictor]):
        self.members = list(members)
        self.classes = self.members[0].classes
        for member in self.members[1:]:
            if member.classes != self.classes:
                raise MnistCnnError(f"models {self.members[0].path} and {member.path} predict "
                                    "different classes; an ensemble needs the same data set")
        self.backend = self.members[0].backend
        self.config, self.info, self.path = self.members[0].config, {}, self.members[0].path
        # Each member's probabilities are already calibrated; their thresholds are averaged.
        self.min_confidence = float(np.mean([m.min_confidence for m in self.members]))

    def probabilities(self, digits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        return np.mean([m.probabilities(digits, batch_size) for m in self.members], axis=0).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        members = [m.describe() for m in self.members]
        return {**members[0], "name": "ensemble of " + ", ".join(m["name"] for m in members),
                "members": members, "test_accuracy": None}


def _calibration(path: Path, info: dict[str, Any]) -> tuple[float, float]:
    """(temperature, default --min-confidence) stored with the model (mnist_cnn.calibrate)."""
    calibration = read_calibration(path, info)
    return model_temperature(calibration), model_min_confidence(calibration)


def _description(predictor, *, parameters: int | None) -> dict[str, Any]:
    """What a model is, for people and for the server's /api/models."""
    from mnist_cnn.catalog import get_spec

    metrics = predictor.info.get("metrics") or {}
    folder = model_folder(predictor.path)
    return {
        "name": folder.name or str(folder), "path": str(predictor.path), "backend": predictor.backend,
        "architecture": predictor.config.model, "parameters": parameters,
        "dataset": predictor.config.dataset, "dataset_title": get_spec(predictor.config.dataset).title,
        "classes": list(predictor.classes), "recipe": predictor.config.to_dict(),
        "test_accuracy": metrics.get("test_accuracy"), "input_size": IMAGE_SIZE,
    }


def make_predictor(source: str | Path | Sequence[str | Path], *, backend: str = "torch",
                   device: "torch.device | str" = "cpu") -> Predictor:
    """A predictor for one model, or an ensemble when given several, all on one device. The
    CLI and the Python API pass a resolved torch.device; a name (serve's --device) is
    resolved here, once for all members. onnxruntime ignores it (and never imports torch)."""
    if backend == "torch" and isinstance(device, str):
        from mnist_cnn.runtime import resolve_device

        device = resolve_device(device)
    if not isinstance(source, (str, Path)):
        sources = list(source)
        if len(sources) != 1:
            return EnsemblePredictor([make_predictor(s, backend=backend, device=device) for s in sources])
        source = sources[0]
    if backend == "torch":
        return TorchPredictor(source, device=device)
    if backend == "onnxruntime":
        return OnnxPredictor(source)
    raise MnistCnnError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


@dataclass
class Prediction:
    """One image's answer (or its error): the record that `predict` prints (as text, or as
    JSON with --json) and that the server's /api/predict returns as JSON, the same keys
    built in one place (to_json)."""

    path: str | None = None  # the image's file; None where there is none (an upload)
    probabilities: Sequence[float] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    error: str | None = None
    min_confidence: float = 0.0  # below this top probability the answer is "unsure"

    @property
    def unsure(self) -> bool:
        return float(self.probabilities[self.label]) < self.min_confidence

    @property
    def label(self) -> int:
        return int(np.argmax(self.probabilities))

    def top(self, k: int) -> list[dict[str, Any]]:
        order = np.argsort(self.probabilities)[::-1][:k]
        return [{"label": int(i), "name": self.classes[i], "probability": float(self.probabilities[i])}
                for i in order]

    def to_json(self, k: int = 3) -> dict[str, Any]:
        """label, name, probability, probabilities, the `k` most likely classes (top),
        unsure and min_confidence; after "path" when there is one; or the error."""
        where = {} if self.path is None else {"path": self.path}
        if self.error is not None:
            return {**where, "error": self.error}
        return {**where, "label": self.label, "name": self.classes[self.label],
                "probability": float(self.probabilities[self.label]),
                "probabilities": [float(p) for p in self.probabilities], "top": self.top(k),
                "unsure": self.unsure, "min_confidence": float(self.min_confidence)}

    def to_text(self, k: int = 1) -> str:
        if self.error is not None:
            return f"{self.path}: error: {self.error}"
        digits = self.classes == tuple(str(d) for d in range(10))
        parts = [(f"{t['label']}" if digits else f"{t['name']} [{t['label']}]")
                 + f" ({100 * t['probability']:.2f}%)" for t in self.top(k)]
        if self.unsure:
            return f"{self.path}: unsure (best guess " + ", ".join(parts) + ")"
        return f"{self.path}: " + ", ".join(parts)


def _unique_name(stem: str, used: set[str]) -> str:
    name, counter = f"{stem}.png", 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}.png"
    used.add(name)
    return name


def predict_files(predictor: Predictor, inputs: list[str], *, save_preprocessed: str | Path | None = None,
                  min_confidence: float | None = None) -> list[Prediction]:
    """Preprocess each file and predict, in input order; a bad file gives a Prediction with
    `error` set and the others are still processed. Answers whose top probability is below
    `min_confidence` (default: the model's stored threshold) are marked unsure."""
    if min_confidence is None:
        min_confidence = getattr(predictor, "min_confidence", DEFAULT_MIN_CONFIDENCE)
    results: list[Prediction] = []
    digits: list[np.ndarray] = []
    pending: list[Prediction] = []  # results waiting for the model, in the order of `digits`
    for text, path in input_files(inputs):
        if path is None:
            results.append(Prediction(path=text, error=EMPTY_FOLDER))
            continue
        try:
            digits.append(preprocess_file(path))
        except ImageError as error:
            results.append(Prediction(path=str(path), error=str(error).removeprefix(f"{path}: ")))
            continue
        pending.append(Prediction(path=str(path), classes=predictor.classes, min_confidence=min_confidence))
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
