"""IDX reading, verification, locating, downloading and batching."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import idx_bytes, write_dataset, write_idx
from mnist_cnn import catalog, data, idx
from mnist_cnn.catalog import download_dataset, get_spec
from mnist_cnn.data import epoch_permutation, load_dataset, steps_per_epoch, train_batches
from mnist_cnn.idx import IMAGE_MAGIC, LABEL_MAGIC, DataError, load_idx, parse_images, parse_labels

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_shipped_mnist_loads_verified_with_known_label_counts():
    splits = load_dataset("mnist")
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    # Known content: the first training digit is a 5, the first test digit a 7.
    assert int(train.labels[0]) == 5 and int(test.labels[0]) == 7
    raw = gzip.decompress((catalog.SHIPPED_DIR / "mnist/train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_raw_and_gzip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "imgs", images, IMAGE_MAGIC, compress=compress)
    assert np.array_equal(load_idx(path), images)
    assert np.array_equal(parse_images(idx.read_bytes(path), source=str(path)), images)


def test_images_and_labels_are_checked_for_their_magic_number(tmp_path):
    labels = idx_bytes(np.arange(10, dtype=np.uint8), LABEL_MAGIC)
    images = idx_bytes(np.zeros((2, 28, 28), np.uint8), IMAGE_MAGIC)
    with pytest.raises(DataError, match=r"labels.idx: magic number 2049, expected 2051"):
        parse_images(labels, source="labels.idx")
    with pytest.raises(DataError, match=r"images.idx: magic number 2051, expected 2049"):
        parse_labels(images, source="images.idx")
    with pytest.raises(DataError, match="not an IDX file"):
        idx.parse_idx(b"\x89PNG\r\n\x1a\n" + bytes(100), source="x.png")


def test_wrong_image_size_truncation_and_bad_labels_are_refused():
    with pytest.raises(DataError, match=r"f: images are 32x32, expected 28x28"):
        parse_images(idx_bytes(np.zeros((2, 32, 32), np.uint8), IMAGE_MAGIC), source="f")
    truncated = idx_bytes(np.zeros((3, 28, 28), np.uint8), IMAGE_MAGIC)[:-5]
    with pytest.raises(DataError, match=r"t: header says shape \(3, 28, 28\).*truncated"):
        parse_images(truncated, source="t")
    with pytest.raises(DataError, match=r"l: label 12 found, expected 0..9"):
        parse_labels(idx_bytes(np.array([1, 12], np.uint8), LABEL_MAGIC), source="l")
    with pytest.raises(DataError, match="too short"):
        idx.parse_idx(b"\x00\x00", source="s")


def test_corrupt_gzip_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000))[:2000])
    with pytest.raises(DataError, match=f"{bad}: corrupt or truncated gzip"):
        load_idx(bad)
    with pytest.raises(DataError, match="nothing-here: file not found"):
        load_idx(tmp_path / "nothing-here")
    with pytest.raises(DataError, match="is a directory"):
        load_idx(tmp_path)


def test_count_mismatch_between_images_and_labels(tmp_path, mnist):
    folder = write_dataset(tmp_path, {"train": (mnist["train"][0][:20], mnist["train"][1][:19]),
                                      "test": (mnist["test"][0][:5], mnist["test"][1][:5])})
    with pytest.raises(DataError, match="holds 20 images but .* holds 19 labels"):
        load_dataset("custom", folder)


def test_tampered_mnist_fails_its_sha256(tmp_path):
    for path in (catalog.SHIPPED_DIR / "mnist").glob("*.gz"):
        shutil.copy(path, tmp_path / path.name)
    raw = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one wrong label, still a valid IDX file
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: SHA-256 .* does not match MNIST"):
        load_dataset("mnist", tmp_path, splits=("test",))
    # The same files are fine as a 'custom' data set (format checks only).
    assert len(load_dataset("custom", tmp_path, splits=("test",))["test"]) == 10000


def test_fashion_mnist_is_verified_and_refused_as_mnist(fashion_dir):
    fashion = load_dataset("fashion-mnist", fashion_dir, splits=("test",))["test"]
    assert fashion.images.shape == (10000, 1, 28, 28)
    with pytest.raises(DataError, match="does not match MNIST"):
        load_dataset("mnist", fashion_dir, splits=("test",))


def test_locate_accepts_torchvision_layout_dotted_names_and_env(tmp_path, monkeypatch, mnist):
    arrays = {"train": (mnist["train"][0][:10], mnist["train"][1][:10]),
              "test": (mnist["test"][0][:10], mnist["test"][1][:10])}
    write_dataset(tmp_path / "root/MNIST/raw", arrays)
    assert len(load_dataset("custom", tmp_path / "root")["train"]) == 10
    dotted = write_dataset(tmp_path / "dotted", arrays)
    for path in list(dotted.iterdir()):
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert len(load_dataset("custom", dotted)["test"]) == 10
    monkeypatch.setenv("MNIST_CNN_DATA", str(tmp_path / "root"))
    assert len(load_dataset("custom")["test"]) == 10


def test_locate_errors_for_a_wrong_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "missing")
    with pytest.raises(DataError, match=f"no MNIST IDX files in {tmp_path}"):
        load_dataset("mnist", tmp_path)
    monkeypatch.delenv("MNIST_CNN_DATA", raising=False)
    with pytest.raises(DataError, match="'custom' needs --data-dir"):
        load_dataset("custom")
    with pytest.raises(DataError, match="unknown dataset 'emnist'"):
        get_spec("emnist")


def test_locate_prefers_the_shipped_copy_then_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_CNN_DATA", raising=False)
    monkeypatch.setenv("MNIST_CNN_CACHE", str(tmp_path / "cache"))
    paths = catalog.locate(get_spec("mnist"), download=False)
    assert all(p.parent == catalog.SHIPPED_DIR / "mnist" for p in paths.values())
    with pytest.raises(DataError, match="not found locally and downloading is off"):
        catalog.locate(get_spec("fashion-mnist"), download=False)


# ---------------------------------------------------------------- download against 127.0.0.1


@pytest.fixture
def mirror_server(tmp_path):
    """Three local mirrors: /missing/ (404s), /corrupt/ (wrong bytes), /good/ (the files)."""
    root = tmp_path / "www"
    (root / "good").mkdir(parents=True)
    (root / "corrupt").mkdir()
    for path in (catalog.SHIPPED_DIR / "mnist").glob("*.gz"):
        shutil.copy(path, root / "good" / path.name)
        (root / "corrupt" / path.name).write_bytes(path.read_bytes()[:-100] + bytes(100))
    handler = partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _local_spec():
    """MNIST as it is served by our local mirror: the shipped .gz files' own MD5s."""
    spec = get_spec("mnist")
    md5 = {stem: hashlib.md5((catalog.SHIPPED_DIR / "mnist" / f"{stem}.gz").read_bytes()).hexdigest()
           for stem in spec.gz_md5}
    return replace(spec, gz_md5=md5, shipped=False)


def test_download_skips_missing_and_corrupt_mirrors(tmp_path, mirror_server):
    messages = []
    target = tmp_path / "cache"
    mirrors = [f"{mirror_server}/missing/", f"{mirror_server}/corrupt/", f"{mirror_server}/good/"]
    download_dataset(_local_spec(), target, mirrors=mirrors, progress=False, log=messages.append)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        f"{stem}.gz" for stem in get_spec("mnist").gz_md5)
    assert any("404" in m for m in messages) and any("bad checksum" in m for m in messages)
    split = data.load_split(catalog.find_files_in(target, get_spec("mnist")), "test", get_spec("mnist"))
    assert torch.bincount(split.labels).tolist() == MNIST_TEST_COUNTS


def test_download_fails_cleanly_when_no_mirror_has_good_bytes(tmp_path, mirror_server):
    target = tmp_path / "cache"
    mirrors = [f"{mirror_server}/corrupt/", "http://127.0.0.1:9/"]  # port 9: connection refused
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte.gz from any mirror"):
        download_dataset(_local_spec(), target, mirrors=mirrors, progress=False, log=lambda m: None)
    assert list(target.iterdir()) == []  # no partial or corrupt file left behind


def test_the_shipped_copy_matches_the_published_sha256_and_every_file_has_checksums():
    import hashlib

    spec = get_spec("mnist")
    for stem, path in catalog.find_files_in(catalog.SHIPPED_DIR / "mnist", spec).items():
        assert hashlib.sha256(idx.read_bytes(path)).hexdigest() == spec.sha256[stem], stem
    for name in ("mnist", "fashion-mnist"):
        published = get_spec(name)
        stems = {stem for pair in catalog.FILE_STEMS.values() for stem in pair}
        assert set(published.gz_md5) == set(published.sha256) == stems and published.mirrors


# Zalando's README as Debian's dataset-fashion-mnist ships it (.ci/run installs the package):
# a copy of the published MD5s that this project did not type.
FASHION_README = Path("/usr/share/doc/dataset-fashion-mnist/README.md.gz")


def test_fashion_md5s_are_the_ones_zalando_publishes():
    """The .gz MD5s a Fashion-MNIST download is checked against are those in the data set's
    own README (its table of files: name, ..., `md5`). (The MNIST, KMNIST and QMNIST lists
    have no copy on the machine: they were compared by hand with torchvision's, see
    docs/claims.md; the shipped MNIST bytes are checked against the SHA-256s above.)"""
    import re

    if not FASHION_README.is_file():
        pytest.skip(f"no {FASHION_README} (apt-get install dataset-fashion-mnist)")
    table = re.findall(r"`([a-z0-9-]+)\.gz`.*\|\s*`([0-9a-f]{32})`\s*\|",
                       gzip.decompress(FASHION_README.read_bytes()).decode())
    assert len(table) == 4, table
    assert get_spec("fashion-mnist").gz_md5 == dict(table)


def test_cli_downloads_into_the_cache_and_rejects_a_corrupt_mirror(tmp_path, mirror_server):
    from conftest import assert_one_line_error, cli

    env = {"MNIST_CNN_CACHE": str(tmp_path / "cache"),
           "MNIST_CNN_MIRRORS": f"{mirror_server}/corrupt/"}
    result = cli("train", "--dataset", "fashion-mnist", "--run-dir", str(tmp_path / "run"),
                     "--no-progress", env=env)
    assert result.returncode == 2
    assert "could not download" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*.gz"))


# ---------------------------------------------------------------- batches


def test_batches_are_slices_of_a_seeded_permutation_scaled_like_to_tensor():
    images = torch.arange(10 * 784, dtype=torch.int64).remainder(256).to(torch.uint8).view(10, 1, 28, 28)
    split = data.Split(images=images, labels=torch.arange(10))
    batches = list(train_batches(split, 4, seed=3, epoch=1))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    order = torch.cat([y for _, y in batches])
    assert torch.equal(order, epoch_permutation(10, seed=3, epoch=1))
    assert not torch.equal(order, epoch_permutation(10, seed=3, epoch=2))
    x, y = batches[0]
    assert x.dtype == torch.float32 and torch.equal(x, images[y].float() / 255)
    resumed = list(train_batches(split, 4, seed=3, epoch=1, start_step=2))
    assert torch.equal(resumed[0][1], batches[2][1])
    # Under torchrun the batch stays global: each step's slice is split among the ranks.
    shares = [list(train_batches(split, 4, seed=3, epoch=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [[len(y) for _, y in share] for share in shares] == [[2, 2, 1], [2, 2, 1]]
    for step, (_, y) in enumerate(batches):
        assert torch.equal(shares[0][step][1], y[0::2]) and torch.equal(shares[1][step][1], y[1::2])
    assert steps_per_epoch(10, 4) == 3
