"""The training loop as it runs on an accelerator, checked on the CPU: no host sync per step
(the NaN check is deferred), same results as the ordinary loop, and the `gpu-fast` recipe."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_weights, poison_loss
from mnist_cnn import train as training
from mnist_cnn.config import PRESETS, TrainConfig, resolve_train_config
from mnist_cnn.train import TrainingDiverged, train


def small_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"dataset": "custom", "epochs": 2, **overrides})


def counting_checks(monkeypatch, every: int | None) -> list[int]:
    """Record each NaN check (a host read of the loss) and, if `every`, defer them as on a GPU."""
    calls: list[int] = []
    real = training.check_finite

    def counted(loss, run, **kwargs):
        calls.append(run.step)
        return real(loss, run, **kwargs)

    monkeypatch.setattr(training, "check_finite", counted)
    if every is not None:
        monkeypatch.setattr(training, "finite_check_every", lambda device: every)
    return calls


def test_accelerators_check_every_32_steps_and_cpus_every_step():
    assert training.finite_check_every(torch.device("cpu")) == 1
    assert training.finite_check_every(torch.device("cuda", 0)) == training.FINITE_CHECK_STEPS == 32


def test_deferred_checks_read_the_loss_rarely_and_train_the_same(tmp_path, small_data, monkeypatch):
    steps = -(-3000 // 128)  # 24 steps per epoch
    per_step = counting_checks(monkeypatch, None)
    train(small_config(), run_dir=tmp_path / "cpu", data_dir=str(small_data), progress=False, log=lambda m: None)
    assert len(per_step) == 2 * steps
    monkeypatch.undo()
    deferred = counting_checks(monkeypatch, 5)
    train(small_config(), run_dir=tmp_path / "gpu", data_dir=str(small_data), progress=False, log=lambda m: None)
    assert deferred == [5, 10, 15, 20, 24] * 2  # after these steps, and at each epoch's end
    assert_same_weights(tmp_path / "cpu", tmp_path / "gpu")


def test_a_deferred_check_still_keeps_nan_out_of_the_checkpoint(tmp_path, small_data, monkeypatch):
    counting_checks(monkeypatch, 5)
    poison_loss(monkeypatch, -(-3000 // 128) + 3)  # the 3rd step of epoch 2 goes wrong
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"the loss became nan by epoch 2, step 5 \(checked every 5 "
                                               r"steps\); the last checkpoint"):
        train(small_config(epochs=3), run_dir=run, data_dir=str(small_data), progress=False, log=lambda m: None)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 0
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_the_gpu_fast_recipe_trains_in_the_deferred_loop(tmp_path, small_data, monkeypatch):
    """`--preset gpu-fast`: large batches at a scaled-up rate, trained here as a GPU would
    (checks every 32 steps: here, once per epoch of 3 steps)."""
    config = resolve_train_config("gpu-fast", {"dataset": "custom", "epochs": 8})
    assert (config.batch_size, config.lr, config.model) == (1024, PRESETS["gpu-fast"]["lr"], "seed")
    assert config.lr > PRESETS["fast"]["lr"] and config.batch_size > PRESETS["fast"]["batch_size"]
    checks = counting_checks(monkeypatch, training.FINITE_CHECK_STEPS)
    result = train(config, run_dir=tmp_path / "run", data_dir=str(small_data), progress=False, log=lambda m: None)
    assert checks == [3] * 8  # 3,000 images: 3 steps an epoch, one check at each epoch's end
    assert result.metrics[-1]["test_accuracy"] > 0.75, result.metrics[-1]  # 84.6 % measured; chance: 10 %
