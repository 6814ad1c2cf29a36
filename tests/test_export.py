"""ONNX and TorchScript exports agree with the trained model; ONNX Runtime serves predict."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, cli, require_module
from mnist_cnn.export import export_model
from mnist_cnn.predict import OnnxPredictor, TorchPredictor

onnx = require_module("onnx")  # required dependencies: a skip here would hide a broken install in CI
require_module("onnxruntime")


@pytest.fixture(scope="module")
def exported(shipped_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    run = folder / "run"
    shutil.copytree(shipped_model, run)
    result = cli("export", "--model", str(run), "--format", "onnx")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the exporter's chatter stays out of the user's terminal
    return run


def test_onnx_file_passes_the_checker_and_has_a_dynamic_batch(exported):
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(metadata["classes"]) == [str(d) for d in range(10)]


def test_onnx_runtime_matches_torch_on_1000_test_images(exported, mnist):
    digits = mnist["test"][0][:1000]
    ours = TorchPredictor(exported, device="cpu").probabilities(digits)
    onnx_predictor = OnnxPredictor(exported / "model.onnx")
    theirs = onnx_predictor.probabilities(digits)
    assert theirs.shape == (1000, 10)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1))
    assert np.abs(ours - theirs).max() <= 1e-5
    for batch in (1, 37):  # any batch size
        x = (digits[:batch, None] / np.float32(255)).astype(np.float32)
        assert onnx_predictor.run(x).shape == (batch, 10)


def test_every_backend_and_the_ensemble_meet_the_predictor_contract(exported, mnist):
    from mnist_cnn.config import BACKENDS
    from mnist_cnn.predict import EnsemblePredictor, Predictor, make_predictor

    digits = mnist["test"][0][:5]
    predictors = [make_predictor(exported, backend=backend) for backend in BACKENDS]
    predictors.append(EnsemblePredictor(predictors))
    assert [p.backend for p in predictors] == [*BACKENDS, "torch"]
    for predictor in predictors:
        assert isinstance(predictor, Predictor), type(predictor).__name__
        probabilities = predictor.probabilities(digits)
        assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
        assert predictor.describe()["classes"] == list(predictor.classes)
    assert not isinstance(object(), Predictor)


def test_a_calibrated_model_agrees_between_torch_and_onnxruntime(exported, mnist, tmp_path):
    """A model stored with a temperature (as training with --val-size stores it: in model.json
    and in the safetensors metadata): torch divides the logits by T, ONNX Runtime tempers the
    graph's plain softmax afterwards; both give softmax(logits / T) within 1e-5, also when
    only the safetensors metadata holds the calibration."""
    from mnist_cnn import checkpoints
    from mnist_cnn.checkpoints import open_model

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    loaded = open_model(run)
    calibration = {"temperature": 0.6, "min_confidence": 0.95}
    info = {key: value for key, value in loaded.info.items() if key not in ("format", "format_version", "config")}
    checkpoints.save_model(run, loaded.model, loaded.config, {**info, "calibration": calibration})
    digits = mnist["test"][0][:300]
    x = torch.from_numpy(digits[:, None]).float() / 255
    with torch.inference_mode():
        expected = torch.softmax(loaded.model(x).double() / 0.6, dim=1).numpy()
        plain = torch.softmax(loaded.model(x).double(), dim=1).numpy()
    assert np.abs(expected - plain).max() > 0.05  # the temperature changes the answers' confidence
    for only_metadata in (False, True):
        if only_metadata:
            (run / "model.json").unlink()
        predictors = TorchPredictor(run, device="cpu"), OnnxPredictor(run)
        for predictor in predictors:
            assert (predictor.temperature, predictor.min_confidence) == (0.6, 0.95), predictor.backend
            np.testing.assert_allclose(predictor.probabilities(digits), expected, atol=1e-5,
                                       err_msg=predictor.backend)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_export_matches(shipped_model, mnist, tmp_path):
    path = export_model(shipped_model, format="torchscript", output=tmp_path / "m.pt")
    extra = {"config.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["config.json"])["model"] == "bn"
    digits = mnist["test"][0][:500]
    x = torch.from_numpy(digits[:, None]).float() / 255
    with torch.inference_mode():
        theirs = scripted(x).numpy()
    ours = TorchPredictor(shipped_model, device="cpu").probabilities(digits)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1)) and np.abs(ours - theirs).max() <= 1e-5


def test_predict_with_the_onnxruntime_backend(exported, mnist, tmp_path):
    from conftest import on_paper

    for index in range(3):
        on_paper(mnist["test"][0][index]).save(tmp_path / f"d{index}.png")
    runs = {backend: cli("predict", "--model", str(exported), str(tmp_path), "--json",
                             "--backend", backend) for backend in ("torch", "onnxruntime")}
    for result in runs.values():
        assert result.returncode == 0, result.stderr
    torch_rows, onnx_rows = ([json.loads(line) for line in runs[b].stdout.splitlines()]
                             for b in ("torch", "onnxruntime"))
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows] == \
        [int(label) for label in mnist["test"][1][:3]]
    for a, b in zip(torch_rows, onnx_rows):
        assert np.abs(np.array(a["probabilities"]) - np.array(b["probabilities"])).max() <= 1e-5
    direct = cli("predict", "--model", str(exported / "model.onnx"), str(tmp_path / "d0.png"),
                     "--backend", "onnxruntime")
    assert direct.returncode == 0 and direct.stdout.startswith(f"{tmp_path / 'd0.png'}: 7 (")


def test_export_and_backend_errors(shipped_model, tmp_path):
    assert_one_line_error(cli("predict", "--model", str(shipped_model), str(tmp_path),
                                  "--backend", "onnxruntime"),
                          "no model.onnx here; create it with mnist-cnn export")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    assert_one_line_error(cli("predict", "--model", str(bad), str(tmp_path), "--backend", "onnxruntime"),
                          "not a loadable ONNX model")
    assert_one_line_error(cli("export", "--model", str(shipped_model), "--output",
                                  str(tmp_path / "missing" / "m.onnx")), "does not exist")
    assert_one_line_error(cli("export", "--model", str(tmp_path / "nothing")), "no such file or folder")


def test_onnxruntime_prediction_never_imports_torch(exported, mnist, tmp_path):
    """`predict --backend onnxruntime` reads, preprocesses and runs the ONNX session only:
    torch (1.3 s of start-up) must not be imported at all, nor numpy.ma (np.median's, 50 ms)
    or urllib.request (30 ms), which the command does not need."""
    import subprocess
    import sys

    from conftest import on_paper

    image = tmp_path / "digit.png"
    on_paper(mnist["test"][0][0]).save(image)
    code = ("import sys\nfrom mnist_cnn.cli import main\n"
            f"code = main(['predict', '--backend', 'onnxruntime', '--model', {str(exported)!r}, {str(image)!r}])\n"
            "print('torch imported:', 'torch' in sys.modules)\n"
            "print('others:', [m for m in ('numpy.ma', 'urllib.request') if m in sys.modules])\n"
            "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{image}: 7 ({result.stdout.split('(')[1].split(')')[0]})",
                                          "torch imported: False", "others: []"]
