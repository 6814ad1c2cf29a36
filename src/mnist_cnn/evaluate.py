"""Exact evaluation: accuracy = correct / total, per-class figures, the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_cnn.data import Split, eval_batches
from mnist_cnn.losses import summed_loss


@dataclass
class Evaluation:
    """Counts from one pass over a split; every figure derives from them exactly."""

    loss_sum: float  # the loss summed over all images
    confusion: torch.Tensor  # int64 (classes, classes): rows = true label, columns = predicted

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(self.confusion.diagonal().sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def loss(self) -> float:
        """Mean loss per image."""
        return self.loss_sum / self.total if self.total else 0.0


def split_logits(model: nn.Module, split: Split, *, batch_size: int = 1000) -> torch.Tensor:
    """Float32 logits (N, classes) for every image of `split` in file order, on its device:
    one pass in eval mode under inference_mode."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x).float() for x, _ in eval_batches(split, batch_size)])
    model.train(was_training)
    return logits


def evaluation_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, loss: str = "kl",
                           num_classes: int = 10, batch_size: int = 1000) -> Evaluation:
    """Exact counts from logits; a single host sync at the end."""
    with torch.inference_mode():
        loss_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, len(labels), batch_size):  # summed per batch, then in float64
            chunk = slice(start, start + batch_size)
            loss_sum += summed_loss(loss, logits[chunk], labels[chunk]).double()
        confusion = torch.bincount(labels * num_classes + logits.argmax(dim=1),
                                   minlength=num_classes ** 2)
    return Evaluation(loss_sum=float(loss_sum), confusion=confusion.view(num_classes, num_classes).cpu())


def evaluate(model: nn.Module, split: Split, *, loss: str = "kl", batch_size: int = 1000,
             num_classes: int = 10) -> Evaluation:
    """Loss and confusion matrix of `model` on `split`."""
    return evaluation_from_logits(split_logits(model, split, batch_size=batch_size), split.labels,
                                  loss=loss, num_classes=num_classes, batch_size=batch_size)


def per_class(confusion: torch.Tensor, classes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Support, accuracy (= recall), precision and recall for each class."""
    rows = []
    for index, name in enumerate(classes):
        true_positive = int(confusion[index, index])
        support = int(confusion[index].sum())
        predicted = int(confusion[:, index].sum())
        recall = true_positive / support if support else 0.0
        rows.append({
            "class": index,
            "name": name,
            "support": support,
            "correct": true_positive,
            "accuracy": recall,
            "precision": true_positive / predicted if predicted else 0.0,
            "recall": recall,
        })
    return rows


def evaluation_report(evaluation: Evaluation, classes: tuple[str, ...]) -> dict[str, Any]:
    """The JSON document of `mnist-cnn evaluate --json`."""
    return {
        "accuracy": evaluation.accuracy,
        "correct": evaluation.correct,
        "total": evaluation.total,
        "loss": evaluation.loss,
        "per_class": per_class(evaluation.confusion, classes),
        "confusion_matrix": evaluation.confusion.tolist(),
    }


def format_report(report: dict[str, Any], *, title: str) -> str:
    """Human-readable tables: overall accuracy, per-class figures, confusion matrix."""
    lines = [title,
             f"accuracy {100 * report['accuracy']:.2f}% ({report['correct']}/{report['total']})"
             f"  mean loss {report['loss']:.4f}", ""]
    width = max(5, *(len(row["name"]) for row in report["per_class"]))
    lines.append(f"{'class':<{width}}  {'support':>7}  {'correct':>7}  {'accuracy':>8}  "
                 f"{'precision':>9}  {'recall':>7}")
    for row in report["per_class"]:
        lines.append(f"{row['name']:<{width}}  {row['support']:>7}  {row['correct']:>7}  "
                     f"{100 * row['accuracy']:>7.2f}%  {100 * row['precision']:>8.2f}%  "
                     f"{100 * row['recall']:>6.2f}%")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    matrix = report["confusion_matrix"]
    cell = max(4, len(str(max(max(row) for row in matrix))))
    lines.append("true\\pred " + " ".join(f"{index:>{cell}}" for index in range(len(matrix))))
    for index, row in enumerate(matrix):
        lines.append(f"{index:>9} " + " ".join(f"{count:>{cell}}" for count in row))
    return "\n".join(lines)


def evaluate_model(path: str | Path, *, data_dir: str | None = None, dataset: str | None = None,
                   split: str = "test", device: str = "auto", batch_size: int = 1000) -> dict[str, Any]:
    """Load a trained model and evaluate it on a split of its data set (or `dataset`)."""
    from mnist_cnn.checkpoint import load_model, saved_data_dir
    from mnist_cnn.data import get_spec, load_dataset
    from mnist_cnn.runtime import resolve_device

    target = resolve_device(device)
    model, config = load_model(path, device=target)
    name = dataset or config.dataset
    if dataset is None or dataset == config.dataset:
        data_dir = data_dir or saved_data_dir(path)
    data = load_dataset(name, data_dir, splits=(split,), device=target)
    classes = get_spec(name).classes
    evaluation = evaluate(model, data[split], loss=config.loss, batch_size=batch_size,
                          num_classes=len(classes))
    report = evaluation_report(evaluation, classes)
    report.update({"model": str(path), "dataset": name, "split": split})
    return report
