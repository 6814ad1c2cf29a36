"""mnist-cnn: the classic MNIST CNN tutorial grown into a tool you can trust.

    from mnist_cnn import TrainConfig, train_model, evaluate_model, load_model, predict_images

Importing the package is cheap: each name loads its module (and torch) on first use. (The
functions are not called `train` and `evaluate`: those names are the package's modules.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


class MnistCnnError(Exception):
    """A problem the user can fix (bad path, corrupt file, invalid value).

    The CLI prints its message as one line on stderr and exits with status 2 (exits.USAGE),
    so the message must say what is wrong and, where possible, what to do.
    """


_API = {  # public name: (module, name there)
    "TrainConfig": ("mnist_cnn.config", "TrainConfig"),
    "train_model": ("mnist_cnn.train", "train"),
    "resume_training": ("mnist_cnn.train", "resume"),
    "evaluate_model": ("mnist_cnn.api", "evaluate_model"),
    "load_model": ("mnist_cnn.api", "load_model"),
    "predict_images": ("mnist_cnn.api", "predict_images"),
    "read_number": ("mnist_cnn.api", "read_number"),
}
__all__ = ["MnistCnnError", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'mnist_cnn' has no attribute {name!r}")
