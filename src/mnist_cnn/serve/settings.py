"""What `mnist-cnn serve` was asked for: the server's limits are defined here, once.

Import-free on purpose (no FastAPI, no torch), so that the CLI's flags can use these values
without slowing `mnist-cnn --help`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 10_000_000  # a phone photo fits; a 200 MB upload does not
MAX_BATCH_FILES = 64
TOP_K = 3  # classes listed in a prediction's "top"
BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class ServeSettings:
    """The models to serve and the server's limits."""

    model_paths: tuple[Path, ...] = ()
    backend: str = "torch"  # torch | onnxruntime
    device: str = "auto"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies → 413, refused while streaming
    max_batch_files: int = MAX_BATCH_FILES  # files per /api/predict/batch request
    cors_origins: tuple[str, ...] = ()  # empty: CORS off
    worker_threads: int = max(1, os.cpu_count() or 1)  # threads decoding and predicting at once
