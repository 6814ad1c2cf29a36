"""Data-parallel benchmark: epoch time with 1 and P processes on this machine, and what the
processes spend talking to each other per step.

    .venv/bin/python benchmarks/distributed.py [--nproc 2] [--presets seed,fast] [--epochs 1]

1. `mnist-cnn train --preset NAME --epochs N` on the full MNIST: one process with all cores,
   one process with cores/P threads, and `--nproc P` (torchrun --standalone, gloo) with
   cores/P threads each: the training time of the epochs (metrics.jsonl's
   train_seconds, rank 0's clock, evaluation excluded) and the command's wall time (start-up,
   data loading, evaluation and the final model included).
2. Under torchrun itself with P processes: the communication one training step adds, timed
   alone: an all-reduce of a buffer of the seed model's gradient size (what
   DistributedDataParallel does, in its buckets) and the two scalar all-reduces of each step
   (the loss, and the stop flag that keeps Ctrl-C consistent across ranks).

Prints Markdown tables and writes them, with the machine, its load and the date, to
benchmarks/results/<date>-distributed.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REPEATS = 200  # timed all-reduces per size, after 20 untimed


def train_once(preset: str, epochs: int, nproc: int, threads: int, folder: Path) -> dict:
    """One `mnist-cnn train` with `nproc` processes of `threads` torch threads each."""
    run = folder / f"{preset}-{nproc}-{threads}"
    command = [sys.executable, "-m", "mnist_cnn", "train", "--preset", preset, "--epochs", str(epochs),
               "--run-dir", str(run), "--device", "cpu", "--no-report", "--no-progress"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads), "MNIST_CNN_THREADS": str(threads)})
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = json.loads((run / "config.json").read_text())["steps_per_epoch"] * epochs
    seconds = sum(record["train_seconds"] for record in records)
    return {"preset": preset, "processes": nproc, "threads": threads, "train_seconds": seconds,
            "wall_seconds": wall,
            "ms_per_step": 1000 * seconds / steps, "images_per_second": 60000 * epochs / seconds,
            "test_accuracy": records[-1]["test_accuracy"]}


def communication_worker(output: str) -> None:
    """Run under torchrun: time the all-reduces of one training step; rank 0 writes JSON."""
    import torch
    import torch.distributed as dist

    from mnist_cnn.distributed import start
    from mnist_cnn.model import build_model, count_parameters

    world = start("cpu")
    parameters = count_parameters(build_model("seed"))
    results = {}
    for name, size in (("gradients (seed model)", parameters), ("one scalar", 1)):
        buffer = torch.ones(size)
        for _ in range(20):
            dist.all_reduce(buffer)
        world.barrier()
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - started)
        results[name] = {"floats": size, "median_us": 1e6 * statistics.median(times),
                         "p90_us": 1e6 * sorted(times)[int(0.9 * len(times))]}
    if world.is_main:
        Path(output).write_text(json.dumps({"processes": world.size, "threads": torch.get_num_threads(),
                                            "sizes": results}))
    world.close()


def measure_communication(nproc: int, folder: Path) -> dict:
    output = folder / "communication.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", __file__, "--communication-worker", str(output)],
                   check=True, capture_output=True, text=True,
                   env={**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))})
    return json.loads(output.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--presets", default="seed,fast")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--communication-worker", metavar="OUTPUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.communication_worker:
        communication_worker(args.communication_worker)
        return
    from mnist_cnn.runtime import cpu_model

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cores = os.cpu_count() or 1
        shapes = [(1, cores), (1, max(1, cores // args.nproc)), (args.nproc, max(1, cores // args.nproc))]
        runs = [train_once(preset, args.epochs, nproc, threads, folder)
                for preset in args.presets.split(",") for nproc, threads in dict.fromkeys(shapes)]
        communication = measure_communication(args.nproc, folder)
    when = datetime.now(timezone.utc)
    machine = (f"{cpu_model()}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}; "
               f"load average {load:.1f} at the start (other work on the machine slows every figure)")
    epoch_rows = [[run["preset"], run["processes"], run["threads"], f"{run['train_seconds']:.1f}", f"{run['ms_per_step']:.1f}",
                   f"{run['images_per_second']:,.0f}", f"{run['wall_seconds']:.1f}",
                   f"{100 * run['test_accuracy']:.2f}"] for run in runs]
    comm_rows = [[name, f"{entry['floats']:,}", f"{entry['median_us']:.0f}", f"{entry['p90_us']:.0f}"]
                 for name, entry in communication["sizes"].items()]
    text = "\n".join([
        f"# Data-parallel training, {when:%Y-%m-%d %H:%M} UTC", "", machine, "",
        f"## Epoch time, {args.epochs} epoch(s) of MNIST (60,000 images), gloo on the CPU", "",
        table(["preset", "processes", "threads each", "train s", "ms/step", "images/s", "wall s", "test acc %"], epoch_rows),
        "", f"## Communication per step, {communication['processes']} processes "
        f"({communication['threads']} torch threads each), {REPEATS} all-reduces", "",
        table(["all-reduce of", "floats", "median µs", "p90 µs"], comm_rows), ""])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{when:%Y-%m-%d}-distributed"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"date": when.isoformat(), "machine": machine,
                                                     "epochs": runs, "communication": communication},
                                                    indent=2) + "\n")


if __name__ == "__main__":
    main()
