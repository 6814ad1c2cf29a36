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
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier after the two conv blocks: features (b, 16, 4, 4) → logits (b, 10).
        (mnist_cnn.kernels computes the blocks differently while training, then calls this.)"""
        x = self.flatten(x)  # (b, 256)
        x = F.relu(self.drop1(self.lin1(x)))  # (b, 96), dropout before ReLU as the tutorial has it
        return self.lin2(x)  # (b, 10) logits


class BNCNN(nn.Module):
    """A small CNN with batch normalisation (`bn`): three conv-BN-ReLU blocks and a
    BN-ReLU-dropout head, about 2.4 M multiply-adds per image (the seed: 0.27 M).

        layer    kernel  in    out  padding  output
        conv1    5x5     1     24   0        (b, 24, 24, 24)  BN, ReLU, max-pool 2x2 → (b, 24, 12, 12)
        conv2    3x3     24    48   1        (b, 48, 12, 12)  BN, ReLU, max-pool 2x2 → (b, 48, 6, 6)
        conv3    3x3     48    64   0        (b, 64, 4, 4)    BN, ReLU
        flatten                              (b, 1024)
        lin1             1024  128           (b, 128)         BN, ReLU, dropout 30 %
        lin2             128   10            (b, 10)

    Convolutions and the hidden linear layer carry no bias: the batch norm after each has one.
    """

    WIDTHS = (24, 48, 64, 128)  # conv1, conv2, conv3 channels and lin1's outputs

    def __init__(self, num_classes: int = 10, dropout: float = 0.3, widths: tuple[int, int, int, int] | None = None):
        super().__init__()
        c1, c2, c3, hidden = widths or self.WIDTHS
        self.conv1 = nn.Conv2d(1, c1, kernel_size=5, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.flatten = nn.Flatten()
        self.lin1 = nn.Linear(c3 * 4 * 4, hidden, bias=False)
        self.bn4 = nn.BatchNorm1d(hidden)
        self.drop1 = nn.Dropout(dropout)
        self.lin2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))  # (b, 24, 12, 12)
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))  # (b, 48, 6, 6)
        x = F.relu(self.bn3(self.conv3(x)))  # (b, 64, 4, 4)
        x = self.flatten(x)  # (b, 1024)
        x = self.drop1(F.relu(self.bn4(self.lin1(x))))  # (b, 128)
        return self.lin2(x)  # (b, 10) logits


class WideBNCNN(BNCNN):
    """`bn` twice as wide (`bn-wide`): 48, 96, 128 channels and 256 hidden units, about
    9 M multiply-adds per image: the network of `--preset best` and `best-fashion` (clothes'
    textures are what a narrow first layer misses most)."""

    WIDTHS = (48, 96, 128, 256)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "seed": SeedCNN,
    "bn": BNCNN,
    "bn-wide": WideBNCNN,
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
    """The number of parameters (weights and biases) of `model`."""
    return sum(p.numel() for p in model.parameters())
