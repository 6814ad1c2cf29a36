"""Shared fixtures: small MNIST-format data sets cut from the shipped MNIST, and CLI runners."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# One torch (and OpenMP) thread per test process, set before anything imports torch: the
# suite runs in two pytest-xdist workers on 2 cores, and two processes of 2 threads each
# spin against each other (a training measured 5x slower). Subprocesses inherit it, so an
# in-process run and a subprocess run still compute the same sums in the same order.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from mnist_cnn.catalog import FILE_STEMS
from mnist_cnn.data import load_dataset
from mnist_cnn.idx import IMAGE_MAGIC, LABEL_MAGIC

REPO = Path(__file__).resolve().parents[1]

# The order in which the two test workers take modules: first the one whose first test
# trains the shared `mnist_model`, then the longest (measured), so that the two workers
# finish together and the modules that need the model find it trained; then the rest.
MODULES_FIRST = ["test_accuracy.py", "test_distributed.py", "test_train.py", "test_serve_browser.py",
                 "test_sweep.py", "test_kernels.py", "test_gpu_path.py", "test_docs.py", "test_serve_hardening.py",
                 "test_numbers.py", "test_sweep_postgres.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return MODULES_FIRST.index(name) if name in MODULES_FIRST else len(MODULES_FIRST)

    items.sort(key=rank)  # stable: the tests of a module keep their order
FASHION_DIRS = [Path("/usr/share/datasets/fashion-mnist"), REPO.parent / "shared/data/fashion-mnist"]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Encode a uint8 array as an IDX file with the given magic number."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, *, compress: bool = False) -> Path:
    data = idx_bytes(array, magic)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def write_dataset(folder: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *,
                  compress: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        image_stem, label_stem = FILE_STEMS[split]
        write_idx(folder / image_stem, images, IMAGE_MAGIC, compress=compress)
        write_idx(folder / label_stem, labels, LABEL_MAGIC, compress=compress)
    return folder


# ---- required pieces: skipped on a developer's machine, a failure in CI


def missing(what: str) -> None:
    """A required piece (a dependency, the C kernels, a tool) is missing here: skip where a
    developer runs the tests, fail in CI (CI=true), where a skip would hide a broken install."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (required in CI, where CI=true)", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_module(name: str):
    """`import name`, or `missing(...)`: for the required dependencies (requirements.txt)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing(f"needs {name} ({error}; pip install -r requirements.txt)")


# ---- what users' digit images look like (made from MNIST digits)


def on_paper(digit: np.ndarray, *, canvas=(420, 300), at=(40, 70), size=168, ink=30, paper=235,
             rng=None) -> Image.Image:
    """What a user's scan looks like: dark ink on light paper, large, off-centre, a little noise."""
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    page = np.full((canvas[1], canvas[0]), float(paper), np.float32)
    page[at[1]:at[1] + size, at[0]:at[0] + size] = paper - big * (paper - ink)
    if rng is not None:
        page += rng.normal(0, 4, page.shape)
    return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8))


def user_png(digit: np.ndarray, *, fmt: str = "PNG", mode: str = "L", page=(360, 300), at=(70, 40)) -> bytes:
    """An MNIST digit as a user's file looks: dark ink, 8x larger, off-centre on a white page."""
    ink = Image.fromarray(255 - digit).resize((224, 224), Image.Resampling.BILINEAR)
    sheet = Image.new("L", page, 255)
    sheet.paste(ink, at)
    buffer = io.BytesIO()
    sheet.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def mnist():
    """The shipped MNIST as numpy arrays: {'train': (images, labels), 'test': (...)}."""
    data = load_dataset("mnist")
    return {split: (s.images[:, 0].numpy(), s.labels.numpy().astype(np.uint8))
            for split, s in data.items()}


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, mnist) -> Path:
    """A 'custom' MNIST-format data set: 3,000 train and 1,000 test images of real MNIST."""
    folder = tmp_path_factory.mktemp("small")
    return write_dataset(folder, {
        "train": (mnist["train"][0][:3000], mnist["train"][1][:3000]),
        "test": (mnist["test"][0][:1000], mnist["test"][1][:1000]),
    }, compress=True)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    for folder in FASHION_DIRS:
        if (folder / "train-images-idx3-ubyte.gz").is_file() or (folder / "train-images-idx3-ubyte").is_file():
            return folder
    pytest.skip("Fashion-MNIST not found (apt-get install dataset-fashion-mnist)")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, stdin: bytes | None = None) -> CliResult:
    """Run `mnist-cnn ARGS` in this process (`main(argv)`), capturing stdout, stderr and the
    exit status: what a user sees, without paying for a fresh interpreter and torch import."""
    import torch

    from mnist_cnn.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    # Commands set process-wide state a real process drops on exit (serve: one torch thread);
    # later tests compare weights bit for bit with subprocesses, so it is put back.
    saved_threads = torch.get_num_threads()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: --help, usage errors
                code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.stdin = saved_stdin
        torch.set_num_threads(saved_threads)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m mnist_cnn ARGS` in a fresh process, as a user would: for what only a
    real process shows (signals, start-up time, the console script)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mnist_cnn", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    """A user error: the given exit status, one line on stderr naming the problem, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The model shipped in the package (the best-oe preset, 99.6 %): the same weights on
    every machine, for tests that expect given answers on given digits (a model
    trained during the session differs between CPUs whose kernels round differently).
    It is the package's own folder: copy it before writing anything next to it."""
    from mnist_cnn.checkpoints import PRETRAINED_DIR

    return PRETRAINED_DIR


# The quick full-data recipe of `mnist_model`: the fast preset's one-cycle schedule squeezed
# into 2 epochs (the preset's 8 reach 99.1-99.4 % but take 4x as long). Measured 2026-11-30:
# 98.20, 97.83, 97.97 % for seeds 0, 1, 2 in one process; 98.16, 97.79, 97.94 % under
# `--nproc 2` (test_distributed.py compares the two).
MNIST_MODEL_RECIPE = {"epochs": 2, "seed": 0}


@pytest.fixture(scope="session")
def mnist_model(tmp_path_factory) -> Path:
    """The seed architecture trained with `--preset fast --epochs 2` on the full MNIST
    (about 98 %, 7 s on 2 cores), once per test session; no pictures (tests that want them
    make them). Tests must not change this folder: copy it first. Under pytest-xdist the
    workers share it: the first to need it trains it, the others wait for it."""
    import shutil

    from filelock import FileLock

    from mnist_cnn.config import resolve_train_config
    from mnist_cnn.train import train

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    run = root / "mnist-model" / "run"
    with FileLock(str(root / "mnist-model.lock")):
        if not (run / "model.json").is_file():
            shutil.rmtree(run, ignore_errors=True)  # what a crashed worker left
            train(resolve_train_config("fast", MNIST_MODEL_RECIPE), run_dir=run, progress=False,
                  log=lambda m: None)
    return run


# ---- comparing runs, and a Ghostscript that tells whether it ran


def weights(run: Path) -> dict:
    """A run folder's final weights (model.safetensors), by name."""
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """Two run folders ended with the same weights, bit for bit."""
    import torch

    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A `gs` first on PATH that records every run in a file (Pillow's EPS reader runs `gs`)."""
    folder, record = tmp_path / "bin", tmp_path / "gs-ran"
    folder.mkdir()
    (folder / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\nexit 1\n")
    (folder / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("PIL.EpsImagePlugin.gs_binary", None, raising=False)  # look it up again
    return record


def uid_mapped(uid: int) -> bool:
    """Whether this process's user namespace maps `uid` (a root that can become another user).
    Under an unprivileged user namespace (`unshare -r`, as ../shared/tools/offline runs the
    tests) only root is mapped: nobody and postgres do not exist there, so a test that needs to
    switch to them cannot run, in CI or not (the environment, not a missing piece)."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return True  # not Linux: no user namespaces to worry about
    for line in filter(None, (line.split() for line in lines)):
        inside, _, count = map(int, line)
        if inside <= uid < inside + count:
            return True
    return False


def poison_loss(monkeypatch, call: int) -> None:
    """Training's `call`-th loss (counting from 1) becomes NaN; the others are computed as usual."""
    from mnist_cnn import train as training

    calls = {"n": 0}
    real_loss = training.batch_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(training, "batch_loss", poisoned)
