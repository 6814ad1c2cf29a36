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


def evaluate_saved(source: str | Path, *, device: torch.device | str = "cpu", data_dir: str | None = None,
                   dataset: str | None = None, split: str = "test", batch_size: int = 1000) -> dict[str, Any]:
    """Evaluate the trained model at `source` (see mnist_cnn.checkpoints.open_model) on
    `device` (resolved by the caller: the CLI, or mnist_cnn.api.evaluate_model) on a split of
    its data set (or `dataset`): the document `mnist-cnn evaluate --json` prints, accuracy
    exactly correct / total."""
    from mnist_cnn.catalog import get_spec
    from mnist_cnn.checkpoints import load_split_for, open_model

    loaded = open_model(source, device=device)
    name, _ = loaded.data_source(dataset, data_dir)
    data = load_split_for(loaded, split=split, dataset=dataset, data_dir=data_dir, device=device)
    classes = get_spec(name).classes
    evaluation = evaluate(loaded.model, data, loss=loaded.config.loss, batch_size=batch_size,
                          num_classes=len(classes))
    report = evaluation_report(evaluation, classes)
    report.update({"model": str(source), "dataset": name, "split": split})
    return report


def evaluate_ensemble(sources: list[str | Path], *, device: torch.device | str = "cpu",
                      data_dir: str | None = None, dataset: str | None = None, split: str = "test",
                      batch_size: int = 1000) -> dict[str, Any]:
    """Each model's exact accuracy, and the ensemble's: the argmax of the members' mean
    probabilities, all on `device` (resolved by the caller). The members must predict the
    same classes."""
    from mnist_cnn import MnistCnnError
    from mnist_cnn.catalog import get_spec
    from mnist_cnn.checkpoints import load_split_for, open_model

    members, mean_probabilities, data, name = [], None, None, None
    for source in sources:
        loaded = open_model(source, device=device)
        member_name, _ = loaded.data_source(dataset, data_dir)
        if name is not None and member_name != name:
            raise MnistCnnError(f"{source} is a {member_name} model, the others {name}; "
                                "an ensemble is evaluated on one data set (pass --dataset)")
        if data is None:
            name = member_name
            data = load_split_for(loaded, split=split, dataset=dataset, data_dir=data_dir, device=device)
        logits = split_logits(loaded.model, data, batch_size=batch_size)
        evaluation = evaluation_from_logits(logits, data.labels, loss=loaded.config.loss,
                                            num_classes=len(get_spec(name).classes), batch_size=batch_size)
        members.append({"model": str(source), "accuracy": evaluation.accuracy,
                        "correct": evaluation.correct, "total": evaluation.total})
        probabilities = torch.softmax(logits, dim=1).double()
        mean_probabilities = probabilities if mean_probabilities is None else mean_probabilities + probabilities
    classes = get_spec(name).classes
    mean_probabilities = mean_probabilities / len(sources)
    # The mean probability as the ensemble's prediction; its log gives a comparable loss.
    ensemble = evaluation_from_logits(mean_probabilities.clamp_min(1e-30).log().float(), data.labels,
                                      loss="ce", num_classes=len(classes), batch_size=batch_size)
    report = evaluation_report(ensemble, classes)
    report.update({"models": [str(s) for s in sources], "members": members, "dataset": name, "split": split})
    return report


def format_ensemble(report: dict[str, Any]) -> str:
    """An evaluate_ensemble report as the lines `mnist-cnn evaluate` prints: each member,
    then the ensemble."""
    lines = [f"ensemble of {len(report['members'])} models on {report['dataset']} {report['split']} split"]
    for member in report["members"]:
        lines.append(f"  {100 * member['accuracy']:6.2f}% ({member['correct']}/{member['total']})  {member['model']}")
    lines.append(f"  {100 * report['accuracy']:6.2f}% ({report['correct']}/{report['total']})  ensemble "
                 "(mean of the probabilities)")
    return "\n".join(lines)
