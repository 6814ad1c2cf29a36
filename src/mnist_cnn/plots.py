"""Pictures of a run: learning curves, confusion matrix, per-class accuracy, digit grids.

Charts use matplotlib's Agg backend (no display needed); digit grids are composed with
Pillow, which is faster for hundreds of small images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


MISTAKE_COLOR = (220, 30, 30)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(metrics: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    epochs = [r["epoch"] for r in metrics]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [r["train_loss"] for r in metrics], "o-", label="train loss")
    loss_axes.plot(epochs, [r["test_loss"] for r in metrics], "o-", label="test loss")
    loss_axes.set(xlabel="epoch", ylabel="loss per image", title="Loss", yscale="log")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [100 * r["test_accuracy"] for r in metrics], "o-", color="tab:green")
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)",
                      title=f"Test accuracy (final {100 * metrics[-1]['test_accuracy']:.2f}%)")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def confusion_heatmap(confusion: list[list[int]], classes: tuple[str, ...], path: Path) -> Path:
    plt = _pyplot()
    matrix = np.asarray(confusion)
    figure, axes = plt.subplots(figsize=(7, 6))
    # Log colour scale: the diagonal (~1000) would otherwise wash out the mistakes (~1-30).
    from matplotlib.colors import LogNorm

    image = axes.imshow(matrix + 1, cmap="Blues", norm=LogNorm(vmin=1, vmax=matrix.max() + 1))
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            axes.text(col, row, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > matrix.max() / 4 else "black")
    axes.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted",
             ylabel="true", title="Confusion matrix (test set)")
    axes.set_xticklabels(classes, rotation=45 if len(max(classes, key=len)) > 2 else 0)
    axes.set_yticklabels(classes)
    figure.colorbar(image, ax=axes, label="count + 1 (log scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def per_class_chart(per_class: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    accuracies = [100 * row["accuracy"] for row in per_class]
    names = [row["name"] for row in per_class]
    bars = axes.bar(range(len(names)), accuracies, color="tab:blue")
    for bar, value in zip(bars, accuracies):
        axes.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.1f}", ha="center",
                  va="bottom", fontsize=8)
    low = min(accuracies)
    axes.set(ylim=(max(0, low - 5), 100.5), xticks=range(len(names)), ylabel="accuracy (%)",
             title="Per-class test accuracy (recall)")
    axes.set_xticklabels(names, rotation=45 if len(max(names, key=len)) > 2 else 0)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@dataclass
class GridItem:
    image: np.ndarray  # uint8 (28, 28)
    true: int | None  # None for images without a label
    predicted: int
    confidence: float


def digit_grid(items: list[GridItem], classes: tuple[str, ...], path: Path, *,
               title: str, scale: int = 3, columns: int | None = None) -> Path:
    """A grid of digits, each captioned 'true → predicted (confidence)'; mistakes are framed
    and captioned in red."""
    try:
        font = ImageFont.load_default(size=13)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    columns = columns or max(1, min(10, int(np.ceil(np.sqrt(len(items) or 1)))))
    rows = max(1, -(-len(items) // columns))
    cell, caption, pad = 28 * scale, 16, 6
    width = columns * (cell + pad) + pad
    height = 24 + rows * (cell + caption + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill="black", font=font)
    short = all(len(name) <= 2 for name in classes)
    for index, item in enumerate(items):
        x = pad + (index % columns) * (cell + pad)
        y = 24 + (index // columns) * (cell + caption + pad)
        digit = Image.fromarray(item.image).resize((cell, cell), Image.Resampling.NEAREST)
        canvas.paste(digit.convert("RGB"), (x, y))
        wrong = item.true is not None and item.true != item.predicted
        if wrong:
            draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=MISTAKE_COLOR, width=2)
        name = (lambda i: classes[i]) if short else (lambda i: str(i))
        text = (f"{name(item.true)}>" if item.true is not None else "") + \
            f"{name(item.predicted)} {100 * min(item.confidence, 0.999):.1f}%"
        draw.text((x, y + cell + 1), text, fill=MISTAKE_COLOR if wrong else "black", font=font)
    canvas.save(path)
    return path


def pick_grid_items(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, *,
                    misclassified: bool, count: int) -> list[GridItem]:
    """The first `count` test images, or the `count` mistakes made most confidently."""
    predicted = probabilities.argmax(1)
    confidence = probabilities.max(1)
    if misclassified:
        wrong = np.flatnonzero(predicted != labels)
        order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    else:
        order = np.arange(min(count, len(labels)))
    return [GridItem(images[i], int(labels[i]), int(predicted[i]), float(confidence[i])) for i in order]
