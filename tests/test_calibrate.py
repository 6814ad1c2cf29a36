"""Calibrated confidence: temperature fit, ECE, the "unsure" threshold, and how training
stores them and predict uses them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open

from conftest import cli
from mnist_cnn.calibrate import (DEFAULT_MIN_CONFIDENCE, confidence_threshold, expected_calibration_error,
                                 fit_temperature, temper)
from mnist_cnn.config import TrainConfig
from mnist_cnn.predict import TorchPredictor, predict_files
from mnist_cnn.train import train


def calibrated_sample(n: int = 4000, classes: int = 10, seed: int = 0):
    """Logits and labels drawn from softmax(logits): calibrated at temperature 1 by construction."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator)[:, 0]
    return logits, labels


def test_fit_temperature_recovers_a_known_overconfidence():
    logits, labels = calibrated_sample()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)
    assert fit_temperature(logits * 2.5, labels) == pytest.approx(2.5, rel=0.08)
    assert fit_temperature(logits * 0.5, labels) == pytest.approx(0.5, rel=0.08)


def test_ece_by_hand_and_after_temperature():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4]])
    # bins of width 1/15: 0.9 and 0.6 land in different bins; |1 - 0.9| / 2 + |0 - 0.6| / 2
    assert expected_calibration_error(probabilities, np.array([0, 1])) == pytest.approx(0.35)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0
    logits, labels = calibrated_sample(seed=1)
    hot = torch.softmax(logits * 3, dim=1).numpy()
    fixed = torch.softmax(logits * 3 / fit_temperature(logits * 3, labels), dim=1).numpy()
    before, after = (expected_calibration_error(p, labels.numpy()) for p in (hot, fixed))
    assert before > 0.1 and after < 0.03


def test_threshold_keeps_99_percent_of_correct_answers():
    logits, labels = calibrated_sample(seed=2)
    probabilities = torch.softmax(logits, dim=1).numpy()
    threshold = confidence_threshold(probabilities, labels.numpy())
    correct = probabilities.argmax(1) == labels.numpy()
    confidence = probabilities.max(1)[correct]
    assert (confidence >= threshold).mean() >= 0.99
    assert (confidence > threshold).mean() < 0.99  # the largest such threshold: one step higher fails
    assert confidence_threshold(probabilities, labels.numpy(), keep=1.0) == confidence.min()


def test_temper_matches_softmax_of_scaled_logits():
    logits, _ = calibrated_sample(n=50)
    probabilities = torch.softmax(logits, dim=1).numpy()
    assert np.allclose(temper(probabilities, 2.0), torch.softmax(logits / 2, dim=1).numpy(), atol=1e-6)
    assert temper(probabilities, 1.0) is probabilities


def letters(font_size: int = 120) -> dict[str, Image.Image]:
    """A-Z drawn in the system's DejaVu Sans (Pillow's built-in font where it is missing),
    dark on light, as a user's drawing would be."""
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", font_size)
    except OSError:
        font = ImageFont.load_default(size=font_size)
    images = {}
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        image = Image.new("L", (200, 200), 255)
        ImageDraw.Draw(image).text((40, 20), letter, fill=0, font=font)
        images[letter] = image
    return images


def ece_by_hand(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The README's ECE (15 equal-width bins of the top probability, image-weighted mean of
    |accuracy - confidence|), written out independently of mnist_cnn.calibrate."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    total = 0.0
    for k in range(bins):
        low, high = k / bins, (k + 1) / bins
        members = (confidence > low) & (confidence <= high) if k else confidence <= high
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return total / len(labels)


def assert_calibration_recomputes(run, data_dir, config: TrainConfig, calibration: dict) -> None:
    """The stored calibration, recomputed from the model on disk and the validation split
    (the same held-out images, chosen by the seed): the temperature minimises the validation
    NLL, the threshold is the largest that 99 % of the correct validation answers reach, and
    the test ECE and NLL before and after are what the stored numbers say."""
    from mnist_cnn.data import hold_out, load_dataset
    from mnist_cnn.evaluate import split_logits
    from mnist_cnn.checkpoints import open_model

    data = load_dataset("custom", str(data_dir))
    _, validation = hold_out(data["train"], calibration["validation_images"], seed=config.seed)
    model = open_model(run).model
    val_logits, test_logits = (split_logits(model, split).double() for split in (validation, data["test"]))
    val_labels, test_labels = validation.labels, data["test"].labels
    temperature = calibration["temperature"]
    assert abs(temperature - 1) > 0.05  # the model's temperature matters below

    def nll(logits, labels, t):
        return float(torch.nn.functional.cross_entropy(logits / t, labels))

    assert nll(val_logits, val_labels, temperature) < min(nll(val_logits, val_labels, temperature * f)
                                                          for f in (0.98, 1.02, 1.0 / temperature))
    assert calibration["test_nll_before"] == pytest.approx(nll(test_logits, test_labels, 1.0), rel=1e-9)
    assert calibration["test_nll_after"] == pytest.approx(nll(test_logits, test_labels, temperature), rel=1e-9)

    val_p = torch.softmax(val_logits / temperature, dim=1).numpy()
    correct = val_p.argmax(1) == val_labels.numpy()
    confidence = np.sort(val_p.max(1)[correct])
    keep = int(math.ceil(0.99 * len(confidence) - 1e-9))  # correct answers that must pass
    assert calibration["min_confidence"] == pytest.approx(confidence[len(confidence) - keep], abs=1e-12)
    assert (confidence >= calibration["min_confidence"]).mean() >= 0.99
    assert (confidence > calibration["min_confidence"]).mean() < 0.99  # the largest such threshold

    test_y = test_labels.numpy()
    for key, t in (("test_ece_before", 1.0), ("test_ece_after", temperature)):
        expected = ece_by_hand(torch.softmax(test_logits / t, dim=1).numpy(), test_y)
        assert calibration[key] == pytest.approx(expected, abs=1e-9), key
    after = torch.softmax(test_logits / temperature, dim=1).numpy()
    right = after.argmax(1) == test_y
    passing = ((after.max(1) >= calibration["min_confidence"]) & right).sum() / right.sum()
    assert calibration["test_correct_passing"] == pytest.approx(passing, abs=1e-12)


def test_training_with_validation_stores_calibration_and_predict_uses_it(tmp_path, small_data):
    config = TrainConfig(dataset="custom", epochs=1, batch_size=128, lr=3e-3, loss="ce",
                         schedule="onecycle", val_size=500)
    lines: list[str] = []
    run = train(config, run_dir=tmp_path / "run", data_dir=str(small_data), progress=False,
                log=lines.append).run_dir
    calibration = json.loads((run / "model.json").read_text())["calibration"]
    assert calibration["validation_images"] == 500 and calibration["fitted_on"] == "validation"
    assert_calibration_recomputes(run, small_data, config, calibration)
    assert any(line.startswith("calibration: temperature") for line in lines)
    with safe_open(str(run / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["calibration"]) == calibration

    predictor = TorchPredictor(run, device="cpu")
    assert predictor.temperature == calibration["temperature"]
    assert predictor.min_confidence == calibration["min_confidence"]
    digits = np.zeros((2, 28, 28), np.uint8)
    digits[:, 8:20, 12:16] = 255
    x = torch.from_numpy(digits[:, None]).float() / 255
    with torch.inference_mode():
        expected = torch.softmax(predictor.model(x) / calibration["temperature"], dim=1).numpy()
    assert np.allclose(predictor.probabilities(digits), expected, atol=1e-6)

    # letters: each answer is unsure exactly when its top probability is below the threshold
    folder = tmp_path / "letters"
    folder.mkdir()
    for letter, image in letters().items():
        image.save(folder / f"{letter}.png")
    results = predict_files(predictor, [str(folder)])
    assert len(results) == 26 and all(r.error is None for r in results)
    for result in results:
        assert result.unsure == (max(result.probabilities) < calibration["min_confidence"])
        assert result.to_json()["unsure"] == result.unsure
    everything = predict_files(predictor, [str(folder)], min_confidence=1.0)
    assert all(r.unsure for r in everything) and "unsure (best guess" in everything[0].to_text()
    assert not any(r.unsure for r in predict_files(predictor, [str(folder)], min_confidence=0.0))

    by_cli = cli("predict", "--model", str(run), str(folder / "A.png"), "--json", "--min-confidence", "1")
    assert by_cli.returncode == 0, by_cli.stderr
    record = json.loads(by_cli.stdout)
    assert record["unsure"] is True and record["min_confidence"] == 1.0
    bad = cli("predict", "--model", str(run), str(folder / "A.png"), "--min-confidence", "1.5")
    assert bad.returncode == 2 and "--min-confidence" in bad.stderr


def test_models_without_validation_use_the_documented_default():
    from mnist_cnn.checkpoints import PRETRAINED_DIR

    predictor = TorchPredictor(PRETRAINED_DIR, device="cpu")  # trained without --val-size
    assert predictor.temperature == 1.0 and predictor.min_confidence == DEFAULT_MIN_CONFIDENCE
