"""What a run leaves for people: plots, digit grids and one self-contained HTML report."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_cnn import checkpoints, runs
from mnist_cnn.config import TrainConfig
from mnist_cnn.catalog import get_spec
from mnist_cnn.data import Split
from mnist_cnn.evaluate import evaluation_from_logits, evaluation_report, split_logits
from mnist_cnn.fileio import atomic_write_text
from mnist_cnn.plots import (
    confusion_heatmap,
    digit_grid,
    learning_curves,
    per_class_chart,
    pick_grid_items,
)

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
    """`model`'s probabilities and evaluation report on `test`, with the images, for the
    plots and galleries."""
    classes = get_spec(config.dataset).classes
    logits = split_logits(model, test)
    evaluation = evaluation_from_logits(logits, test.labels, loss=config.loss, num_classes=len(classes))
    return SplitResults(
        config=config, classes=classes,
        images=test.images[:, 0].cpu().numpy(), labels=test.labels.cpu().numpy(),
        probabilities=torch.softmax(logits, dim=1).cpu().numpy(),
        report=evaluation_report(evaluation, classes),
    )


def load_split_results(source: str | Path, *, device: torch.device | str = "cpu", data_dir: str | None = None,
                       dataset: str | None = None) -> tuple[SplitResults, checkpoints.LoadedModel]:
    """A trained model on `device` (resolved by the caller) and its results on the test split
    of its data set (or `dataset`)."""
    loaded = checkpoints.open_model(source, device=device)
    test = checkpoints.load_split_for(loaded, dataset=dataset, data_dir=data_dir, device=device)
    config = TrainConfig.from_dict({**loaded.config.to_dict(), "dataset": loaded.data_source(dataset)[0]})
    return split_results(loaded.model, config, test), loaded


def show(source: str | Path, *, misclassified: bool = False, count: int = 36,
         output: str | Path | None = None, device: torch.device | str = "cpu", data_dir: str | None = None,
         dataset: str | None = None) -> tuple[Path, int]:
    """Draw test digits with true and predicted labels; returns the file and the number drawn."""
    results, _ = load_split_results(source, device=device, data_dir=data_dir, dataset=dataset)
    items = pick_grid_items(results.images, results.labels, results.probabilities,
                            misclassified=misclassified, count=count)
    if output is None:
        output = runs.model_folder(source) / (runs.MISCLASSIFIED_FILE if misclassified else runs.SAMPLES_FILE)
    wrong = int((results.probabilities.argmax(1) != results.labels).sum())
    title = (f"{len(items)} of {wrong} misclassified test images, most confident first (true>predicted)"
             if misclassified else f"first {len(items)} test images (true>predicted; mistakes in red)")
    return digit_grid(items, results.classes, Path(output), title=title), len(items)


def write_plots(run_dir: Path, results: SplitResults) -> list[Path]:
    """learning_curves.png, confusion_matrix.png and per_class_accuracy.png in the run folder."""
    paths = []
    metrics = runs.read_metrics(run_dir)
    if metrics:
        paths.append(learning_curves(metrics, run_dir / runs.LEARNING_CURVES_FILE))
    paths.append(confusion_heatmap(results.report["confusion_matrix"], results.classes,
                                   run_dir / runs.CONFUSION_MATRIX_FILE))
    paths.append(per_class_chart(results.report["per_class"], run_dir / runs.PER_CLASS_FILE))
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
    for heading, key in (("Learning curves", runs.LEARNING_CURVES_FILE),
                         ("Confusion matrix", runs.CONFUSION_MATRIX_FILE),
                         ("Per-class accuracy", runs.PER_CLASS_FILE)):
        if key in images:
            sections += [f"<h2>{heading}</h2>", _embedded(images[key], heading)]
    sections += ["<h2>Per class</h2>", _table(
        ["class", "support", "correct", "accuracy", "precision", "recall"],
        [[row["name"], row["support"], row["correct"], f"{100 * row['accuracy']:.2f}%",
          f"{100 * row['precision']:.2f}%", f"{100 * row['recall']:.2f}%"] for row in report["per_class"]])]
    if runs.MISCLASSIFIED_FILE in images:
        sections += ["<h2>Misclassified test images</h2>",
                     "<p>Most confident mistakes first; captions read true&gt;predicted (confidence).</p>",
                     _embedded(images[runs.MISCLASSIFIED_FILE], "misclassified test images")]
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
             "text-align:left}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def write_run_artifacts(run_dir: Path, results: SplitResults, model: nn.Module, *,
                        output: Path | None = None) -> Path:
    """Plots, the misclassified gallery, summary.txt, explain.png (test image #0) and
    report.html; returns the report's path."""
    from mnist_cnn.explain import explain_digit, explanation_figure, format_summary

    images = {path.name: path for path in write_plots(run_dir, results)}
    items = pick_grid_items(results.images, results.labels, results.probabilities,
                            misclassified=True, count=GALLERY_COUNT)
    wrong = int((results.probabilities.argmax(1) != results.labels).sum())
    images[runs.MISCLASSIFIED_FILE] = digit_grid(
        items, results.classes, run_dir / runs.MISCLASSIFIED_FILE,
        title=f"{len(items)} of {wrong} misclassified test images, most confident first (true>predicted)")
    atomic_write_text(run_dir / runs.SUMMARY_FILE,
                      format_summary(model, f"model {results.config.model!r}") + "\n")
    explanation_figure(explain_digit(model, results.images[0]), results.classes, run_dir / runs.EXPLAIN_FILE,
                       title=f"test image #0 (true: {results.classes[int(results.labels[0])]})")
    text = render_report(run_dir, results, runs.read_metrics(run_dir), checkpoints.read_model_info(run_dir), images)
    output = output or run_dir / runs.REPORT_FILE
    atomic_write_text(output, text)
    return output


def require_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, or CheckpointError if it is not a run folder holding a model
    or checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.CheckpointError(f"{run_dir}: no such run folder")
    checkpoints.resolve_model_path(run_dir)  # a clear error when it holds no model or checkpoint
    return run_dir


def plot_run(run_dir: str | Path, *, device: torch.device | str = "cpu",
             data_dir: str | None = None) -> list[Path]:
    """Redraw a run's three charts (learning curves, confusion matrix, per-class accuracy)
    into its folder."""
    run_dir = require_run_dir(run_dir)
    return write_plots(run_dir, load_split_results(run_dir, device=device, data_dir=data_dir)[0])


def report_run(run_dir: str | Path, *, output: str | Path | None = None,
               device: torch.device | str = "cpu", data_dir: str | None = None) -> Path:
    """Everything a run leaves for people, (re)drawn from its model: what `mnist-cnn train`
    calls after training and `mnist-cnn report` on demand."""
    run_dir = require_run_dir(run_dir)
    results, loaded = load_split_results(run_dir, device=device, data_dir=data_dir)
    return write_run_artifacts(run_dir, results, loaded.model, output=Path(output) if output else None)
