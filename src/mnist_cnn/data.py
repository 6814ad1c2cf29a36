"""MNIST-format data in memory: verified splits as uint8 tensors, and their batches.

The whole data set is held once as a uint8 tensor on the target device; a batch is a
slice of a seeded per-epoch permutation, scaled to [0, 1] as the tutorial's ToTensor does.
The file format lives in mnist_cnn.idx, the known data sets and their files in
mnist_cnn.catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from mnist_cnn.catalog import SPLITS, DatasetSpec, get_spec, locate, verify
from mnist_cnn.idx import DataError, parse_images, parse_labels, read_bytes

if TYPE_CHECKING:  # torch is imported where tensors are made: the torch-free paths
    import torch  # (onnxruntime prediction, --help) import this module too

PIXEL_SCALE = 255.0  # uint8 → [0, 1], exactly as torchvision's ToTensor


@dataclass
class Split:
    """One split held in memory: images uint8 (N, 1, 28, 28), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


def load_split(paths: dict[str, Path], split: str, spec: DatasetSpec) -> Split:
    """One split read from `paths` (found by catalog.locate), checked against `spec`'s
    checksums and format; images and labels must be as many."""
    image_stem, label_stem = spec.files[split]
    parse_spec_labels = partial(parse_labels, num_classes=len(spec.classes),
                                column=spec.label_column)
    arrays = {}
    for stem, parse in ((image_stem, parse_images), (label_stem, parse_spec_labels)):
        path = paths[stem]
        data = read_bytes(path)
        verify(spec, stem, data, source=str(path))
        arrays[stem] = parse(data, source=str(path))
    import torch

    images, labels = arrays[image_stem], arrays[label_stem]
    if len(images) != len(labels):
        raise DataError(f"{paths[image_stem]} holds {len(images)} images but "
                        f"{paths[label_stem]} holds {len(labels)} labels; they must match")
    return Split(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
    )


def load_dataset(name: str = "mnist", data_dir: str | Path | None = None, *,
                 splits: tuple[str, ...] = SPLITS, device: torch.device | str = "cpu",
                 download: bool = True,
                 log: Callable[[str], None] | None = None) -> dict[str, Split]:
    """Verified splits of data set `name`, each as one uint8 tensor on `device`."""
    spec = get_spec(name)
    paths = locate(spec, data_dir, splits=splits, download=download, log=log)
    return {split: load_split(paths, split, spec).to(device) for split in splits}


# ---------------------------------------------------------------- batches


def scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [0, 1]."""
    return images.float().div_(PIXEL_SCALE)


def scale_array(images: np.ndarray) -> np.ndarray:
    """The same scaling for numpy arrays (the torch-free inference path)."""
    return images.astype(np.float32) / np.float32(PIXEL_SCALE)


def epoch_permutation(size: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle order of `epoch`: a pure function of (seed, epoch), so that resuming needs
    only counters, and every process under torchrun computes the same order."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def hold_out(split: Split, size: int, *, seed: int) -> tuple[Split, Split]:
    """(rest, held out): `size` images chosen by `seed` alone, with their own generator (not
    the epoch shuffle's), so every process and every resume holds out the same images; both
    parts keep file order."""
    import torch

    if not 0 < size < len(split):
        raise DataError(f"--val-size {size} must be between 1 and {len(split) - 1} "
                        f"(the training split holds {len(split)} images)")
    generator = torch.Generator().manual_seed(0x5EED_7A1 + seed)
    chosen = torch.zeros(len(split), dtype=torch.bool)
    chosen[torch.randperm(len(split), generator=generator)[:size]] = True
    chosen = chosen.to(split.labels.device)
    return (Split(split.images[~chosen], split.labels[~chosen]),
            Split(split.images[chosen], split.labels[chosen]))


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int, start_step: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of (x float in [0,1], y) for one epoch; the last one may be smaller.
    `batch_size` is the global batch: under torchrun every step takes the same slice of the
    same permutation on every rank, and rank r keeps entries r, r + W, ... of it."""
    order = epoch_permutation(len(split), seed=seed, epoch=epoch)
    order = order.to(split.labels.device)
    for start in range(start_step * batch_size, len(order), batch_size):
        index = order[start:start + batch_size][rank::world_size]
        yield scale(split.images[index]), split.labels[index]


def steps_per_epoch(size: int, batch_size: int) -> int:
    """Optimizer steps per epoch, at any number of processes (the batch is global)."""
    return -(-size // batch_size)


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches in file order, for evaluation."""
    for start in range(0, len(split), batch_size):
        yield scale(split.images[start:start + batch_size]), split.labels[start:start + batch_size]
