"""Export a trained model for serving elsewhere: ONNX (for ONNX Runtime) or TorchScript.

Both take a dynamic batch of images shaped (N, 1, 28, 28), float32 in [0, 1], white digit on
black and normalised as MNIST's (use `mnist_cnn.preprocess` on users' images), and return
(N, classes) probabilities.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnist_cnn import MnistCnnError, __version__
from mnist_cnn.checkpoint import CheckpointError, load_model
from mnist_cnn.data import get_spec

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
OPSET = 18


class ProbabilityModel(nn.Module):
    """The trained network followed by softmax: what a serving runtime wants."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


def _servable(model_path: str | Path):
    model, config = load_model(model_path, device="cpu")
    model = model.to(memory_format=torch.contiguous_format)  # exporters want the plain layout
    return ProbabilityModel(model).eval(), config


def export_onnx(wrapper: nn.Module, config, path: Path) -> Path:
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as error:
        raise MnistCnnError(f"ONNX export needs the onnx extras ({error.name} is missing): "
                            "pip install 'mnist-cnn[onnx]'") from None
    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    # The exporter reports progress on stdout and logs warnings about optional torchvision
    # operators; neither means anything to our users.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(wrapper, (example,), input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=OPSET,
                                        dynamic_shapes={"image": {0: batch}}, dynamo=True,
                                        verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    metadata = {
        "producer": f"mnist-cnn {__version__}",
        "classes": json.dumps(list(get_spec(config.dataset).classes)),
        "config": json.dumps(config.to_dict()),
        "input": "float32 (N, 1, 28, 28) in [0, 1], white digit on black, MNIST-normalised",
        "output": "float32 (N, classes) probabilities",
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def export_torchscript(wrapper: nn.Module, config, path: Path) -> Path:
    """A traced TorchScript module, with the config and class names as extra files.
    PyTorch deprecates TorchScript in favour of torch.export; it still loads in C++ (libtorch)
    and older runtimes, which is why users ask for it, so its warning is not repeated here."""
    extra = {"config.json": json.dumps(config.to_dict()),
             "classes.json": json.dumps(list(get_spec(config.dataset).classes))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(wrapper, torch.rand(2, 1, 28, 28))
        torch.jit.save(traced, str(path), _extra_files=extra)
    return path


def export_model(model_path: str | Path, *, format: str = "onnx", output: str | Path | None = None) -> Path:
    """Export the model in `model_path` (run folder or file); returns the written path."""
    if format not in FORMATS:
        raise MnistCnnError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    wrapper, config = _servable(model_path)
    if output is None:
        folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        output = folder / DEFAULT_NAMES[format]
    output = Path(output)
    if not output.parent.is_dir():
        raise MnistCnnError(f"--output {output}: folder {output.parent} does not exist")
    temporary = output.with_name(f".{output.name}.partial")
    try:
        (export_onnx if format == "onnx" else export_torchscript)(wrapper, config, temporary)
        temporary.replace(output)
    finally:
        temporary.unlink(missing_ok=True)
    return output


def resolve_onnx_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        if (path / DEFAULT_NAMES["onnx"]).is_file():
            return path / DEFAULT_NAMES["onnx"]
        raise CheckpointError(f"{path}: no {DEFAULT_NAMES['onnx']} here; create it with "
                              f"mnist-cnn export --model {path} --format onnx")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    return path


class OnnxPredictor:
    """An exported model under ONNX Runtime, with the same interface as TorchPredictor."""

    def __init__(self, model_path: str | Path, *, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise MnistCnnError("--backend onnxruntime needs onnxruntime: pip install 'mnist-cnn[onnx]'") from None
        path = resolve_onnx_path(model_path)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: not a loadable ONNX model "
                                  f"({str(error).strip().splitlines()[0][:200]})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes = tuple(json.loads(metadata["classes"]))
        except (KeyError, ValueError):
            self.classes = tuple(str(i) for i in range(self.session.get_outputs()[0].shape[1]))
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, 1, 28, 28) in [0, 1] → (N, classes) probabilities."""
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, digits: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        outputs = [self.run((digits[start:start + batch_size, None] / np.float32(255)).astype(np.float32))
                   for start in range(0, len(digits), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), np.float32)
