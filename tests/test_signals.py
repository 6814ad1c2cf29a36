"""Signals at a chosen moment, deterministically: Ctrl-C or SIGTERM during step k of an epoch
saves a checkpoint at step k + 1 and the resumed run ends with the uninterrupted run's weights;
a second Ctrl-C stops at once; SIGKILL in the middle of a checkpoint write leaves the previous
checkpoint intact; `serve` stops with status 0 on SIGTERM. (`--nproc 2` and Ctrl-C:
test_distributed.py.)

The signal is sent by the training process to itself from inside a step: the loop calls
`mnist_cnn.train.check_finite(loss, run)` once per optimizer step, after the forward and
before the update, with `run.epoch` and `run.step` saying which step it is; the tests wrap it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, cli, require_module, write_dataset

STEPS = 10  # optimizer steps per epoch: 640 images in batches of 64
SIGNAL_EPOCH, SIGNAL_STEP = 1, 3  # 0-based: during the 4th step of the 2nd epoch


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, mnist) -> Path:
    """640 training and 200 test images of MNIST: 10 steps an epoch, a run in well under a second."""
    return write_dataset(tmp_path_factory.mktemp("tiny"), {
        "train": (mnist["train"][0][:640], mnist["train"][1][:640]),
        "test": (mnist["test"][0][:200], mnist["test"][1][:200]),
    })


def recipe(data: Path) -> list[str]:
    # --shift draws random numbers every step: a resume restores the random state exactly or
    # the weights differ.
    return ["--epochs", "2", "--batch-size", "64", "--shift", "1", "--dataset", "custom",
            "--data-dir", str(data), "--no-progress", "--no-report"]


RESUME = ["--no-progress", "--no-report"]



def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = cli("train", *recipe(tiny_data), "--run-dir", str(run))
    assert result.returncode == 0, result.stderr
    return run


def _sigterm_unhandled(signum, frame):
    raise AssertionError("SIGTERM reached the default action: a real process would have died of it")


@pytest.fixture
def sigterm_fails_the_test():
    """SIGTERM's default action would end the test process itself: while the test runs, a
    SIGTERM that the code under test does not handle fails the test instead."""
    previous = signal.signal(signal.SIGTERM, _sigterm_unhandled)
    yield _sigterm_unhandled
    signal.signal(signal.SIGTERM, previous)


def signal_during(monkeypatch, signums: list[int], *, epoch: int, step: int) -> list[tuple[int, int, bytes]]:
    """Send `signums` to this process during step `step` of epoch `epoch` (both 0-based);
    returns (epoch, step, checkpoint bytes at the time) of every step that started."""
    from mnist_cnn import train as training

    real_check = training.check_finite
    started: list[tuple[int, int, bytes]] = []

    def check_then_signal(loss, run):
        checkpoint = run.run_dir / "checkpoint.pt"
        started.append((run.epoch, run.step, checkpoint.read_bytes() if checkpoint.exists() else b""))
        if (run.epoch, run.step) == (epoch, step):
            for signum in signums:
                os.kill(os.getpid(), signum)
        real_check(loss, run)

    monkeypatch.setattr(training, "check_finite", check_then_signal)
    return started


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_step_k_saves_step_k_plus_1_and_resume_is_bit_identical(
        signum, tiny_data, reference, tmp_path, monkeypatch, sigterm_fails_the_test):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    started = signal_during(monkeypatch, [signum], epoch=SIGNAL_EPOCH, step=SIGNAL_STEP)
    stopped = cli("train", *recipe(tiny_data), "--run-dir", str(run))
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr == ""
    name = signal.Signals(signum).name
    assert (f"{name}: saved a checkpoint at epoch {SIGNAL_EPOCH + 1}, step {SIGNAL_STEP + 1}/{STEPS}; "
            f"continue with: mnist-cnn train --resume {run}") in stopped.stdout
    assert [s[:2] for s in started][-1] == (SIGNAL_EPOCH, SIGNAL_STEP)  # the step in progress, no other
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (SIGNAL_EPOCH, SIGNAL_STEP + 1)
    assert not (run / "model.safetensors").exists() and len(metrics(run)) == SIGNAL_EPOCH
    monkeypatch.undo()

    resumed = cli("train", "--resume", str(run), *RESUME)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at epoch {SIGNAL_EPOCH + 1}/2, step {SIGNAL_STEP + 1}/{STEPS}" in resumed.stdout
    assert_same_weights(reference, run)
    ours, theirs = metrics(run), metrics(reference)
    assert [r["epoch"] for r in ours] == [1, 2]
    for record, expected in zip(ours, theirs):  # the interrupted epoch's loss is summed on across the stop
        for key in ("train_loss", "test_loss", "test_correct"):
            assert record[key] == expected[key], key


def test_with_ema_the_average_is_checkpointed_and_a_resume_is_bit_identical(tiny_data, tmp_path, monkeypatch):
    argv = [*recipe(tiny_data), "--ema", "0.9"]
    reference = tmp_path / "reference"
    assert cli("train", *argv, "--run-dir", str(reference)).returncode == 0
    run = tmp_path / "run"
    signal_during(monkeypatch, [signal.SIGINT], epoch=SIGNAL_EPOCH, step=SIGNAL_STEP)
    assert cli("train", *argv, "--run-dir", str(run)).returncode == 130
    assert "average" in torch.load(run / "checkpoint.pt", weights_only=True)
    monkeypatch.undo()
    assert cli("train", "--resume", str(run), *RESUME).returncode == 0
    assert_same_weights(reference, run)
    assert [r["test_loss"] for r in metrics(run)] == [r["test_loss"] for r in metrics(reference)]


def test_a_second_ctrl_c_stops_at_once(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    started = signal_during(monkeypatch, [signal.SIGINT, signal.SIGINT], epoch=SIGNAL_EPOCH, step=SIGNAL_STEP)
    result = cli("train", *recipe(tiny_data), "--run-dir", str(run))
    assert result.returncode == 130
    assert result.stderr == "mnist-cnn train: interrupted\n"
    assert "saved a checkpoint" not in result.stdout
    # the step in progress was not finished and no checkpoint was written since it began
    epoch, step, checkpoint_then = started[-1]
    assert (epoch, step) == (SIGNAL_EPOCH, SIGNAL_STEP) and checkpoint_then
    assert (run / "checkpoint.pt").read_bytes() == checkpoint_then
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 0
    assert not list(run.glob(".checkpoint.pt.*")) and not (run / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def train_and_kill_during_second_checkpoint(argv: list[str], replaced: Path) -> int:
    """`mnist-cnn ARGV` in a forked child whose second checkpoint write is killed half-way
    (SIGKILL, which no handler can catch): half of the new checkpoint's bytes are on disk,
    fsync'ed, in the temporary file. The child first copies the checkpoint it is replacing to
    `replaced`. Returns the child's exit status. (A fork, not a fresh interpreter: it saves
    importing torch again.)"""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            import io

            from mnist_cnn.cli import main

            real_save, saves = torch.save, []

            def save(state, handle, *args, **kwargs):
                if isinstance(state, dict) and state.get("format") == "mnist-cnn-checkpoint":
                    saves.append(state["epoch"])
                    if len(saves) == 2:
                        shutil.copy(Path(handle.name).parent / "checkpoint.pt", replaced)
                        whole = io.BytesIO()
                        real_save(state, whole, *args, **kwargs)
                        handle.write(whole.getvalue()[: len(whole.getvalue()) // 2])
                        handle.flush()
                        os.fsync(handle.fileno())
                        os.kill(os.getpid(), signal.SIGKILL)
                return real_save(state, handle, *args, **kwargs)

            torch.save = save
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                main(argv)
        finally:
            os._exit(3)  # only if it was not killed
    deadline = time.monotonic() + 300
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the training child did not finish within 300 s")
        time.sleep(0.02)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tiny_data, reference, tmp_path):
    run = tmp_path / "run"
    status = train_and_kill_during_second_checkpoint(["train", *recipe(tiny_data), "--run-dir", str(run)],
                                                     tmp_path / "replaced.pt")
    assert status == -signal.SIGKILL
    partial = list(run.glob(".checkpoint.pt.*"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill came mid-write
    assert (run / "checkpoint.pt").read_bytes() == (tmp_path / "replaced.pt").read_bytes()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert not (run / "model.safetensors").exists()

    resumed = cli("train", "--resume", str(run), *RESUME)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.glob(".checkpoint.pt.*"))  # the torn file is cleaned up
    assert_same_weights(reference, run)
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_stops_with_status_0_on_sigterm(shipped_model, tmp_path, sigterm_fails_the_test):
    """A service manager stops `serve` with SIGTERM: a clean stop, status 0, as Ctrl-C
    (test_serve_browser.py). Run in this process: the signal comes from a thread once the
    server answers."""
    require_module("fastapi")
    model = tmp_path / "model"
    shutil.copytree(shipped_model, model)
    port, answered = free_port(), []

    def stop_once_up() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
                    answered.append(response.status)
                    break
            except OSError:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_up, daemon=True)
    stopper.start()
    result = cli("serve", "--model", str(model), "--port", str(port), "--device", "cpu")
    stopper.join(timeout=60)
    assert signal.getsignal(signal.SIGTERM) is sigterm_fails_the_test  # serve put it back
    assert answered == [200], result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and result.stdout.rstrip().endswith("stopped")
