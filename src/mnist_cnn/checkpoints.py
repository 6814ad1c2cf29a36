"""Checkpoints and trained models: saving and checking them, and opening a trained model
(in eval mode, with its config and class names) from anything a user may pass: a run
folder, model.safetensors, checkpoint.pt, or the tutorial's state_dict file.

Nothing here unpickles arbitrary objects: checkpoints and tutorial weights load with
`torch.load(weights_only=True)`, models from safetensors. torch is imported inside the
functions that need it, so the torch-free paths (--help, onnxruntime prediction) can use
the names defined here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mnist_cnn.config import TrainConfig, validate_train_config
from mnist_cnn.fileio import atomic_write, atomic_write_bytes, atomic_write_text, require_regular_file
from mnist_cnn.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    MODEL_INFO_FILE,
    CheckpointError,
    model_folder,
    newest_run,
    read_run_config,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mnist_cnn.data import Split

CHECKPOINT_FORMAT = "mnist-cnn-checkpoint"
MODEL_FORMAT = "mnist-cnn-model"
FORMAT_VERSION = 1
MAX_MODEL_BYTES = 2 << 30  # a model or checkpoint file larger than this is refused unread
# The model shipped in the package, for a first `serve`/`predict` before any training.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write checkpoint.pt (atomically: a crash leaves the previous one), stamped with its
    format and version."""
    import torch

    state = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **state}
    atomic_write(Path(run_dir) / CHECKPOINT_FILE, lambda handle: torch.save(state, handle))


def _torch_load(path: Path) -> Any:
    import torch

    require_regular_file(path, error=CheckpointError, max_bytes=MAX_MODEL_BYTES)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad or hostile file
        text = str(error).strip()
        first_line = text.splitlines()[0][:200] if text else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint or state_dict ({first_line})") from None


def _check_checkpoint(path: Path, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mnist-cnn checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('format_version')}, "
                              f"this mnist-cnn reads version {FORMAT_VERSION}")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint (the file, or checkpoint.pt in a run folder), loaded with weights_only
    and checked for its format and version."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint there (expected a run folder holding "
                              f"{CHECKPOINT_FILE})")
    return _check_checkpoint(path, _torch_load(path))


def save_model(run_dir: Path, model: "nn.Module", config: TrainConfig, info: dict[str, Any]) -> Path:
    """Write model.safetensors (weights, with the config in its metadata so the file stands
    alone) and model.json (config and final metrics); returns the safetensors path."""
    from safetensors.torch import save

    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(config.to_dict())}
    if "calibration" in info:  # the temperature and "unsure" threshold travel with the weights
        metadata["calibration"] = json.dumps(info["calibration"])
    atomic_write_bytes(Path(run_dir) / MODEL_FILE, save(weights, metadata=metadata))
    document = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(), **info}
    atomic_write_text(Path(run_dir) / MODEL_INFO_FILE, json.dumps(document, indent=2) + "\n")
    return Path(run_dir) / MODEL_FILE


def read_model_info(source: str | Path) -> dict[str, Any]:
    """model.json beside a model (or in a run folder); {} where there is none or it is unreadable."""
    try:
        info = json.loads((model_folder(source) / MODEL_INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def resolve_model_path(source: str | Path) -> Path:
    """A run folder → its model.safetensors (or its checkpoint while unfinished); a file as is."""
    path = Path(source)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {MODEL_FILE} or {CHECKPOINT_FILE} in this folder "
                              "(is it a run folder of mnist-cnn train?)")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def model_or_default(value: str | Path | None, *, log: Callable[[str], None] | None = None) -> Path:
    """The model a command should use: `value` when given; else the newest finished run
    under ./runs; else the model shipped in the package. Says which when it chose."""
    if value is not None:
        return Path(value)
    say = log or (lambda message: print(message, file=sys.stderr))
    run = newest_run()
    if run is not None:
        say(f"using the newest finished run: {run} (choose another with --model)")
        return run
    say(f"using the model shipped with mnist-cnn ({PRETRAINED_DIR / MODEL_FILE}); "
        "train your own with mnist-cnn train")
    return PRETRAINED_DIR


@dataclass
class LoadedModel:
    """A trained model in eval mode with what commands need to use it."""

    model: "nn.Module"
    config: TrainConfig
    path: Path  # the file the weights came from
    data_dir: str | None  # the data folder it was trained from, if recorded
    info: dict[str, Any] = field(default_factory=dict)  # model.json, where there is one

    @property
    def classes(self) -> tuple[str, ...]:
        from mnist_cnn.catalog import get_spec

        return get_spec(self.config.dataset).classes

    def data_source(self, dataset: str | None = None, data_dir: str | None = None) -> tuple[str, str | None]:
        """(data set, folder) to evaluate on: the model's own unless `dataset` names
        another; the folder it was trained from unless `data_dir` is given."""
        name = dataset or self.config.dataset
        if data_dir is None and name == self.config.dataset:
            data_dir = self.data_dir
        return name, data_dir


def _read_safetensors(path: Path) -> tuple[dict[str, "torch.Tensor"], TrainConfig]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    require_regular_file(path, error=CheckpointError, max_bytes=MAX_MODEL_BYTES)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    if not metadata or metadata.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: safetensors file without mnist-cnn metadata "
                              "(train it with mnist-cnn, or load the weights yourself)")
    try:
        return weights, TrainConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable model config in metadata ({error})") from None


def _tutorial_weights(path: Path, state: Any) -> dict[str, "torch.Tensor"]:
    """A plain state_dict saved from the tutorial's CNN_MNIST (`torch.save(model.state_dict(),
    path)`), also from nn.DataParallel ('module.' prefixes) or wrapped as {'state_dict': ...}."""
    import torch

    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise CheckpointError(f"{path}: neither an mnist-cnn checkpoint nor a state_dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _fit_weights(path: Path, model: "nn.Module", weights: dict[str, "torch.Tensor"], name: str) -> None:
    """Load `weights` strictly, with a one-line error naming the first mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [key for key in expected if key in weights and weights[key].shape != expected[key].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {', '.join(missing[:4])}" if missing else
                  f"unexpected {', '.join(unexpected[:4])}" if unexpected else
                  f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, "
                  f"expected {tuple(expected[wrong[0]].shape)}")
        raise CheckpointError(f"{path}: weights do not fit model {name!r} ({detail})")
    model.load_state_dict(weights, strict=True)


def open_model(source: str | Path, *, device: "torch.device | str" = "cpu") -> LoadedModel:
    """A trained model (eval mode, on `device`) from a run folder, a model.safetensors, a
    checkpoint.pt, or a state_dict file saved from the tutorial's CNN_MNIST."""
    from mnist_cnn.catalog import get_spec
    from mnist_cnn.model import build_model, to_device

    path = resolve_model_path(source)
    folder_config = read_run_config(model_folder(path)) or {}
    data_dir = folder_config.get("data_dir")
    if path.suffix == ".safetensors":
        weights, config = _read_safetensors(path)
    else:
        state = _torch_load(path)
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            state = _check_checkpoint(path, state)
            weights, config = state["model"], TrainConfig.from_dict(state["config"])
            data_dir = data_dir or state.get("data_dir")
        else:
            weights, config = _tutorial_weights(path, state), TrainConfig()
    model = build_model(config.model, num_classes=len(get_spec(config.dataset).classes))
    _fit_weights(path, model, weights, config.model)
    return LoadedModel(to_device(model, device).eval(), config, path, data_dir, read_model_info(path))


def load_split_for(loaded: LoadedModel, *, split: str = "test", dataset: str | None = None,
                   data_dir: str | None = None, device: "torch.device | str" = "cpu") -> "Split":
    """The `split` a model should be evaluated on (see LoadedModel.data_source)."""
    from mnist_cnn.data import load_dataset

    name, folder = loaded.data_source(dataset, data_dir)
    return load_dataset(name, folder, splits=(split,), device=device)[split]


# ---------------------------------------------------------------- reopening a run


@dataclass
class OpenedRun:
    """A run folder reopened to continue training."""

    run_dir: Path
    config: TrainConfig
    checkpoint: dict[str, Any] | None  # None: killed before its first checkpoint
    data_dir: str | None


def open_run(run_dir: str | Path) -> OpenedRun:
    """The config, checkpoint and data folder of a run to resume. Leftovers of a save cut
    short by a crash are removed; a run without a checkpoint restarts from config.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such run folder")
    for leftover in run_dir.glob(f".{CHECKPOINT_FILE}.*"):
        leftover.unlink()
    if (run_dir / CHECKPOINT_FILE).exists():
        state = load_checkpoint(run_dir / CHECKPOINT_FILE)
        return OpenedRun(run_dir, TrainConfig.from_dict(state["config"]), state, state.get("data_dir"))
    if not (run_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"--resume {run_dir}: no {CHECKPOINT_FILE} or {CONFIG_FILE} there "
                              "(is it a run folder of mnist-cnn train?)")
    document = read_run_config(run_dir)
    try:
        config = TrainConfig.from_dict(document["config"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: unreadable ({error})") from None
    validate_train_config(config)
    return OpenedRun(run_dir, config, None, document.get("data_dir"))  # type: ignore[union-attr]
