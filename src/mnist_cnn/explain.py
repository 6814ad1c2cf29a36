"""Look inside a model: its layer table, and what it sees in one image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnist_cnn.data import scale
from mnist_cnn.idx import IMAGE_SIZE
from mnist_cnn.model import MODELS, build_model, count_parameters


@dataclass
class LayerRow:
    name: str
    kind: str
    kernel: str
    channels: str
    stride: str
    padding: str
    output: tuple[int, ...]
    parameters: int
    multiply_adds: int = 0  # per image: convolutions and linear layers


def _pair(value, *, collapse: bool = False) -> str:
    """(5, 5) → '5x5'; with collapse, (0, 0) → '0' as the tutorial's table writes padding."""
    value = value if isinstance(value, tuple) else (value, value)
    if collapse and len(set(value)) == 1:
        return str(value[0])
    return "x".join(str(v) for v in value)


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One row per leaf module, in the order the forward pass calls them, with the output
    shape measured on a real (1, 1, 28, 28) input."""
    rows: list[LayerRow] = []
    names = {module: name for name, module in model.named_modules()}

    def record(module: nn.Module, inputs, output) -> None:
        kernel = channels = stride = padding = ""
        if isinstance(module, nn.Conv2d):
            kernel, stride, padding = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding, collapse=True)
            channels = f"{module.in_channels}->{module.out_channels}"
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            kernel, stride, padding = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding, collapse=True)
        elif isinstance(module, nn.Linear):
            channels = f"{module.in_features}->{module.out_features}"
        elif isinstance(module, nn.Dropout):
            kernel = f"p={module.p}"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            channels = str(module.num_features)
        macs = 0
        if isinstance(module, nn.Conv2d):  # one multiply-add per weight per output position
            macs = output[0].numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            macs = output[0].numel() * module.in_features
        rows.append(LayerRow(names[module], type(module).__name__, kernel, channels, stride, padding,
                             tuple(output.shape[1:]), sum(p.numel() for p in module.parameters()), macs))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        # with autograd on: the model then calls every layer as a module (under inference_mode
        # the seed model pools with mnist_cnn.kernels, and its pooling layers would not show)
        with torch.enable_grad():
            model(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows


def format_summary(model: nn.Module, title: str) -> str:
    rows = layer_rows(model)
    headers = ["layer", "type", "kernel", "channels", "stride", "padding", "output shape", "parameters"]
    cells = [[r.name, r.kind, r.kernel, r.channels, r.stride, r.padding,
              "(b, " + ", ".join(map(str, r.output)) + ")", f"{r.parameters:,}"] for r in rows]
    cells.append(["total", "", "", "", "", "", "", f"{count_parameters(model):,}"])
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(  # noqa: E731
        cell.rjust(width) if index == len(row) - 1 else cell.ljust(width)
        for index, (cell, width) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([title, "input (b, 1, 28, 28)", line(headers), *map(line, cells),
                      f"multiply-adds per image: {sum(r.multiply_adds for r in rows):,}"])


def multiply_adds(model: nn.Module) -> int:
    """Multiply-adds of one forward pass per image (convolutions and linear layers)."""
    return sum(row.multiply_adds for row in layer_rows(model))


def summary(model: str | Path = "seed") -> str:
    """The layer table of a registered model name, a run folder or a model file."""
    if str(model) in MODELS:
        return format_summary(build_model(str(model)), f"model {model!r}")
    from mnist_cnn.checkpoints import open_model

    loaded = open_model(model, device="cpu")
    return format_summary(loaded.model, f"model {loaded.config.model!r} from {model}")


@dataclass
class Explanation:
    """What explain_digit found for one digit: the input, the class probabilities, each
    conv layer's feature maps and a saliency map."""

    digit: np.ndarray  # uint8 (28, 28): what the model saw
    probabilities: np.ndarray  # (classes,)
    feature_maps: dict[str, np.ndarray]  # conv layer name → (channels, h, w)
    saliency: np.ndarray  # (28, 28), |d logit[predicted] / d pixel|, scaled to [0, 1]

    @property
    def predicted(self) -> int:
        return int(self.probabilities.argmax())


def explain_digit(model: nn.Module, digit: np.ndarray) -> Explanation:
    """Run `model` on one uint8 digit, recording each convolution's output and the
    gradient of the predicted class's logit with respect to the pixels."""
    device = next(model.parameters()).device
    model.eval()
    maps: dict[str, np.ndarray] = {}
    convs = {module: name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    hooks = [module.register_forward_hook(
        lambda m, i, out: maps.__setitem__(convs[m], out[0].detach().float().cpu().numpy()))
        for module in convs]
    try:
        x = scale(torch.from_numpy(np.ascontiguousarray(digit))[None, None].to(device)).requires_grad_(True)
        logits = model(x)
        predicted = int(logits.argmax())
        logits[0, predicted].backward()
    finally:
        for hook in hooks:
            hook.remove()
    saliency = x.grad[0, 0].abs().cpu().numpy()
    saliency = saliency / saliency.max() if saliency.max() > 0 else saliency
    probabilities = torch.softmax(logits.detach().float(), dim=1)[0].cpu().numpy()
    return Explanation(digit, probabilities, maps, saliency)


def explanation_figure(explanation: Explanation, classes: tuple[str, ...], path: Path,
                       title: str = "") -> Path:
    """Draw an Explanation (input, saliency, probabilities, feature maps) into a PNG at
    `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(explanation.feature_maps.items())
    columns = 8
    map_rows = [(name, i, maps[i:i + columns]) for name, maps in layers for i in range(0, len(maps), columns)]
    figure = plt.figure(figsize=(12, 3.2 + 1.5 * len(map_rows)))
    grid = figure.add_gridspec(1 + len(map_rows), columns, height_ratios=[2.2] + [1] * len(map_rows))
    predicted = explanation.predicted
    ax = figure.add_subplot(grid[0, 0:2])
    ax.imshow(explanation.digit, cmap="gray", vmin=0, vmax=255)
    ax.set_title("model input (28x28)")
    ax.axis("off")
    ax = figure.add_subplot(grid[0, 2:4])
    ax.imshow(explanation.digit, cmap="gray", vmin=0, vmax=255)
    ax.imshow(explanation.saliency, cmap="inferno", alpha=0.6)
    ax.set_title(f"saliency for '{classes[predicted]}'")
    ax.axis("off")
    ax = figure.add_subplot(grid[0, 4:])
    colors = ["tab:green" if i == predicted else "tab:gray" for i in range(len(classes))]
    ax.barh(range(len(classes)), explanation.probabilities, color=colors)
    ax.set(yticks=range(len(classes)), yticklabels=classes, xlim=(0, 1), xlabel="probability",
           title=f"prediction: {classes[predicted]} ({100 * explanation.probabilities[predicted]:.1f}%)")
    ax.invert_yaxis()
    for row, (name, offset, maps) in enumerate(map_rows, start=1):
        for column, feature in enumerate(maps):
            ax = figure.add_subplot(grid[row, column])
            ax.imshow(feature, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} #{offset + column}", fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def explain(source: str | Path, *, image: str | Path | None = None, test_index: int | None = None,
            output: str | Path | None = None, device: torch.device | str = "cpu",
            data_dir: str | None = None) -> tuple[Path, Explanation]:
    """Explain one user image (preprocessed as for predict) or one test image by index, with
    the model at `source` on `device` (resolved by the caller)."""
    from mnist_cnn import MnistCnnError
    from mnist_cnn.preprocess import preprocess_file
    from mnist_cnn.checkpoints import load_split_for, open_model

    loaded = open_model(source, device=device)
    if image is not None:
        digit, label = preprocess_file(image), Path(image).name
        default = Path(f"{Path(image).stem}-explain.png")
    else:
        test = load_split_for(loaded, data_dir=data_dir)
        index = test_index or 0
        if not 0 <= index < len(test):
            raise MnistCnnError(f"--test-index must be in 0..{len(test) - 1}")
        digit = test.images[index, 0].numpy()
        label = f"test image #{index} (true: {loaded.classes[int(test.labels[index])]})"
        default = Path(f"test-{index}-explain.png")
    explanation = explain_digit(loaded.model, digit)
    path = explanation_figure(explanation, loaded.classes, Path(output) if output else default, title=label)
    return path, explanation
