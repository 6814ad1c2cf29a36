"""The data sets we know (MNIST, Fashion-MNIST, KMNIST, QMNIST, custom IDX files): their
files and checksums, where a copy is found (a given folder, the shipped copy, the user
cache) and how a missing one is downloaded and verified.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mnist_cnn.fileio import atomic_write_bytes
from mnist_cnn.idx import DataError, read_bytes

SHIPPED_DIR = Path(__file__).parent / "datasets"
SPLITS = ("train", "test")
FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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
    """The registered data set `name`; DataError naming the known ones otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}") from None


# ---------------------------------------------------------------- where data lives


def user_cache_dir() -> Path:
    """mnist-cnn's cache folder (downloaded data sets, built kernels): $MNIST_CNN_CACHE,
    else $XDG_CACHE_HOME/mnist-cnn, else ~/.cache/mnist-cnn."""
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


# ---------------------------------------------------------------- checksums


def verify(spec: DatasetSpec, stem: str, data: bytes, *, source: str) -> None:
    """Check decompressed bytes against the SHA-256 published for `spec`'s file `stem`, if any."""
    expected = spec.sha256.get(stem)
    if expected is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"{source}: SHA-256 {actual[:12]}… does not match {spec.title}'s "
                        f"{expected[:12]}…; the file is corrupt or another data set "
                        "(delete it, or choose the right --dataset)")
