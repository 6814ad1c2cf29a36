"""Evaluation is exact, and loading a model never unpickles arbitrary objects."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, cli
from mnist_cnn.config import TrainConfig
from mnist_cnn.data import load_dataset, scale
from mnist_cnn.evaluate import evaluate, evaluation_report, format_report
from mnist_cnn.checkpoints import open_model
from mnist_cnn.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(dataset="custom", epochs=2), run_dir=run, data_dir=str(small_data),
          progress=False, log=lambda m: None)
    return run


def test_evaluate_counts_exactly(trained_run, small_data):
    model = open_model(trained_run).model
    test = load_dataset("custom", small_data, splits=("test",))["test"]
    evaluation = evaluate(model, test, loss="kl", batch_size=300)  # 300 does not divide 1000
    with torch.inference_mode():
        predicted = model(scale(test.images)).argmax(1)
    correct = int((predicted == test.labels).sum())
    assert evaluation.correct == correct and evaluation.total == 1000
    assert evaluation.accuracy == correct / 1000
    expected = torch.zeros(10, 10, dtype=torch.int64)
    for true, guess in zip(test.labels.tolist(), predicted.tolist()):
        expected[true, guess] += 1
    assert torch.equal(evaluation.confusion, expected)
    report = evaluation_report(evaluation, tuple(map(str, range(10))))
    three = report["per_class"][3]
    assert three["support"] == int((test.labels == 3).sum())
    assert three["recall"] == three["accuracy"] == int(expected[3, 3]) / three["support"]
    assert three["precision"] == int(expected[3, 3]) / int(expected[:, 3].sum())
    text = format_report(report, title="t")
    assert f"({correct}/1000)" in text and "confusion matrix" in text


def test_cli_evaluate_json_and_table(trained_run, small_data):
    result = cli("evaluate", str(trained_run), "--json", "--data-dir", str(small_data))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"accuracy", "per_class", "confusion_matrix"} <= report.keys()
    assert report["accuracy"] == report["correct"] / report["total"]
    assert sum(map(sum, report["confusion_matrix"])) == 1000
    info = json.loads((trained_run / "model.json").read_text())
    assert report["accuracy"] == info["metrics"]["test_accuracy"]
    table = cli("evaluate", str(trained_run / "checkpoint.pt"), "--data-dir", str(small_data))
    assert table.returncode == 0 and "precision" in table.stdout


def test_model_file_loads_alone(trained_run, tmp_path):
    lone = tmp_path / "digits.safetensors"
    lone.write_bytes((trained_run / "model.safetensors").read_bytes())
    loaded = open_model(lone)
    assert loaded.config.dataset == "custom" and not loaded.model.training


def test_bad_model_files_are_one_line_errors(tmp_path, small_data):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(cli("evaluate", str(garbage)), "not a readable safetensors file")
    assert_one_line_error(cli("evaluate", str(tmp_path / "nope")), "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(cli("evaluate", str(empty)), "no model.safetensors or checkpoint.pt")
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_line_error(cli("evaluate", str(broken)), "not a readable checkpoint")


class _Exploit:
    """Unpickled, it would create the file at `path`."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_pickle_is_refused_not_executed(tmp_path):
    target, pwned = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    torch.save({"format": "mnist-cnn-checkpoint", "payload": _Exploit(pwned)}, target, pickle_module=pickle)
    assert_one_line_error(cli("evaluate", str(target)), "not a readable checkpoint")
    assert not pwned.exists()
