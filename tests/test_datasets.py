"""Kuzushiji-MNIST and QMNIST: int32 IDX labels, per-data-set file names, local copies,
downloads from (local) mirrors against checksums, and an MNIST model evaluated on QMNIST."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, idx_bytes, write_dataset
from mnist_cnn import catalog
from mnist_cnn.catalog import download_dataset, get_spec
from mnist_cnn.data import load_dataset
from mnist_cnn.idx import (
    IMAGE_MAGIC,
    INT_LABEL_MAGIC,
    LABEL_MAGIC,
    DataError,
    load_idx,
    parse_idx,
    parse_labels,
)

KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")


def int_idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of big-endian int32 (type 0x0C), as QMNIST's label files."""
    magic = (0x0C << 8) | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=">i4").tobytes()


def qmnist_labels(classes: np.ndarray, seed: int) -> np.ndarray:
    """Extended labels (N, 8) shaped like QMNIST's: class, HSF series, writer, index, NIST
    class code (0x30 + class), global NIST index, duplicate, unused."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    return np.stack([classes, rng.choice([0, 1, 4], n), rng.integers(0, 2600, n),
                     rng.integers(0, 150, n), 30 + classes, rng.integers(0, 281770, n),
                     np.zeros(n), np.zeros(n)], axis=1).astype(np.int32)


def fixture_files(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, bytes]:
    """The decompressed bytes of each file of data set `name`, keyed by its stem."""
    spec = get_spec(name)
    files = {}
    for split, (images, labels) in splits.items():
        image_stem, label_stem = spec.files[split]
        files[image_stem] = idx_bytes(images, IMAGE_MAGIC)
        files[label_stem] = (int_idx_bytes(labels) if spec.label_column is not None
                             else idx_bytes(labels, LABEL_MAGIC))
    return files


def write_files(folder: Path, files: dict[str, bytes], *, compress: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, raw in files.items():
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw, mtime=0))
        else:
            (folder / stem).write_bytes(raw)
    return folder


@pytest.fixture(scope="module")
def arrays(mnist):
    """A few hundred images per split: random ones for KMNIST; for QMNIST real MNIST digits
    (its test file: MNIST's test digits first, then others, as in the real file)."""
    rng = np.random.default_rng(9)
    kmnist = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      np.arange(n, dtype=np.uint8) % 10)
              for split, n in (("train", 300), ("test", 100))}
    test_images = np.concatenate([mnist["test"][0][:300], mnist["train"][0][-200:]])
    test_classes = np.concatenate([mnist["test"][1][:300], mnist["train"][1][-200:]]).astype(np.int32)
    qmnist = {
        "train": (mnist["train"][0][:300], qmnist_labels(mnist["train"][1][:300].astype(np.int32), 1)),
        "test": (test_images, qmnist_labels(test_classes, 2)),
    }
    return {"kmnist": kmnist, "qmnist": qmnist}


@pytest.fixture
def sums_of(monkeypatch):
    """Make a spec trust the fixtures: their own .gz MD5s and SHA-256s replace the published
    ones (which the tiny fixtures cannot match), the rest of the spec as it is."""
    def patch(name: str, files: dict[str, bytes]) -> None:
        gz_md5 = {stem: hashlib.md5(gzip.compress(raw, mtime=0)).hexdigest()
                  for stem, raw in files.items()}
        sha256 = {stem: hashlib.sha256(raw).hexdigest() for stem, raw in files.items()}
        monkeypatch.setitem(catalog.DATASETS, name, replace(get_spec(name), gz_md5=gz_md5, sha256=sha256))
    return patch


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_CNN_DATA", raising=False)
    monkeypatch.delenv("MNIST_CNN_MIRRORS", raising=False)
    monkeypatch.setenv("MNIST_CNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- int32 IDX


@pytest.mark.parametrize("compress", [False, True])
def test_int32_idx_round_trip(tmp_path, compress):
    values = np.array([[0, 4, 2599, 149, 39, 281769, 0, 0],
                       [9, 0, 0, 0, 30, 0, 0, 0],
                       [-1, 2**31 - 1, -2**31, 7, 256, 65536, 1, 0]], np.int32)
    raw = int_idx_bytes(values)
    assert raw[:4] == INT_LABEL_MAGIC.to_bytes(4, "big") and len(raw) == 12 + 3 * 8 * 4
    parsed = parse_idx(raw, source="x")
    assert parsed.dtype == np.int32 and parsed.shape == (3, 8) and np.array_equal(parsed, values)
    path = tmp_path / "labels-idx2-int"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    assert np.array_equal(load_idx(path), values)
    column = parse_labels(int_idx_bytes(values[:2]), source="x", column=0)
    assert column.tolist() == [0, 9]
    assert parse_labels(int_idx_bytes(values[:2]), source="x", column=4, num_classes=40).tolist() == [39, 30]


def test_int32_idx_truncated_wrong_dims_and_bad_classes_are_refused():
    labels = qmnist_labels(np.arange(5, dtype=np.int32), 0)
    with pytest.raises(DataError, match=r"t: header says shape \(5, 8\) \(172 bytes\) but the file "
                                        r"has 170 bytes \(truncated or corrupt\)"):
        parse_labels(int_idx_bytes(labels)[:-2], source="t", column=0)
    with pytest.raises(DataError, match=r"t: header says shape \(5, 8\) \(172 bytes\) but the file has 176"):
        parse_idx(int_idx_bytes(labels) + bytes(4), source="t")
    with pytest.raises(DataError, match="IDX header truncated"):
        parse_idx(int_idx_bytes(labels)[:10], source="t")
    with pytest.raises(DataError, match=r"d: magic number 3073, expected 3074 \(an IDX file of int32 "
                                        r"labels of 2 dimensions\)"):
        parse_labels(int_idx_bytes(labels[:, 0]), source="d", column=0)
    with pytest.raises(DataError, match=r"u: magic number 2049, expected 3074"):
        parse_labels(idx_bytes(np.arange(5, dtype=np.uint8), LABEL_MAGIC), source="u", column=0)
    with pytest.raises(DataError, match=r"i: magic number 3074, expected 2049"):
        parse_labels(int_idx_bytes(labels), source="i")  # MNIST's label format expected
    with pytest.raises(DataError, match=r"c: labels have 1 columns, expected the class in column 3"):
        parse_labels(int_idx_bytes(labels[:, :1]), source="c", column=3)
    for bad in (10, -1):
        wrong = labels.copy()
        wrong[2, 0] = bad
        with pytest.raises(DataError, match=rf"b: label {bad} found, expected 0..9"):
            parse_labels(int_idx_bytes(wrong), source="b", column=0)
    floats = (0x0D03).to_bytes(4, "big") + b"\x00\x00\x00\x01" * 3 + bytes(4)
    with pytest.raises(DataError, match=r"f: not an IDX file of unsigned bytes or int32 \(magic number 3331"):
        parse_idx(floats, source="f")


# ---------------------------------------------------------------- specs


def test_class_names_sources_and_file_names():
    kmnist, qmnist = get_spec("kmnist"), get_spec("qmnist")
    assert kmnist.classes == KMNIST_CLASSES and kmnist.title == "Kuzushiji-MNIST"
    assert "CC BY-SA 4.0" in kmnist.source and "BSD" in qmnist.source
    assert kmnist.files == catalog.FILE_STEMS and kmnist.label_column is None
    assert qmnist.classes == tuple("0123456789") == get_spec("mnist").classes
    assert qmnist.files["test"] == ("qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int")
    assert qmnist.label_column == 0 and qmnist.counts == {"train": 60000, "test": 60000}
    assert (kmnist.torchvision_folder, qmnist.torchvision_folder) == ("KMNIST", "QMNIST")


def test_published_checksums_and_mirrors():
    # As torchvision's KMNIST.resources and QMNIST.resources list them.
    kmnist, qmnist = get_spec("kmnist"), get_spec("qmnist")
    assert kmnist.mirrors == ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)
    assert kmnist.gz_md5 == {
        "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
    }
    assert qmnist.mirrors == ("https://raw.githubusercontent.com/facebookresearch/qmnist/master/",)
    assert qmnist.gz_md5 == {
        "qmnist-train-images-idx3-ubyte": "ed72d4157d28c017586c42bc6afe6370",
        "qmnist-train-labels-idx2-int": "0058f8dd561b90ffdd0f734c6a30e5e4",
        "qmnist-test-images-idx3-ubyte": "1394631089c404de565df7b7aeaf9412",
        "qmnist-test-labels-idx2-int": "5b5b05890a5e13444e108efe57b788aa",
    }
    assert set(qmnist.sha256) == {"qmnist-train-labels-idx2-int", "qmnist-test-labels-idx2-int"}
    assert not kmnist.sha256


# ---------------------------------------------------------------- --data-dir


def test_kmnist_loads_from_a_flat_or_torchvision_data_dir(tmp_path, arrays):
    files = fixture_files("kmnist", arrays["kmnist"])
    flat = write_files(tmp_path / "flat", files, compress=True)
    layout = write_files(tmp_path / "root/KMNIST/raw", files, compress=False)
    for folder in (flat, layout.parents[1]):
        splits = load_dataset("kmnist", folder)
        for split, (images, labels) in arrays["kmnist"].items():
            assert torch.equal(splits[split].images[:, 0], torch.from_numpy(images))
            assert splits[split].labels.tolist() == labels.tolist()
    assert get_spec("kmnist").classes[int(splits["test"].labels[3])] == "tsu"


def test_qmnist_loads_column_zero_from_a_torchvision_data_dir(tmp_path, arrays, sums_of):
    files = fixture_files("qmnist", arrays["qmnist"])
    root = tmp_path / "root"
    write_files(root / "QMNIST/raw", files, compress=False)
    # The real data set's labels have published sums that a fixture cannot match: refused.
    with pytest.raises(DataError, match=r"qmnist-test-labels-idx2-int: SHA-256 .* does not match QMNIST"):
        load_dataset("qmnist", root, splits=("test",))
    sums_of("qmnist", files)
    splits = load_dataset("qmnist", root)
    test = splits["test"]
    assert len(splits["train"]) == 300 and len(test) == 500 and test.labels.dtype == torch.int64
    assert test.labels.tolist() == arrays["qmnist"]["test"][1][:, 0].tolist()
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["qmnist"]["test"][0]))


def test_qmnist_test_files_alone_are_enough_for_the_test_split(tmp_path, arrays, sums_of):
    files = fixture_files("qmnist", arrays["qmnist"])
    test_only = {stem: raw for stem, raw in files.items() if "-test-" in stem}
    folder = write_files(tmp_path / "qmnist", test_only, compress=True)
    sums_of("qmnist", files)
    assert len(load_dataset("qmnist", folder, splits=("test",))["test"]) == 500
    with pytest.raises(DataError, match=r"no QMNIST IDX files in .*qmnist \(looked for "
                                        r"qmnist-train-images-idx3-ubyte\[\.gz\], "
                                        r"qmnist-train-labels-idx2-int\[\.gz\], "):
        load_dataset("qmnist", folder)
    # MNIST-named files are not QMNIST's: its own file names are looked for.
    write_dataset(tmp_path / "mnist-names", {"test": (arrays["qmnist"]["test"][0],
                                                      arrays["qmnist"]["test"][1][:, 0].astype(np.uint8))})
    with pytest.raises(DataError, match="no QMNIST IDX files"):
        load_dataset("qmnist", tmp_path / "mnist-names", splits=("test",))


# ---------------------------------------------------------------- downloads from 127.0.0.1


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirrors(tmp_path, arrays):
    """A local server with /good/ (each data set's fixture .gz files) and /corrupt/ (the same
    names, one byte changed: still valid gzip and IDX, but not the files' sums)."""
    root = tmp_path / "www"
    served = {}
    for name in ("kmnist", "qmnist"):
        files = fixture_files(name, arrays[name])
        served[name] = files
        for stem, raw in files.items():
            for kind, content in (("good", raw), ("corrupt", raw[:-1] + bytes([raw[-1] ^ 1]))):
                write_files(root / kind / name, {stem: content}, compress=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    threading.Thread(target=partial(server.serve_forever, poll_interval=0.05), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", ["kmnist", "qmnist"])
def test_download_skips_a_wrong_checksum_for_the_next_mirror(name, mirrors, arrays, sums_of,
                                                           no_local_data, monkeypatch):
    base, served = mirrors
    sums_of(name, served[name])
    monkeypatch.setenv("MNIST_CNN_MIRRORS", f"{base}/corrupt/{name}/,{base}/good/{name}/")
    messages = []
    splits = load_dataset(name, splits=("test",), log=messages.append)
    expected = arrays[name]["test"][1]
    expected = expected[:, 0] if expected.ndim == 2 else expected
    assert splits["test"].labels.tolist() == expected.tolist()
    stems = get_spec(name).files["test"]
    assert sorted(p.name for p in (no_local_data / name).iterdir()) == sorted(f"{s}.gz" for s in stems)
    assert len(messages) == 2 and all(
        m.startswith(f"bad checksum from {base}/corrupt/{name}/") and "trying the next mirror" in m
        for m in messages)
    # Now cached: no mirror is needed any more.
    monkeypatch.setenv("MNIST_CNN_MIRRORS", "http://127.0.0.1:9/")
    assert len(load_dataset(name, splits=("test",), download=False)["test"]) == len(expected)


def test_download_refuses_wrong_checksums_in_one_line(tmp_path, mirrors, sums_of):
    base, served = mirrors
    sums_of("qmnist", served["qmnist"])
    target = tmp_path / "cache"
    with pytest.raises(DataError) as error:
        download_dataset(get_spec("qmnist"), target, splits=("test",), progress=False,
                         mirrors=[f"{base}/corrupt/qmnist/", f"{base}/missing/"], log=lambda m: None)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not download qmnist-test-images-idx3-ubyte.gz from any mirror")
    assert "corrupt/qmnist/qmnist-test-images-idx3-ubyte.gz: MD5 " in message and "HTTP 404" in message
    assert list(target.iterdir()) == []


def test_the_published_kmnist_md5_refuses_other_files(mirrors, no_local_data, monkeypatch):
    """No patching here: the real spec's published MD5s refuse the served fixture files."""
    base, _ = mirrors
    monkeypatch.setenv("MNIST_CNN_MIRRORS", f"{base}/good/kmnist/")
    with pytest.raises(DataError) as error:
        load_dataset("kmnist", log=lambda m: None)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("could not download train-images-idx3-ubyte.gz from any mirror")
    assert message.endswith("!= bdb82020997e1d708af4cf47b453dcf7); pass --data-dir with a local copy")
    assert not list((no_local_data / "kmnist").glob("*.gz"))


# ---------------------------------------------------------------- an MNIST model on QMNIST


def test_evaluate_an_mnist_model_on_qmnist_test_digits(tmp_path, arrays, mnist_model, sums_of):
    files = fixture_files("qmnist", arrays["qmnist"])
    sums_of("qmnist", files)
    test_only = {stem: raw for stem, raw in files.items() if "-test-" in stem}
    qmnist_dir = write_files(tmp_path / "qmnist", test_only, compress=True)
    images, labels = arrays["qmnist"]["test"]
    custom_dir = write_dataset(tmp_path / "custom", {
        "train": (images[:1], labels[:1, 0].astype(np.uint8)),
        "test": (images, labels[:, 0].astype(np.uint8))})
    reports = {}
    for name, folder in (("qmnist", qmnist_dir), ("custom", custom_dir)):
        result = cli("evaluate", str(mnist_model), "--dataset", name, "--data-dir", str(folder),
                     "--json", "--device", "cpu")
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads(result.stdout)
    qmnist, same_as_mnist_files = reports["qmnist"], reports["custom"]
    assert qmnist["dataset"] == "qmnist" and qmnist["total"] == 500
    # Column 0 of the int32 labels is the class: exactly the same counts as with uint8 labels.
    assert qmnist["confusion_matrix"] == same_as_mnist_files["confusion_matrix"]
    assert qmnist["correct"] == same_as_mnist_files["correct"] and qmnist["accuracy"] > 0.9
    assert [row["name"] for row in qmnist["per_class"]] == list("0123456789")
