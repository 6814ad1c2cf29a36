"""`mnist-cnn predict` on a user's files: output formats, bad files, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli, on_paper
from mnist_cnn.preprocess import preprocess_file


@pytest.fixture(scope="module")
def user_images(tmp_path_factory, mnist):
    """Five scans of test digits, a broken file and a blank page, in one folder."""
    folder = tmp_path_factory.mktemp("images")
    labels = {}
    for index in range(5):
        name = f"digit{index}.png"
        on_paper(mnist["test"][0][index], at=(30 + 40 * index, 50)).save(folder / name)
        labels[name] = int(mnist["test"][1][index])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    Image.new("L", (80, 80), 255).save(folder / "blank.png")
    (folder / "notes.txt").write_text("not an image, and not an image suffix: skipped")
    return folder, labels


def test_predict_json_lines_for_a_folder(user_images, shipped_model):
    folder, labels = user_images
    result = cli("predict", "--model", str(shipped_model), str(folder), "--json")
    assert result.returncode == 1  # two files failed, the others were still predicted
    records = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {record["path"].rsplit("/", 1)[1]: record for record in records}
    assert set(by_name) == set(labels) | {"broken.jpg", "blank.png"}
    assert "no digit found" in by_name["blank.png"]["error"]
    assert "broken image" in by_name["broken.jpg"]["error"]
    for name, label in labels.items():
        record = by_name[name]
        assert record["label"] == label
        assert len(record["probabilities"]) == 10
        assert sum(record["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert record["probability"] == max(record["probabilities"])
    assert [r["path"] for r in records] == sorted(r["path"] for r in records)  # folder order kept


def test_predict_text_top_k_and_saved_inputs(user_images, shipped_model, tmp_path):
    folder, labels = user_images
    files = [str(folder / name) for name in sorted(labels)]
    result = cli("predict", "--model", str(shipped_model / "model.safetensors"), *files,
                     "--top", "3", "--save-preprocessed", str(tmp_path / "seen"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    for line, name in zip(lines, sorted(labels)):
        path, guesses = line.split(": ", 1)
        assert path.endswith(name) and guesses.count("%") == 3
        assert guesses.startswith(f"{labels[name]} (")
    for name in labels:
        saved = np.asarray(Image.open(tmp_path / "seen" / name))
        assert saved.shape == (28, 28)
        assert np.array_equal(saved, preprocess_file(folder / name))


def test_predict_usage_errors_exit_2(user_images, shipped_model, tmp_path):
    folder, _ = user_images
    assert_one_line_error(cli("predict", "--model", str(tmp_path / "none"), str(folder)),
                          "no such file or folder")
    assert_one_line_error(cli("predict", "--model", str(shipped_model), str(folder), "--top", "0"),
                          "not a valid positive integer")


def test_missing_image_and_empty_folder_are_failures_not_crashes(shipped_model, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("predict", "--model", str(shipped_model), str(tmp_path / "missing.png"),
                     str(tmp_path / "empty"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "missing.png: error: file not found" in result.stderr
    assert "empty: error: no image files in this folder" in result.stderr
