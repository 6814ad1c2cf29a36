"""The run folder: its file names, creating it, its config and metrics, and finding the
newest finished run. Checkpoints and models inside it are mnist_cnn.checkpoints' job.

    runs/<timestamp>/
        config.json          the resolved recipe, data folder, machine, argv (at the start)
        metrics.jsonl        one JSON object per finished epoch
        checkpoint.pt        the resumable state, rewritten atomically after every epoch
        model.safetensors    the final weights, the config in its metadata
        model.json           config, final metrics and evaluation, environment
        (+ the pictures and report.html written by mnist_cnn.report)

Nothing here imports torch, so the torch-free paths (--help, onnxruntime prediction) can
use the names defined here.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from mnist_cnn import MnistCnnError
from mnist_cnn.fileio import atomic_write_text

RUNS_ROOT = Path("runs")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
MODEL_INFO_FILE = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.txt"
EXPLAIN_FILE = "explain.png"
LEARNING_CURVES_FILE = "learning_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
PER_CLASS_FILE = "per_class_accuracy.png"
MISCLASSIFIED_FILE = "misclassified.png"
SAMPLES_FILE = "samples.png"


class CheckpointError(MnistCnnError):
    """A run folder, checkpoint or model file that cannot be used."""


# ---------------------------------------------------------------- the folder


def create_run_dir(run_dir: str | Path | None = None) -> Path:
    """Create a new run folder (runs/<timestamp> by default); refuse one that already
    holds a run, since that would lose work."""
    if run_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, suffix = RUNS_ROOT / stamp, 1
        while run_dir.exists():
            suffix += 1
            run_dir = RUNS_ROOT / f"{stamp}-{suffix}"
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).exists() or (run_dir / METRICS_FILE).exists():
        raise CheckpointError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                              "or choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create run folder {run_dir}: {error.strerror}") from None
    return run_dir


def write_run_config(run_dir: Path, document: dict[str, Any]) -> None:
    """Write config.json (atomically): the resolved recipe and what the run started from."""
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(document, indent=2) + "\n")


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """config.json of a run folder, or None where there is none (or it is unreadable)."""
    try:
        document = json.loads((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


# ---------------------------------------------------------------- metrics


def write_metrics(run_dir: Path, metrics: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl (on resume, from the checkpoint: drops epochs a crash left behind)."""
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in metrics))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Add one finished epoch's record to metrics.jsonl."""
    with open(Path(run_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, one per finished epoch; CheckpointError naming the
    line when one is not JSON."""
    path = Path(run_dir) / METRICS_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: no {METRICS_FILE} (is it a run folder of mnist-cnn train?)") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise CheckpointError(f"{path}:{number}: not valid JSON") from None
    return records


# ---------------------------------------------------------------- finding runs and models


def model_folder(source: str | Path) -> Path:
    """The folder a model lives in: the run folder itself, or a model file's folder."""
    return Path(source) if Path(source).is_dir() else Path(source).parent


def newest_run(root: Path = RUNS_ROOT) -> Path | None:
    """The most recently finished run folder under `root` (one holding a model.safetensors)."""
    try:
        finished = [path.parent for path in root.glob(f"*/{MODEL_FILE}") if path.is_file()]
    except OSError:
        return None
    return max(finished, key=lambda folder: (folder / MODEL_FILE).stat().st_mtime, default=None)


