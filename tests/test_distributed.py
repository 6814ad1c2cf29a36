"""Data-parallel training under torchrun, on the CPU (gloo, 127.0.0.1): two processes match
one, are deterministic, also form across two `torchrun` "nodes", survive losing a rank
(resume gives the uninterrupted run's weights) and fail fast when a peer never comes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import assert_one_line_error, cli, run_cli
from mnist_cnn.distributed import World, loopback_interface

pytestmark = pytest.mark.skipif(sys.platform != "linux" or loopback_interface() is None,
                                reason="uses /proc and the loopback interface")

# One and two processes differ as two seeds do (rank 1 draws its own dropout and augmentation;
# sums run in another order), so their accuracy gap on small_data's 1,000 test images is noise
# of a few images. Measured (2026-11-30, the one process on 2 threads): with this recipe,
# seeds 0, 1, 2 gave gaps of 0.2, 0.4, 0.5 points; with 15 epochs, seeds 0-3 gave 0.2, 0.0,
# 0.7, 0.4 (and seed 0 gave 0.4 with the one process on 1 thread). The 0.3 points
# (3 images) is below that noise, so the check below allows 1 point; the exact claim, "the
# same gradient as one process", is test_rank_objectives_average_to_the_one_process_gradient.
ACCURACY_GAP = 0.01
EPOCHS = 6
RECIPE = ["--preset", "fast", "--epochs", str(EPOCHS), "--batch-size", "64", "--seed", "0"]
TIMEOUT = 240  # seconds per command: generous for a loaded 2-core machine


def env() -> dict[str, str]:
    # One thread per process whatever the launch (2 local processes or 2 "nodes" of 1): the
    # thread count changes the order of float sums, and the tests compare weights bit for bit.
    return {"GLOO_SOCKET_IFNAME": loopback_interface() or "lo", "MNIST_CNN_THREADS": "1",
            "MNIST_CNN_DIST_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"}


def data_args(small_data: Path) -> list[str]:
    return ["--dataset", "custom", "--data-dir", str(small_data), "--no-report", "--no-progress"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env()}, **kwargs)


def wait_for_listener(endpoint: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until something accepts connections at `endpoint` (host:port), while `process` lives."""
    import time

    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened at {endpoint} within {timeout} s")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def final_accuracy(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]


@pytest.fixture
def one_thread():
    """The in-process one-process runs on one torch thread, as each of the two processes:
    on a busy 2-core machine a 2-thread run spends most of its time waiting for its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_process_run(small_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`mnist-cnn train --nproc 2` with RECIPE: the reference for the tests below."""
    run = tmp_path_factory.mktemp("ddp") / "two"
    result = run_cli("train", "--nproc", "2", *RECIPE, *data_args(small_data), "--run-dir", str(run),
                     env=env(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return run, result


# ---------------------------------------------------------------- the arithmetic


@pytest.mark.parametrize("mean", [True, False], ids=["ce-mean", "kl-sum"])
def test_rank_objectives_average_to_the_one_process_gradient(mean):
    """Rank shares of a global batch of 5 (3 + 2 images): the average of the ranks' gradients
    of World.objective (what DistributedDataParallel computes) is one process's gradient."""
    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 3), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    reduction = "mean" if mean else "sum"

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return model.weight.grad.clone()

    expected = gradient(nn.functional.cross_entropy(model(x), y, reduction=reduction))
    world = World(size=2)
    shares = [slice(0, None, 2), slice(1, None, 2)]
    average = sum(gradient(world.objective(nn.functional.cross_entropy(model(x[s]), y[s], reduction=reduction),
                                           images=5, share=len(y[s]), mean=mean)) for s in shares) / 2
    torch.testing.assert_close(average, expected)


# ---------------------------------------------------------------- runs


def test_two_processes_match_one_process(two_process_run, small_data, tmp_path, one_thread):
    run, result = two_process_run
    # Rank 0 alone prints: each epoch once, one summary.
    assert result.stdout.count("done: test accuracy") == 1, result.stdout
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == EPOCHS
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    single = cli("train", *RECIPE, *data_args(small_data), "--run-dir", str(one))
    assert single.returncode == 0, single.stderr
    two_accuracy, one_accuracy = final_accuracy(run), final_accuracy(one)
    assert two_accuracy > 0.9, two_accuracy
    assert abs(two_accuracy - one_accuracy) <= ACCURACY_GAP, (two_accuracy, one_accuracy)
    # Both report the global per-image training loss (measured within 2 % for seeds 0-3; a
    # per-rank figure would be off by 2x).
    losses = [json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
              for folder in (run, one)]
    assert losses[0] == pytest.approx(losses[1], rel=0.05), losses


@pytest.mark.slow
def test_two_processes_reach_one_process_accuracy_on_full_mnist(tmp_path, one_thread):
    """The issue's check: same global batch, epochs and seed, final accuracy within 0.3
    points. On the full MNIST the two runs land together (measured 2026-11-30 with this
    recipe: gaps of 0.02, 0.01 and 0.06 points for seeds 0, 1, 2, while the seeds themselves
    spread over 0.38 points); on the 3,000-image set above they do not (see ACCURACY_GAP)."""
    recipe = ["--preset", "fast", "--epochs", "2", "--seed", "0", "--no-report", "--no-progress"]
    two = run_cli("train", "--nproc", "2", *recipe, "--run-dir", str(tmp_path / "two"), env=env(),
                  timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr
    one = cli("train", *recipe, "--run-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two_accuracy, one_accuracy = final_accuracy(tmp_path / "two"), final_accuracy(tmp_path / "one")
    assert two_accuracy > 0.97 and json.loads((tmp_path / "two" / "metrics.jsonl").read_text()
                                              .splitlines()[-1])["test_total"] == 10000
    assert abs(two_accuracy - one_accuracy) <= 0.003, (two_accuracy, one_accuracy)


def test_two_nodes_form_one_run_with_the_same_weights(two_process_run, small_data, tmp_path):
    """Two torchrun invocations of one process each, joined by a c10d rendezvous on
    127.0.0.1 as two machines would be: world size 2 again, so the same weights."""
    run = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    def node(rank: int) -> subprocess.Popen:
        return torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
                        "--local-addr", "127.0.0.1", "-m", "mnist_cnn", "train", *RECIPE,
                        *data_args(small_data), "--run-dir", str(run))

    # Both "machines" share 127.0.0.1, so each could take itself for the rendezvous host; as
    # on real machines, node 0 (the endpoint's owner) comes up first and node 1 joins it.
    first = node(0)
    wait_for_listener(endpoint, first)
    nodes = [first, node(1)]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_same_weights(run, two_process_run[0])


@pytest.fixture(scope="module")
def killed_run(small_data, tmp_path_factory) -> Path:
    """A RECIPE run under `--nproc 2` whose rank 1 was SIGKILLed after the first checkpoint."""
    run = tmp_path_factory.mktemp("killed") / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "train", "--nproc", "2", *RECIPE, *data_args(small_data),
         "--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env()})
    deadline = time.monotonic() + TIMEOUT
    while not (run / "checkpoint.pt").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.02)
    os.kill(worker_pid(launcher.pid, local_rank=1), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 2, stderr
    assert "rank 1" in stderr and "was killed by SIGKILL" in stderr, stderr
    assert not (run / "model.safetensors").exists(), "the run finished before the kill"
    return run


def worker_pid(launcher: int, *, local_rank: int) -> int:
    """The pid of the launcher's worker process with LOCAL_RANK=local_rank (Linux /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} among {children}")


def test_resume_after_a_rank_was_killed_gives_the_uninterrupted_weights(killed_run, two_process_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    result = run_cli("train", "--nproc", "2", "--resume", str(run), "--no-report", "--no-progress",
                     env=env(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "random streams restart" not in result.stdout
    assert_same_weights(run, two_process_run[0])
    assert (run / "metrics.jsonl").read_text().count("\n") == EPOCHS


def test_a_two_process_checkpoint_and_model_load_in_one_process(killed_run, two_process_run, tmp_path,
                                                                  one_thread):
    evaluated = cli("evaluate", str(killed_run / "checkpoint.pt"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["total"] == 1000
    model = cli("evaluate", str(two_process_run[0]), "--json")
    assert model.returncode == 0, model.stderr
    assert json.loads(model.stdout)["accuracy"] == pytest.approx(final_accuracy(two_process_run[0]))
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    resumed = cli("train", "--resume", str(run), "--no-report", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "written by 2 process(es), this run has 1" in resumed.stdout
    assert final_accuracy(run) > 0.9


# ---------------------------------------------------------------- failing fast


def test_peers_that_never_come_fail_fast_with_a_clear_message(small_data, tmp_path):
    """torchrun's own rendezvous (--nnodes 2, one node started) and our process group (the
    variables a launcher sets by hand, rank 1 never started) both give up within their
    timeouts; ours says so in one line and leaves no run folder."""
    port = free_port()
    lone_node = torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf", "join_timeout=2",
                         "--local-addr", "127.0.0.1", "-m", "mnist_cnn", "train", *data_args(small_data))
    started = time.monotonic()
    lone_rank = run_cli("train", *RECIPE, *data_args(small_data), "--run-dir", str(tmp_path / "run"),
                        env={**env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                             "MNIST_CNN_DIST_TIMEOUT": "2"}, timeout=TIMEOUT)
    assert_one_line_error(lone_rank, "rank 0 of 2: could not form the process group",
                          f"127.0.0.1:{port}", "MNIST_CNN_DIST_TIMEOUT")
    assert not (tmp_path / "run").exists()
    _, stderr = lone_node.communicate(timeout=TIMEOUT)
    assert lone_node.returncode != 0 and "RendezvousTimeoutError" in stderr, stderr
    assert time.monotonic() - started < 60
