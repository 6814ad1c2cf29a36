"""The honest accuracy floors: the seed architecture trained on the full MNIST, here and now,
with a quick recipe; and the shipped model (the best-oe preset) evaluated afresh."""

from __future__ import annotations

import json

import pytest

from conftest import MNIST_MODEL_RECIPE
from mnist_cnn.evaluate import evaluate_model
from mnist_cnn.runs import PRETRAINED_DIR


@pytest.mark.slow
def test_a_quick_recipe_reaches_97_5_percent_on_full_mnist(mnist_model):
    """`mnist_model` is `--preset fast --epochs 2` on all 60,000 training images, evaluated on
    all 10,000 test images (measured 97.83-98.20 % over seeds 0-2, 2026-11-30)."""
    info = json.loads((mnist_model / "model.json").read_text())
    assert info["config"]["model"] == "seed" and info["config"]["preset"] == "fast"
    final = info["metrics"]
    assert final["epoch"] == MNIST_MODEL_RECIPE["epochs"] and final["test_total"] == 10000
    assert final["test_accuracy"] >= 0.975, final
    report = evaluate_model(mnist_model, device="cpu")
    assert report["correct"] == final["test_correct"]


def test_the_shipped_model_scores_99_5_percent():
    """The best-oe preset's weights, as shipped, scored on the full test set now (not
    read from its model.json), so a change to the model or the data path that broke the
    weights' meaning would show here."""
    report = evaluate_model(PRETRAINED_DIR, device="cpu")
    assert report["total"] == 10000 and report["accuracy"] >= 0.995, report
    info = json.loads((PRETRAINED_DIR / "model.json").read_text())
    assert info["config"]["preset"] == "best-oe" and info["config"]["epochs"] == 10
    assert report["correct"] == info["metrics"]["test_correct"]
