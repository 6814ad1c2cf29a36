"""The run folder and model loading: one module owns the names, the tutorial's own
weights load both ways, and commands find a model when none is given."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import assert_one_line_error, cli, on_paper, REPO
from mnist_cnn import checkpoints, runs
from mnist_cnn.data import load_dataset


class CNN_MNIST(nn.Module):
    """The tutorial's class, exactly as its notebook writes it (softmax in forward)."""

    def __init__(self):
        super(CNN_MNIST, self).__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, 1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, 1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.lin1 = nn.Linear(16 * 4 * 4, 96)
        self.drop1 = nn.Dropout(0.2)
        self.lin2 = nn.Linear(96, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(x)
        x = F.relu(self.conv2(x))
        x = self.pool2(x)
        x = x.view(x.shape[0], -1)
        x = F.relu(self.drop1(self.lin1(x)))
        x = F.softmax(self.lin2(x), dim=1)
        return x


def tutorial_accuracy(model: nn.Module) -> int:
    """Correct test predictions counted the tutorial's way (argmax of its softmax)."""
    test = load_dataset("mnist", splits=("test",))["test"]
    model.eval()
    with torch.inference_mode():
        predicted = model(test.images.float() / 255).argmax(dim=1)
    return int((predicted == test.labels).sum())


@pytest.fixture(scope="module")
def tutorial_weights(mnist_model, tmp_path_factory):
    """Our trained weights in the tutorial's class (strict), saved as the tutorial's readers
    save theirs: torch.save(model.state_dict(), path)."""
    model = CNN_MNIST()
    model.load_state_dict(load_file(str(mnist_model / "model.safetensors")), strict=True)
    path = tmp_path_factory.mktemp("tutorial") / "cnn_mnist.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_our_model_loads_strictly_into_the_tutorials_class_and_scores_the_same(mnist_model, tutorial_weights):
    model, _ = tutorial_weights
    info = json.loads((mnist_model / "model.json").read_text())
    assert tutorial_accuracy(model) == info["metrics"]["test_correct"]


def test_a_tutorial_state_dict_evaluates_predicts_and_explains(mnist_model, tutorial_weights, mnist, tmp_path):
    model, path = tutorial_weights
    result = cli("evaluate", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total"] == 10000 and report["correct"] == tutorial_accuracy(model)
    image = tmp_path / "seven.png"
    on_paper(mnist["test"][0][0]).save(image)
    predicted = cli("predict", "--model", str(path), str(image), "--json")
    assert predicted.returncode == 0 and json.loads(predicted.stdout)["label"] == 7
    loaded = checkpoints.open_model(path)
    assert loaded.config.model == "seed" and loaded.classes == tuple("0123456789")


def test_state_dicts_that_do_not_fit_are_one_line_errors(tutorial_weights, tmp_path):
    _, path = tutorial_weights
    state = torch.load(path, weights_only=True)
    wrong_shape = {**state, "lin1.weight": torch.zeros(100, 256)}
    torch.save(wrong_shape, tmp_path / "shape.pt")
    assert_one_line_error(cli("evaluate", str(tmp_path / "shape.pt")),
                          "weights do not fit model 'seed'", "lin1.weight has shape (100, 256)")
    torch.save({k: v for k, v in state.items() if k != "conv2.bias"}, tmp_path / "missing.pt")
    assert_one_line_error(cli("evaluate", str(tmp_path / "missing.pt")), "missing conv2.bias")
    torch.save({"lr": 0.1, "epochs": [1, 2]}, tmp_path / "other.pt")
    assert_one_line_error(cli("evaluate", str(tmp_path / "other.pt")), "neither an mnist-cnn checkpoint nor")
    parallel = {f"module.{k}": v for k, v in state.items()}  # saved from nn.DataParallel
    torch.save(parallel, tmp_path / "parallel.pt")
    assert checkpoints.open_model(tmp_path / "parallel.pt").config.model == "seed"


def test_each_run_folder_file_name_is_spelled_once_in_the_package():
    sources = "".join(path.read_text() for path in (REPO / "src" / "mnist_cnn").rglob("*.py"))
    for name in ("metrics.jsonl", "config.json", "checkpoint.pt", "model.safetensors", "model.json"):
        assert len(re.findall(rf'"{re.escape(name)}"', sources)) == 1, name


def _finished_run(folder, mtime: float):
    folder.mkdir(parents=True)
    shutil.copyfile(checkpoints.PRETRAINED_DIR / runs.MODEL_FILE, folder / runs.MODEL_FILE)
    os.utime(folder / runs.MODEL_FILE, (mtime, mtime))


def test_commands_default_to_the_newest_finished_run_else_the_shipped_model(tmp_path, mnist):
    image = tmp_path / "digit.png"
    on_paper(mnist["test"][0][1]).save(image)  # a 2
    shipped = cli("predict", str(image), cwd=tmp_path)
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stdout.startswith(f"{image}: 2 (")
    assert "using the model shipped with mnist-cnn" in shipped.stderr
    _finished_run(tmp_path / "runs" / "old", 1_000_000)
    _finished_run(tmp_path / "runs" / "new", 2_000_000)
    (tmp_path / "runs" / "unfinished").mkdir()
    assert runs.newest_run(tmp_path / "runs") == tmp_path / "runs" / "new"
    chosen = cli("predict", str(image), cwd=tmp_path)
    assert chosen.returncode == 0 and "using the newest finished run: runs/new" in chosen.stderr
    info = json.loads((checkpoints.PRETRAINED_DIR / runs.MODEL_INFO_FILE).read_text())
    assert info["config"]["preset"] == "best-oe" and info["command"].startswith("mnist-cnn train --preset best-oe")
    assert info["metrics"]["test_accuracy"] >= 0.99


def test_the_python_api_returns_plain_objects(mnist_model, mnist):
    from mnist_cnn import MnistCnnError, evaluate_model, load_model, predict_images

    loaded = load_model(mnist_model)
    assert loaded.classes == tuple("0123456789") and not loaded.model.training
    probabilities = predict_images(mnist["test"][0][:20], model=mnist_model)
    assert probabilities.shape == (20, 10) and probabilities.dtype == np.float32
    assert (probabilities.argmax(1) == mnist["test"][1][:20]).mean() >= 0.9
    report = evaluate_model(mnist_model, device="cpu")
    assert report["correct"] == json.loads((mnist_model / "model.json").read_text())["metrics"]["test_correct"]
    with pytest.raises(MnistCnnError, match="no such file or folder"):
        load_model("/no/such/run")


def test_a_command_resolves_its_device_and_its_default_model_once(tmp_path, monkeypatch, mnist, capsys):
    # Where a command starts (its CLI handler, or a Python API function) --device and the
    # default model are resolved, once; the functions below receive the objects. Two members
    # of an ensemble share the one device.
    from mnist_cnn import api, runtime
    from mnist_cnn.cli import main

    devices, models = [], []
    resolve, choose = runtime.resolve_device, checkpoints.model_or_default
    monkeypatch.setattr(runtime, "resolve_device", lambda name: devices.append(name) or resolve(name))
    monkeypatch.setattr(checkpoints, "model_or_default",
                        lambda value, **kw: models.append(value) or choose(value, **kw))
    monkeypatch.setattr(api, "model_or_default", checkpoints.model_or_default)
    monkeypatch.chdir(tmp_path)  # no ./runs here: the shipped model is the default
    image = tmp_path / "digit.png"
    on_paper(mnist["test"][0][0]).save(image)
    shipped = str(checkpoints.PRETRAINED_DIR)
    assert main(["predict", str(image), "--model", shipped, "--model", shipped, "--device", "cpu"]) == 0
    assert devices == ["cpu"] and models == [shipped, shipped]
    devices.clear(), models.clear()
    assert main(["predict", str(image), "--device", "cpu"]) == 0
    assert devices == ["cpu"] and models == [None]
    assert f"digit.png: {mnist['test'][1][0]} (" in capsys.readouterr().out
    devices.clear(), models.clear()
    assert api.predict_images(mnist["test"][0][:2], device="cpu").shape == (2, 10)
    assert devices == ["cpu"] and models == [None]
