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
from torch import nn

from conftest import MNIST_MODEL_RECIPE, assert_one_line_error, assert_same_weights, cli, run_cli
from mnist_cnn.distributed import World, loopback_interface

pytestmark = pytest.mark.skipif(sys.platform != "linux" or loopback_interface() is None,
                                reason="uses /proc and the loopback interface")

# One and two processes differ as two seeds do (rank 1 draws its own dropout and augmentation;
# sums run in another order), so their accuracies are compared on the full MNIST, where the
# two land together (test_two_processes_reach_one_process_accuracy_on_full_mnist); on the
# 3,000 images of small_data the gap is noise of a few images (README). The runs on
# small_data below compare weights bit for bit, which needs no accuracy.
# An epoch here takes about 0.25 s: the Ctrl-C and the SIGKILL below must land before the
# run ends, so it has epochs enough to leave each of them a second or more.
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


def finish(processes: list[subprocess.Popen]) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once all exited with status 0; a process still running
    after TIMEOUT is killed, and the failure shows where each stood."""
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=TIMEOUT))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            outputs += [other.communicate() for other in processes[len(outputs):]]
            pytest.fail("\n".join(f"process {i} (status {p.returncode}): {out[-2000:]}{err[-4000:]}"
                                   for i, (p, (out, err)) in enumerate(zip(processes, outputs))))
    assert [process.returncode for process in processes] == [0] * len(processes), outputs
    return outputs



def last_record(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture
def one_thread():
    """The in-process one-process runs on one torch thread, as each of the two processes:
    on a busy 2-core machine a 2-thread run spends most of its time waiting for its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_node_run(small_data, tmp_path_factory) -> Path:
    """RECIPE on two torchrun invocations of one process each, joined by a c10d rendezvous on
    127.0.0.1 as two machines would be: the reference run of the tests below."""
    run = tmp_path_factory.mktemp("nodes") / "run"
    endpoint = f"127.0.0.1:{free_port()}"

    def node(rank: int) -> subprocess.Popen:
        # Both "machines" share 127.0.0.1, so torchrun's guess of which one hosts the
        # rendezvous store (by address) would say both; is_host says it, as one would on
        # machines whose names do not resolve to the endpoint's address.
        return torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
                        "--rdzv-conf", f"is_host={int(rank == 0)},join_timeout=120",
                        "--local-addr", "127.0.0.1", "-m", "mnist_cnn", "train", *RECIPE,
                        *data_args(small_data), "--run-dir", str(run))

    nodes = [node(0)]
    try:
        wait_for_listener(endpoint, nodes[0])
    except AssertionError:
        nodes[0].kill()
        raise
    nodes.append(node(1))
    return run, finish(nodes)


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


def test_the_ddp_wrapper_is_gone_before_the_process_group(small_data, tmp_path, monkeypatch):
    """World.close leaves the process group only once DistributedDataParallel, which holds
    it, is freed: the other order ended a rank with SIGABRT at exit now and then, after a
    finished run. (A real gloo group of one process, the model wrapped all the same.)"""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mnist_cnn import train as training
    from mnist_cnn.config import TrainConfig

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port()), "MNIST_CNN_THREADS": str(torch.get_num_threads()),
                        **env()}.items():
        monkeypatch.setenv(name, value)
    join_world = training.join_world

    def join_and_wrap(run, world):  # as with several processes, though there is one
        join_world(run, world)
        run.net = DistributedDataParallel(run.model)

    monkeypatch.setattr(training, "join_world", join_and_wrap)
    alive_at_destroy = []
    destroy = dist.destroy_process_group

    def counting_destroy(*args, **kwargs):
        alive_at_destroy.append(sum(type(o) is DistributedDataParallel for o in gc.get_objects()))
        return destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", counting_destroy)
    result = training.train(TrainConfig(dataset="custom", epochs=1), run_dir=tmp_path / "run",
                            data_dir=str(small_data), progress=False, log=lambda message: None)
    assert result.completed and alive_at_destroy == [0]
    assert not dist.is_initialized()


# ---------------------------------------------------------------- runs


def test_two_nodes_form_one_run(two_node_run):
    """World size 2 across the two invocations; rank 0 alone prints and writes (the c10d
    rendezvous, not --node-rank, decides which node's process is rank 0)."""
    run, outputs = two_node_run
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    printed = sorted((out for out, _ in outputs), key=len)
    assert "done:" not in printed[0] and printed[1].count("done: test accuracy") == 1, outputs
    assert sum(line.startswith("epoch ") for line in printed[1].splitlines()) == EPOCHS
    assert last_record(run)["test_accuracy"] > 0.8


# `mnist-cnn ARGS` as a launcher that also reports how each worker of `--nproc` ended:
# torchrun waits for its workers when it stops them (SubprocessContext._close, after a
# Ctrl-C) but keeps their exit statuses to itself.
REPORT_RANK_STATUSES = """
import sys
from torch.distributed.elastic.multiprocessing.api import SubprocessContext

close = SubprocessContext._close

def close_and_report(self, *args, **kwargs):
    close(self, *args, **kwargs)
    statuses = {rank: handler.proc.returncode for rank, handler in self.subprocess_handlers.items()}
    print(f"rank exit statuses: {statuses}", file=sys.stderr, flush=True)

SubprocessContext._close = close_and_report
from mnist_cnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wait_for(condition, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, (what, process.communicate())
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT} s"
        time.sleep(0.02)


def metrics_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def killed_run(small_data, tmp_path_factory) -> Path:
    """A RECIPE run under `--nproc 2`, stopped by Ctrl-C in its second epoch (every rank ends
    with status 130, rank 0 saves the step), resumed under `--nproc 2` and then SIGKILLed in
    rank 1 after the next checkpoint: what it leaves must resume to the uninterrupted weights."""
    run = tmp_path_factory.mktemp("killed") / "run"
    # Ctrl-C in a terminal reaches the launcher alone (torchrun starts each worker in a
    # session of its own); the launcher passes it on to every rank.
    launcher = subprocess.Popen(
        [sys.executable, "-c", REPORT_RANK_STATUSES, "train", "--nproc", "2", *RECIPE,
         *data_args(small_data), "--run-dir", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env()})
    wait_for((run / "checkpoint.pt").exists, "the first checkpoint", launcher)
    time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)
    stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1] == "rank exit statuses: {0: 130, 1: 130}", stderr
    assert "Traceback" not in stderr and "saved a checkpoint" in stdout, stdout + stderr
    assert f"continue with: mnist-cnn train --resume {run}" in stdout
    assert not (run / "model.safetensors").exists(), "the run finished before the Ctrl-C"

    launcher = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "train", "--nproc", "2", "--resume", str(run),
         "--no-report", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env()})
    done = metrics_lines(run)
    wait_for(lambda: metrics_lines(run) > done, "an epoch after the resume", launcher)
    os.kill(worker_pid(launcher.pid, local_rank=1), signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    assert launcher.returncode == 2, stderr
    assert "resuming" in stdout and "random streams restart" not in stdout
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


def test_resume_after_a_rank_was_killed_gives_the_uninterrupted_weights(killed_run, two_node_run, tmp_path):
    """`--nproc 2`, stopped by Ctrl-C, resumed, rank 1 killed, resumed: the weights of the
    uninterrupted two-node run, bit for bit (so two local processes and two "machines" also
    train the same weights)."""
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    result = run_cli("train", "--nproc", "2", "--resume", str(run), "--no-report", "--no-progress",
                     env=env(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stdout and "random streams restart" not in result.stdout
    assert_same_weights(run, two_node_run[0])
    assert (run / "metrics.jsonl").read_text().count("\n") == EPOCHS


def test_a_two_process_checkpoint_and_model_load_in_one_process(killed_run, two_node_run, tmp_path,
                                                                  one_thread):
    evaluated = cli("evaluate", str(killed_run / "checkpoint.pt"), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["total"] == 1000
    model = cli("evaluate", str(two_node_run[0]), "--json")
    assert model.returncode == 0, model.stderr
    assert json.loads(model.stdout)["accuracy"] == pytest.approx(last_record(two_node_run[0])["test_accuracy"])
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    resumed = cli("train", "--resume", str(run), "--no-report", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "written by 2 process(es), this run has 1" in resumed.stdout
    assert last_record(run)["test_accuracy"] > 0.8


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


def test_a_rank_whose_master_never_comes_fails_in_one_line(small_data, tmp_path):
    """Rank 1 with no rank 0 listening: torch's C++ side logs each failed connection (with a
    stack trace), and where the host name does not resolve, a "[c10d] The hostname of the
    client socket cannot be retrieved" line; the tool's stderr stays its one line."""
    port = free_port()  # nothing listens there
    lone = run_cli("train", *RECIPE, *data_args(small_data), "--run-dir", str(tmp_path / "run"),
                   env={**env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "MNIST_CNN_DIST_TIMEOUT": "2"}, timeout=TIMEOUT)
    assert_one_line_error(lone, "rank 1 of 2: could not form the process group", f"127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- accuracy (last: it waits for
# the session's shared model, which another test worker may be training)


@pytest.mark.slow
def test_two_processes_reach_one_process_accuracy_on_full_mnist(mnist_model, tmp_path):
    """The issue's check: same recipe (global batch, epochs, seed), final accuracy within 0.3
    points; the one process is the session's `mnist_model`. On the full MNIST the two land
    together (measured 2026-11-30 with this recipe: gaps of 0.04, 0.04 and 0.03 points for
    seeds 0, 1, 2, while the seeds themselves spread over 0.37 points). Also: rank 0 alone
    prints, and both report the global per-image training loss (a per-rank figure would be
    off by 2x)."""
    recipe = ["--preset", "fast", *(f"--{name}={value}" for name, value in MNIST_MODEL_RECIPE.items())]
    two = run_cli("train", "--nproc", "2", *recipe, "--no-report", "--no-progress",
                  "--run-dir", str(tmp_path / "two"), env=env(), timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done: test accuracy") == 1, two.stdout
    epochs = MNIST_MODEL_RECIPE["epochs"]
    assert sum(line.startswith("epoch ") for line in two.stdout.splitlines()) == epochs, two.stdout
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2
    assert config["config"] == json.loads((mnist_model / "config.json").read_text())["config"]
    two_final, one_final = last_record(tmp_path / "two"), last_record(mnist_model)
    assert two_final["test_total"] == one_final["test_total"] == 10000
    assert abs(two_final["test_accuracy"] - one_final["test_accuracy"]) <= 0.003, (two_final, one_final)
    assert two_final["train_loss"] == pytest.approx(one_final["train_loss"], rel=0.05)
