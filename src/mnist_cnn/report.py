"""What a run leaves for people: plots, digit grids and one self-contained HTML report."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_cnn import MnistCnnError
from mnist_cnn.checkpoint import MODEL_INFO_FILE, load_model, resolve_model_path, saved_data_dir
from mnist_cnn.config import TrainConfig
from mnist_cnn.data import Split, get_spec, load_dataset
from mnist_cnn.evaluate import evaluation_from_logits, evaluation_report, split_logits
from mnist_cnn.fileio import atomic_write_text
from mnist_cnn.plots import (
    CONFUSION_MATRIX,
    LEARNING_CURVES,
    MISCLASSIFIED,
    PER_CLASS,
    confusion_heatmap,
    digit_grid,
    learning_curves,
    per_class_chart,
    pick_grid_items,
    read_metrics,
)

REPORT_FILE = "report.html"
GALLERY_COUNT = 48


@dataclass
class SplitResults:
    """A model's view of its test split: everything the plots and the report draw on."""

    config: TrainConfig
    classes: tuple[str, ...]
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int (N,)
    probabilities: np.ndarray  # float32 (N, classes)
    report: dict[str, Any]  # as `mnist-cnn evaluate --json`


def split_results(model: nn.Module, config: TrainConfig, test: Split) -> SplitResults:
    classes = get_spec(config.dataset).classes
    logits = split_logits(model, test)
    evaluation = evaluation_from_logits(logits, test.labels, loss=config.loss, num_classes=len(classes))
    return SplitResults(
        config=config, classes=classes,
        images=test.images[:, 0].cpu().numpy(), labels=test.labels.cpu().numpy(),
        probabilities=torch.softmax(logits, dim=1).cpu().numpy(),
        report=evaluation_report(evaluation, classes),
    )


def load_split_results(model_path: str | Path, *, device: str = "auto", data_dir: str | None = None,
                      dataset: str | None = None) -> SplitResults:
    from mnist_cnn.runtime import resolve_device

    target = resolve_device(device)
    model, config = load_model(model_path, device=target)
    if dataset is None:
        data_dir = data_dir or saved_data_dir(model_path)
    if dataset:
        config = TrainConfig.from_dict({**config.to_dict(), "dataset": dataset})
    test = load_dataset(config.dataset, data_dir, splits=("test",), device=target)["test"]
    return split_results(model, config, test)


def show(model_path: str | Path, *, misclassified: bool = False, count: int = 36,
         output: str | Path | None = None, device: str = "auto", data_dir: str | None = None,
         dataset: str | None = None) -> tuple[Path, int]:
    """Draw test digits with true and predicted labels; returns the file and the number drawn."""
    results = load_split_results(model_path, device=device, data_dir=data_dir, dataset=dataset)
    items = pick_grid_items(results.images, results.labels, results.probabilities,
                            misclassified=misclassified, count=count)
    if output is None:
        folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        output = folder / (MISCLASSIFIED if misclassified else "samples.png")
    wrong = int((results.probabilities.argmax(1) != results.labels).sum())
    title = (f"{len(items)} of {wrong} misclassified test images, most confident first (true>predicted)"
             if misclassified else f"first {len(items)} test images (true>predicted; mistakes in red)")
    return digit_grid(items, results.classes, Path(output), title=title), len(items)


def write_plots(run_dir: Path, results: SplitResults) -> list[Path]:
    """learning_curves.png, confusion_matrix.png and per_class_accuracy.png in the run folder."""
    paths = []
    metrics = read_metrics(run_dir)
    if metrics:
        paths.append(learning_curves(metrics, run_dir / LEARNING_CURVES))
    paths.append(confusion_heatmap(results.report["confusion_matrix"], results.classes,
                                   run_dir / CONFUSION_MATRIX))
    paths.append(per_class_chart(results.report["per_class"], run_dir / PER_CLASS))
    return paths


def _embedded(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(headers: list[str] | None, rows: list[list[Any]]) -> str:
    """An HTML table; without headers, a key-value table whose first column is a header."""
    body = "".join(
        "<tr>" + "".join((f"<th>{html.escape(str(c))}</th>" if headers is None and i == 0 else
                          f"<td>{html.escape(str(c))}</td>") for i, c in enumerate(row)) + "</tr>"
        for row in rows)
    if headers is None:
        return f"<table><tbody>{body}</tbody></table>"
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(run_dir: Path, results: SplitResults, metrics: list[dict[str, Any]],
                  info: dict[str, Any], images: dict[str, Path]) -> str:
    report = results.report
    title = f"mnist-cnn run {run_dir.resolve().name}"
    summary = [
        ["test accuracy", f"{100 * report['accuracy']:.2f}% ({report['correct']}/{report['total']})"],
        ["mean test loss", f"{report['loss']:.4f}"],
        ["epochs", f"{len(metrics)} of {results.config.epochs}"],
        ["training time", f"{sum(r['seconds'] for r in metrics):.1f} s"],
        ["data set", get_spec(results.config.dataset).title],
    ]
    environment = info.get("environment", {})
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Result</h2>", _table(None, summary),
        "<h2>Recipe</h2>", _table(None, [[k, v] for k, v in results.config.to_dict().items()]),
    ]
    if environment:
        sections += ["<h2>Machine</h2>", _table(None, [[k, v] for k, v in environment.items()])]
    if metrics:
        sections += ["<h2>Per epoch</h2>", _table(
            ["epoch", "train loss", "test loss", "test accuracy", "seconds"],
            [[r["epoch"], f"{r['train_loss']:.4f}", f"{r['test_loss']:.4f}",
              f"{100 * r['test_accuracy']:.2f}%", f"{r['seconds']:.2f}"] for r in metrics])]
    for heading, key in (("Learning curves", LEARNING_CURVES), ("Confusion matrix", CONFUSION_MATRIX),
                         ("Per-class accuracy", PER_CLASS)):
        if key in images:
            sections += [f"<h2>{heading}</h2>", _embedded(images[key], heading)]
    sections += ["<h2>Per class</h2>", _table(
        ["class", "support", "correct", "accuracy", "precision", "recall"],
        [[row["name"], row["support"], row["correct"], f"{100 * row['accuracy']:.2f}%",
          f"{100 * row['precision']:.2f}%", f"{100 * row['recall']:.2f}%"] for row in report["per_class"]])]
    if MISCLASSIFIED in images:
        sections += ["<h2>Misclassified test images</h2>",
                     "<p>Most confident mistakes first; captions read true&gt;predicted (confidence).</p>",
                     _embedded(images[MISCLASSIFIED], "misclassified test images")]
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
             "text-align:left}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def write_run_artifacts(run_dir: Path, results: SplitResults, *, output: Path | None = None) -> Path:
    """Plots, the misclassified gallery and report.html; returns the report's path."""
    images = {path.name: path for path in write_plots(run_dir, results)}
    items = pick_grid_items(results.images, results.labels, results.probabilities,
                            misclassified=True, count=GALLERY_COUNT)
    wrong = int((results.probabilities.argmax(1) != results.labels).sum())
    images[MISCLASSIFIED] = digit_grid(
        items, results.classes, run_dir / MISCLASSIFIED,
        title=f"{len(items)} of {wrong} misclassified test images, most confident first (true>predicted)")
    info_path = run_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    text = render_report(run_dir, results, read_metrics(run_dir), info, images)
    output = output or run_dir / REPORT_FILE
    atomic_write_text(output, text)
    return output


def require_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MnistCnnError(f"{run_dir}: no such run folder")
    resolve_model_path(run_dir)  # a clear error when it holds no model or checkpoint
    return run_dir


def plot_run(run_dir: str | Path, *, device: str = "auto", data_dir: str | None = None) -> list[Path]:
    run_dir = require_run_dir(run_dir)
    return write_plots(run_dir, load_split_results(run_dir, device=device, data_dir=data_dir))


def report_run(run_dir: str | Path, *, output: str | Path | None = None, device: str = "auto",
               data_dir: str | None = None) -> Path:
    run_dir = require_run_dir(run_dir)
    results = load_split_results(run_dir, device=device, data_dir=data_dir)
    return write_run_artifacts(run_dir, results, output=Path(output) if output else None)

