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

import torch
from torch import nn

from mnist_cnn import MnistCnnError, __version__
from mnist_cnn import checkpoints, runs
from mnist_cnn.catalog import get_spec

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": runs.ONNX_FILE, "torchscript": runs.TORCHSCRIPT_FILE}
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
OPSET = 18


class ProbabilityModel(nn.Module):
    """The trained network followed by softmax: what a serving runtime wants."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


def _servable(source: str | Path):
    loaded = checkpoints.open_model(source, device="cpu")
    model = loaded.model.to(memory_format=torch.contiguous_format)  # exporters want the plain layout
    return ProbabilityModel(model).eval(), loaded.config


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
    extra = {runs.CONFIG_FILE: json.dumps(config.to_dict()),  # the same name as in a run folder
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
        output = runs.model_folder(model_path) / DEFAULT_NAMES[format]
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
