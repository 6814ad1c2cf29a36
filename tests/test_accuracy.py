"""The honest accuracy floor: the seed architecture trained on the full MNIST."""

from __future__ import annotations

import pytest

from mnist_cnn.config import resolve_train_config
from mnist_cnn.evaluate import evaluate_model
from mnist_cnn.train import train


@pytest.mark.slow
def test_fast_preset_reaches_98_5_percent_on_full_mnist(tmp_path):
    config = resolve_train_config("fast", {})
    assert config.model == "seed"
    result = train(config, run_dir=tmp_path / "fast", progress=False, log=print)
    final = result.metrics[-1]
    assert final["test_total"] == 10000
    assert final["test_accuracy"] >= 0.985, final
    report = evaluate_model(tmp_path / "fast", device="cpu")
    assert report["correct"] == final["test_correct"]
