"""The models: the tutorial's CNN (`seed`) and a registry of named alternatives."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn import MnistCnnError


class SeedCNN(nn.Module):
    """The tutorial's network, layer for layer (names kept so its state dicts load).

        layer    kernel  in  out  stride  output
        conv1    5x5     1   6    1       (b, 6, 24, 24)
        pool1    2x2              2       (b, 6, 12, 12)
        conv2    5x5     6   16   1       (b, 16, 8, 8)
        pool2    2x2              2       (b, 16, 4, 4)
        flatten                           (b, 256)
        lin1             256 96           (b, 96)
        drop1    20 %
        lin2             96  10           (b, 10)

    Returns logits; the tutorial's final softmax lives in the loss (as log_softmax).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, stride=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, stride=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.lin1 = nn.Linear(16 * 4 * 4, 96)
        self.drop1 = nn.Dropout(dropout)
        self.lin2 = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tutorial applies ReLU then max-pool. Both are monotone, so they commute exactly
        # (same outputs, same gradients); pooling first runs the ReLU on 4x fewer values.
        x = F.relu(self.pool1(self.conv1(x)))  # (b, 6, 12, 12)
        x = F.relu(self.pool2(self.conv2(x)))  # (b, 16, 4, 4)
        x = self.flatten(x)  # (b, 256)
        x = F.relu(self.drop1(self.lin1(x)))  # (b, 96), dropout before ReLU as the tutorial has it
        return self.lin2(x)  # (b, 10) logits


MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed": SeedCNN,
}


def build_model(name: str = "seed", *, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model from the registry."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise MnistCnnError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    return factory(num_classes=num_classes)


def to_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move to `device` in the channels-last layout: measured ~20 % faster training and ~2x
    faster evaluation on CPU (oneDNN's convolutions prefer NHWC); inputs need no change, as a
    one-channel NCHW image is already channels-last."""
    return model.to(device=device, memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
