"""MNIST-format data: IDX files → verified uint8 tensors in memory → batches.

The whole data set is held once as a uint8 tensor on the target device; a batch is a
slice of a seeded per-epoch permutation, scaled to [0, 1] as the tutorial's ToTensor does.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mnist_cnn import MnistCnnError
from mnist_cnn.fileio import atomic_write_bytes, read_file

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IMAGE_SIZE = 28
PIXEL_SCALE = 255.0  # uint8 → [0, 1], exactly as torchvision's ToTensor
SHIPPED_DIR = Path(__file__).parent / "datasets"
SPLITS = ("train", "test")
FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(MnistCnnError):
    """Missing, corrupt or mismatched data files."""


@dataclass(frozen=True)
class DatasetSpec:
    """What we know of a published MNIST-format data set."""

    name: str
    title: str
    classes: tuple[str, ...]
    torchvision_folder: str  # the layout torchvision uses: ROOT/<folder>/raw/
    mirrors: tuple[str, ...] = ()  # base URLs, tried in order
    gz_md5: dict[str, str] = field(default_factory=dict)  # canonical .gz bytes from mirrors
    sha256: dict[str, str] = field(default_factory=dict)  # decompressed bytes
    counts: dict[str, int] = field(default_factory=dict)  # images per split
    shipped: bool = False  # a copy ships inside the package
    source: str = ""


DIGITS = tuple(str(d) for d in range(10))

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST",
        classes=DIGITS,
        torchvision_folder="MNIST",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        gz_md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        counts={"train": 60000, "test": 10000},
        shipped=True,
        source="Y. LeCun, C. Cortes, C. J. C. Burges; CC BY-SA 3.0",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        torchvision_folder="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        gz_md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        counts={"train": 60000, "test": 10000},
        source="Zalando Research; MIT (Debian package dataset-fashion-mnist)",
    ),
    # Any other MNIST-format files (10 classes, 28x28): format checks only, no checksums.
    "custom": DatasetSpec(name="custom", title="custom IDX", classes=DIGITS,
                          torchvision_folder="MNIST"),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


# ---------------------------------------------------------------- IDX files


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (detected by content, not by name)."""
    raw = read_file(path, error=DataError)
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path}: corrupt or truncated gzip file ({error}); "
                            "delete it and fetch it again") from None
    return raw


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes of unsigned bytes (type 0x08) into an array of the header's shape."""
    if len(data) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(f"{source}: not an IDX file of unsigned bytes (magic number {magic}, "
                        f"expected {IMAGE_MAGIC} for images or {LABEL_MAGIC} for labels)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(f"{source}: header says shape {shape} ({expected} bytes) "
                        f"but the file has {len(data)} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _magic(data: bytes) -> int:
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else -1


def parse_images(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    if _magic(data) != IMAGE_MAGIC:
        raise DataError(f"{source}: magic number {_magic(data)}, expected {IMAGE_MAGIC} "
                        "(an IDX file of images)")
    images = parse_idx(data, source=source)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    return images


def parse_labels(data: bytes, *, source: str = "<bytes>", num_classes: int = 10) -> np.ndarray:
    if _magic(data) != LABEL_MAGIC:
        raise DataError(f"{source}: magic number {_magic(data)}, expected {LABEL_MAGIC} "
                        "(an IDX file of labels)")
    labels = parse_idx(data, source=source)
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{source}: label {int(labels.max())} found, expected 0..{num_classes - 1}")
    return labels


def load_idx(path: Path) -> np.ndarray:
    """Read any IDX file of unsigned bytes, gzip or raw."""
    return parse_idx(read_bytes(path), source=str(path))


# ---------------------------------------------------------------- where data lives


def user_cache_dir() -> Path:
    if os.environ.get("MNIST_CNN_CACHE"):
        return Path(os.environ["MNIST_CNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist-cnn"


def find_file(folder: Path, stem: str) -> Path | None:
    """The IDX file `stem` in `folder`, raw or gzip, also under the '.'-separated names
    some copies use (train-images.idx3-ubyte)."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def find_files_in(root: Path, spec: DatasetSpec) -> dict[str, Path] | None:
    """All four files of `spec` in `root` or in torchvision's `root/<Name>/raw/`, else None."""
    for folder in (root, root / spec.torchvision_folder / "raw", root / "raw"):
        found = {stem: find_file(folder, stem) for stems in FILE_STEMS.values() for stem in stems}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def locate(spec: DatasetSpec, data_dir: str | Path | None = None, *,
           download: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Paths of the four IDX files: `data_dir` (or $MNIST_CNN_DATA), the shipped copy,
    the user cache, then a download into the cache."""
    explicit = data_dir or os.environ.get("MNIST_CNN_DATA")
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist")
        found = find_files_in(root, spec)
        if found:
            return found
        raise DataError(f"no {spec.title} IDX files in {root} (looked for "
                        f"train-images-idx3-ubyte[.gz] and the other three there and in "
                        f"{spec.torchvision_folder}/raw/)")
    candidates = [SHIPPED_DIR / spec.name] if spec.shipped else []
    candidates.append(user_cache_dir() / spec.name)
    for root in candidates:
        found = find_files_in(root, spec) if root.is_dir() else None
        if found:
            return found
    if spec.name == "custom":
        raise DataError("dataset 'custom' needs --data-dir (a folder with the four IDX files)")
    if not download:
        raise DataError(f"{spec.title} not found locally and downloading is off; "
                        "pass --data-dir or allow the download")
    target = user_cache_dir() / spec.name
    download_dataset(spec, target, log=log)
    found = find_files_in(target, spec)
    assert found is not None
    return found


# ---------------------------------------------------------------- download


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _fetch(url: str, *, timeout: float, progress: bool, label: str) -> bytes:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False,
                  disable=None if progress else True, file=sys.stderr) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return str(getattr(error, "reason", None) or error)


def mirror_list(spec: DatasetSpec) -> list[str]:
    """Mirrors to try, $MNIST_CNN_MIRRORS (comma-separated base URLs) first if set."""
    override = os.environ.get("MNIST_CNN_MIRRORS")
    if override:
        return [url.strip() for url in override.split(",") if url.strip()]
    return list(spec.mirrors)


def download_dataset(spec: DatasetSpec, target: Path, *, mirrors: list[str] | None = None,
                     timeout: float = 30.0, progress: bool = True,
                     log: Callable[[str], None] | None = None) -> None:
    """Fetch the four .gz files into `target`, verifying each one's canonical MD5 (and the
    decompressed SHA-256); a failing or corrupt mirror is skipped for the next one."""
    mirrors = mirror_list(spec) if mirrors is None else mirrors
    if not mirrors or not spec.gz_md5:
        raise DataError(f"no download mirrors are known for {spec.title}")
    target.mkdir(parents=True, exist_ok=True)
    log = log or (lambda message: print(message, file=sys.stderr))
    for stem, md5 in spec.gz_md5.items():
        destination = target / f"{stem}.gz"
        if destination.is_file():
            continue
        failures = []
        for base in mirrors:
            url = base.rstrip("/") + f"/{stem}.gz"
            try:
                data = _fetch(url, timeout=timeout, progress=progress, label=f"{stem}.gz")
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = _describe(error)
                failures.append(f"{url}: {reason}")
                log(f"download failed: {url}: {reason}; trying the next mirror")
                continue
            if _md5(data) != md5:
                failures.append(f"{url}: MD5 {_md5(data)} != {md5}")
                log(f"bad checksum from {url}; trying the next mirror")
                continue
            atomic_write_bytes(destination, data)
            break
        else:
            raise DataError(f"could not download {stem}.gz from any mirror "
                            f"({'; '.join(failures)}); pass --data-dir with a local copy")
    for stem in spec.gz_md5:
        verify(spec, stem, read_bytes(target / f"{stem}.gz"), source=str(target / f"{stem}.gz"))


# ---------------------------------------------------------------- verified splits


def verify(spec: DatasetSpec, stem: str, data: bytes, *, source: str) -> None:
    expected = spec.sha256.get(stem)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"{source}: SHA-256 {actual[:12]}… does not match {spec.title}'s "
                        f"{expected[:12]}…; the file is corrupt or another data set "
                        "(delete it, or choose the right --dataset)")


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
    image_stem, label_stem = FILE_STEMS[split]
    arrays = {}
    for stem, parse in ((image_stem, parse_images), (label_stem, parse_labels)):
        path = paths[stem]
        data = read_bytes(path)
        verify(spec, stem, data, source=str(path))
        arrays[stem] = parse(data, source=str(path))
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
    paths = locate(spec, data_dir, download=download, log=log)
    return {split: load_split(paths, split, spec).to(device) for split in splits}


# ---------------------------------------------------------------- batches


def scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → float32 in [0, 1]."""
    return images.float().div_(PIXEL_SCALE)


def epoch_permutation(size: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle order of `epoch`: a pure function of (seed, epoch), so that resuming needs
    only counters, and every process under torchrun computes the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int, start_step: int = 0,
                  rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of (x float in [0,1], y) for one epoch; the last one may be smaller.
    Under torchrun each rank takes its strided share of the same permutation."""
    order = epoch_permutation(len(split), seed=seed, epoch=epoch)[rank::world_size]
    order = order.to(split.labels.device)
    for start in range(start_step * batch_size, len(order), batch_size):
        index = order[start:start + batch_size]
        yield scale(split.images[index]), split.labels[index]


def steps_per_epoch(size: int, batch_size: int, world_size: int = 1) -> int:
    share = len(range(0, size, world_size))
    return -(-share // batch_size)


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches in file order, for evaluation."""
    for start in range(0, len(split), batch_size):
        yield scale(split.images[start:start + batch_size]), split.labels[start:start + batch_size]
