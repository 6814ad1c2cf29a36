"""MNIST-format data: IDX files → verified uint8 tensors in memory → batches.

The whole data set is held once as a uint8 tensor on the target device; a batch is a
slice of a seeded per-epoch permutation, scaled to [0, 1] as the tutorial's ToTensor does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from typing import TYPE_CHECKING

import numpy as np

from mnist_cnn import MnistCnnError
from mnist_cnn.fileio import atomic_write_bytes, read_file

if TYPE_CHECKING:  # torch is imported where tensors are made: the torch-free paths
    import torch  # (onnxruntime prediction, --help) import this module too

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
INT_LABEL_MAGIC = 3074  # 0x00000C02: big-endian int32, 2 dimensions (QMNIST's extended labels)
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}  # the IDX type codes we read
IMAGE_SIZE = 28
PIXEL_SCALE = 255.0  # uint8 → [0, 1], exactly as torchvision's ToTensor
MAX_IDX_BYTES = 1 << 30  # an IDX file, raw or after gunzip (MNIST's largest: 47,040,016)
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
    files: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(FILE_STEMS))
    # ^ per split: (images, labels) file names without .gz
    label_column: int | None = None  # labels are 2-D int32 (N, K); this column is the class
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
    # MD5s as torchvision's KMNIST.resources lists them; no SHA-256 is published.
    "kmnist": DatasetSpec(
        name="kmnist",
        title="Kuzushiji-MNIST",
        # Romanised, in the order of the official kmnist_classmap.csv:
        # お き す つ な は ま や れ を (U+304A ... U+3092).
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        torchvision_folder="KMNIST",
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        gz_md5={
            "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        counts={"train": 60000, "test": 10000},
        source="CODH (ROIS-DS), Clanuwat et al. 2018, arXiv:1812.01718; CC BY-SA 4.0",
    ),
    # MD5s as torchvision's QMNIST.resources lists them. The labels' SHA-256 are of the
    # files in github.com/facebookresearch/qmnist whose .gz MD5s match those; the images'
    # (stored there in Git LFS) are not known to us, so they get the MD5 check only.
    "qmnist": DatasetSpec(
        name="qmnist",
        title="QMNIST",
        classes=DIGITS,  # the same classes as MNIST: an MNIST model evaluates on it as is
        torchvision_folder="QMNIST",
        files={
            "train": ("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int"),
            "test": ("qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int"),
        },
        label_column=0,  # columns 1-7: NIST series, writer, index, class code, ...
        mirrors=("https://raw.githubusercontent.com/facebookresearch/qmnist/master/",),
        gz_md5={
            "qmnist-train-images-idx3-ubyte": "ed72d4157d28c017586c42bc6afe6370",
            "qmnist-train-labels-idx2-int": "0058f8dd561b90ffdd0f734c6a30e5e4",
            "qmnist-test-images-idx3-ubyte": "1394631089c404de565df7b7aeaf9412",
            "qmnist-test-labels-idx2-int": "5b5b05890a5e13444e108efe57b788aa",
        },
        sha256={
            "qmnist-train-labels-idx2-int": "bb1b6e1ec7b04fd5696f1ed50b5f58f8ef195118edd5c93c81783df9740b8ac5",
            "qmnist-test-labels-idx2-int": "92d0ccb8c25f9c6534270fb4be7e1d24a1c6d315edfc8a638bfbd31c70f362dd",
        },
        # The test file: MNIST's 10,000 test digits reconstructed, then the 50,000 never published.
        counts={"train": 60000, "test": 60000},
        source="C. Yadav, L. Bottou, 'Cold Case: The Lost MNIST Digits', NeurIPS 2019; BSD licence",
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


def read_bytes(path: Path, *, max_bytes: int | None = None) -> bytes:
    """The file's bytes, gunzipped when it is gzip (detected by content, not by name); the
    file and its decompressed content are refused over `max_bytes` (default MAX_IDX_BYTES)."""
    limit = MAX_IDX_BYTES if max_bytes is None else max_bytes
    raw = read_file(path, error=DataError, max_bytes=limit)
    if raw[:2] != b"\x1f\x8b":
        return raw
    chunks, total = [], 0
    try:
        # Decompressed a chunk at a time: a small gzip bomb must not inflate without bound.
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise DataError(f"{path}: decompresses to more than {limit:,} bytes; "
                                    "refused (not an MNIST-size data file)")
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt or truncated gzip file ({error}); "
                        "delete it and fetch it again") from None
    return b"".join(chunks)


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes of unsigned bytes (type 0x08) or big-endian int32 (type 0x0C) into
    an array of the header's shape: uint8, or int32 in native byte order."""
    if len(data) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code not in IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(f"{source}: not an IDX file of unsigned bytes or int32 (magic number "
                        f"{magic}, expected {IMAGE_MAGIC} for images or {LABEL_MAGIC} or "
                        f"{INT_LABEL_MAGIC} for labels)")
    dtype = IDX_DTYPES[dtype_code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize  # exact: int64 would wrap around
    if len(data) != expected:
        raise DataError(f"{source}: header says shape {shape} ({expected} bytes) "
                        f"but the file has {len(data)} bytes (truncated or corrupt)")
    try:
        array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    except ValueError as error:  # over numpy's 32/64 dimensions, or 0 x huge dimensions
        raise DataError(f"{source}: IDX shape {shape} cannot be held in an array ({error})") from None
    return array if dtype == np.uint8 else array.astype(np.int32)


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


def parse_labels(data: bytes, *, source: str = "<bytes>", num_classes: int = 10,
                 column: int | None = None) -> np.ndarray:
    """Class labels (N,): from an IDX file of unsigned bytes (N,), or with `column` from
    column `column` of an IDX file of int32 (N, K), as QMNIST's extended labels."""
    magic = LABEL_MAGIC if column is None else INT_LABEL_MAGIC
    if _magic(data) != magic:
        kind = "labels" if column is None else "int32 labels of 2 dimensions"
        raise DataError(f"{source}: magic number {_magic(data)}, expected {magic} "
                        f"(an IDX file of {kind})")
    labels = parse_idx(data, source=source)
    if column is not None:
        if labels.shape[1] <= column:
            raise DataError(f"{source}: labels have {labels.shape[1]} columns, expected the "
                            f"class in column {column}")
        labels = labels[:, column]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
        raise DataError(f"{source}: label {bad} found, expected 0..{num_classes - 1}")
    return labels


def load_idx(path: Path) -> np.ndarray:
    """Read any IDX file of unsigned bytes or int32, gzip or raw."""
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


def split_stems(spec: DatasetSpec, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """The file names (without .gz) that `splits` of `spec` need: images, labels per split."""
    return [stem for split in splits for stem in spec.files[split]]


def find_files_in(root: Path, spec: DatasetSpec, *,
                  splits: tuple[str, ...] = SPLITS) -> dict[str, Path] | None:
    """The files of `splits` of `spec` in `root` or in torchvision's `root/<Name>/raw/`,
    all in one folder, else None."""
    for folder in (root, root / spec.torchvision_folder / "raw", root / "raw"):
        found = {stem: find_file(folder, stem) for stem in split_stems(spec, splits)}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def locate(spec: DatasetSpec, data_dir: str | Path | None = None, *,
           splits: tuple[str, ...] = SPLITS, download: bool = True,
           log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Paths of the IDX files of `splits`: `data_dir` (or $MNIST_CNN_DATA), the shipped
    copy, the user cache, then a download (of those splits only) into the cache."""
    explicit = data_dir or os.environ.get("MNIST_CNN_DATA")
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist")
        found = find_files_in(root, spec, splits=splits)
        if found:
            return found
        wanted = ", ".join(f"{stem}[.gz]" for stem in split_stems(spec, splits))
        raise DataError(f"no {spec.title} IDX files in {root} (looked for {wanted} there "
                        f"and in {spec.torchvision_folder}/raw/)")
    candidates = [SHIPPED_DIR / spec.name] if spec.shipped else []
    candidates.append(user_cache_dir() / spec.name)
    for root in candidates:
        found = find_files_in(root, spec, splits=splits) if root.is_dir() else None
        if found:
            return found
    if spec.name == "custom":
        raise DataError("dataset 'custom' needs --data-dir (a folder with the four IDX files)")
    if not download:
        raise DataError(f"{spec.title} not found locally and downloading is off; "
                        "pass --data-dir or allow the download")
    target = user_cache_dir() / spec.name
    download_dataset(spec, target, splits=splits, log=log)
    found = find_files_in(target, spec, splits=splits)
    assert found is not None
    return found


# ---------------------------------------------------------------- download


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# urllib.request is imported where a download happens: it pulls in http.client and email
# (~30 ms), which every command that reads the data (and predict, via IMAGE_SIZE) would pay.

def _fetch(url: str, *, timeout: float, progress: bool, label: str) -> bytes:
    import urllib.request

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
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    return str(getattr(error, "reason", None) or error)


def mirror_list(spec: DatasetSpec) -> list[str]:
    """Mirrors to try, $MNIST_CNN_MIRRORS (comma-separated base URLs) first if set."""
    override = os.environ.get("MNIST_CNN_MIRRORS")
    if override:
        return [url.strip() for url in override.split(",") if url.strip()]
    return list(spec.mirrors)


def download_dataset(spec: DatasetSpec, target: Path, *, splits: tuple[str, ...] = SPLITS,
                     mirrors: list[str] | None = None, timeout: float = 30.0,
                     progress: bool = True, log: Callable[[str], None] | None = None) -> None:
    """Fetch the .gz files of `splits` into `target`, verifying each one's canonical MD5 (and
    the decompressed SHA-256); a failing or corrupt mirror is skipped for the next one."""
    import urllib.error

    mirrors = mirror_list(spec) if mirrors is None else mirrors
    stems = split_stems(spec, splits)
    if not mirrors or not all(stem in spec.gz_md5 for stem in stems):
        raise DataError(f"no download mirrors are known for {spec.title}")
    target.mkdir(parents=True, exist_ok=True)
    log = log or (lambda message: print(message, file=sys.stderr))
    for stem in stems:
        md5 = spec.gz_md5[stem]
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
                log(f"bad checksum from {url} (MD5 {_md5(data)}, expected {md5}); "
                    "trying the next mirror")
                continue
            atomic_write_bytes(destination, data)
            break
        else:
            raise DataError(f"could not download {stem}.gz from any mirror "
                            f"({'; '.join(failures)}); pass --data-dir with a local copy")
    for stem in stems:
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
