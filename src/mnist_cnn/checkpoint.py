"""Checkpoints (resumable training state) and final models (safetensors + JSON).

Nothing here unpickles arbitrary objects: checkpoints load with `weights_only=True`,
models from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_cnn import MnistCnnError
from mnist_cnn.config import TrainConfig
from mnist_cnn.data import get_spec
from mnist_cnn.fileio import atomic_write, atomic_write_bytes, atomic_write_text
from mnist_cnn.model import build_model, to_device

CHECKPOINT_FORMAT = "mnist-cnn-checkpoint"
MODEL_FORMAT = "mnist-cnn-model"
FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
MODEL_INFO_FILE = "model.json"


class CheckpointError(MnistCnnError):
    """A checkpoint or model file that cannot be used."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **state}
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (expected a run folder holding "
                              f"{CHECKPOINT_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mnist-cnn checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('format_version')}, "
                              f"this mnist-cnn reads version {FORMAT_VERSION}")
    return state


def save_model(run_dir: Path, model: nn.Module, config: TrainConfig, info: dict[str, Any]) -> None:
    """Write model.safetensors (weights, with the config in its metadata so the file stands
    alone) and model.json (config and final metrics)."""
    from safetensors.torch import save

    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(config.to_dict())}
    blob = save(weights, metadata=metadata)
    atomic_write_bytes(Path(run_dir) / MODEL_FILE, blob)
    document = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
                "config": config.to_dict(), **info}
    atomic_write_text(Path(run_dir) / MODEL_INFO_FILE, json.dumps(document, indent=2) + "\n")


def _config_from_metadata(path: Path, metadata: dict[str, str] | None) -> TrainConfig:
    if not metadata or metadata.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: safetensors file without mnist-cnn metadata "
                              "(train it with mnist-cnn, or load the weights yourself)")
    try:
        return TrainConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: unreadable model config in metadata ({error})") from None


def resolve_model_path(path: str | Path) -> Path:
    """A run folder → its model.safetensors (or its checkpoint while unfinished); a file as is."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {MODEL_FILE} or {CHECKPOINT_FILE} in this folder "
                              "(is it a run folder of mnist-cnn train?)")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


def saved_data_dir(path: str | Path) -> str | None:
    """The data folder a run was trained from (its config.json), for commands given only
    the run folder or a model file inside it."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        return json.loads((folder / "config.json").read_text()).get("data_dir")
    except (OSError, ValueError, AttributeError):
        return None


def load_model(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild a trained model (in eval mode) from a run folder, a model.safetensors or a
    checkpoint.pt, with the config it was trained with."""
    path = resolve_model_path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            weights = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        config = _config_from_metadata(path, metadata)
    else:
        state = load_checkpoint(path)
        config = TrainConfig.from_dict(state["config"])
        weights = state["model"]
    model = build_model(config.model, num_classes=len(get_spec(config.dataset).classes))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit model {config.model!r} "
                              f"({str(error).splitlines()[0]})") from None
    return to_device(model, device).eval(), config
