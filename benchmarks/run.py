"""mnist-cnn benchmarks: one command, tables printed and written as Markdown.

    .venv/bin/python benchmarks/run.py [--repeats 3] [--sections epoch,accuracy,flops,inference]

Every figure is measured in this run, on this machine; the Markdown file records the machine
(CPU, cores, threads, torch) and the date. Timing targets live here, not in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels as kernel_bench  # noqa: E402
import seed_pipeline  # noqa: E402
from inference import section_inference  # noqa: E402
from tables import table, write_report  # noqa: E402

from mnist_cnn import MnistCnnError  # noqa: E402
from mnist_cnn.config import TrainConfig, resolve_train_config  # noqa: E402
from mnist_cnn.data import load_dataset  # noqa: E402
from mnist_cnn.model import build_model  # noqa: E402
from mnist_cnn.runtime import cpu_model, resolve_device  # noqa: E402
from mnist_cnn.train import train  # noqa: E402

SECTIONS = ("epoch", "accuracy", "flops", "inference", "kernels", "startup")


def quiet(message: str) -> None:
    pass


def machine(device: torch.device) -> str:
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu_model()}, {torch.get_num_threads()} torch threads of {platform.machine()} "
            f"({__import__('os').cpu_count()} logical CPUs){gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; device {device}")


@contextlib.contextmanager
def kernels_env(choice: str | None):
    """MNIST_CNN_KERNELS=choice (None: unset, the default) for the duration."""
    previous = os.environ.pop("MNIST_CNN_KERNELS", None)
    if choice is not None:
        os.environ["MNIST_CNN_KERNELS"] = choice
    try:
        yield
    finally:
        os.environ.pop("MNIST_CNN_KERNELS", None)
        if previous is not None:
            os.environ["MNIST_CNN_KERNELS"] = previous


def our_epoch(config: TrainConfig, device: str, workdir: Path) -> dict:
    """One epoch of our pipeline (training pass + test pass), as `metrics.jsonl` times it."""
    run = tempfile.mkdtemp(dir=workdir)
    result = train(config, run_dir=Path(run) / "run", device=device, progress=False, log=quiet)
    return result.metrics[0]


def section_epoch(args, device: torch.device, workdir: Path) -> tuple[str, dict]:
    data = load_dataset("mnist", device="cpu")
    arrays = {split: (s.images[:, 0].numpy(), s.labels.numpy()) for split, s in data.items()}
    seed_times, our_times, our_train, torch_times, torch_train = [], [], [], [], []
    seed_accuracy = our_accuracy = 0.0
    for repeat in range(args.repeats):
        if device.type == "cpu":  # the tutorial's pipeline on the CPU; on a GPU we time only ours
            torch.manual_seed(repeat)
            model = seed_pipeline.CNN_MNIST()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            loaders = seed_pipeline.make_loaders(arrays["train"], arrays["test"])
            figures = seed_pipeline.run_epoch(model, optimizer, *loaders)
            seed_times.append(figures["seconds"])
            seed_accuracy = seed_pipeline.accuracy(model, loaders[1])
        record = our_epoch(TrainConfig(epochs=1, seed=repeat), str(device), workdir)
        our_times.append(record["seconds"])
        our_train.append(record["train_seconds"])
        our_accuracy = record["test_accuracy"]
        with kernels_env("torch"):  # the same pipeline with torch's ops instead of mnist_cnn.kernels
            record = our_epoch(TrainConfig(epochs=1, seed=repeat), str(device), workdir)
        torch_times.append(record["seconds"])
        torch_train.append(record["train_seconds"])
        print(f"  repeat {repeat + 1}: seed pipeline {seed_times[-1] if seed_times else float('nan'):.2f}s, "
              f"ours {our_times[-1]:.2f}s, ours with torch ops {torch_times[-1]:.2f}s", flush=True)
    rows = []
    if seed_times:
        rows.append(["tutorial's pipeline (re-created)", f"{min(seed_times):.2f}",
                     f"{statistics.median(seed_times):.2f}", f"{100 * seed_accuracy:.2f} %", "1.0×"])
    ratio = min(seed_times) / min(our_times) if seed_times else float("nan")
    rows.append(["mnist-cnn (`mnist-cnn train --epochs 1`)", f"{min(our_times):.2f}",
                 f"{statistics.median(our_times):.2f}", f"{100 * our_accuracy:.2f} %",
                 f"**{ratio:.1f}×**" if seed_times else "–"])
    rows.append(["mnist-cnn with `MNIST_CNN_KERNELS=torch` (torch's ops only)", f"{min(torch_times):.2f}",
                 f"{statistics.median(torch_times):.2f}", "",
                 f"{min(seed_times) / min(torch_times):.1f}×" if seed_times else "–"])
    text = ("### Epoch time, seed recipe (seed model, batch 128, Adam 1e-4, KL loss; training pass "
            f"+ test pass; {args.repeats} repeats, interleaved)\n\n"
            + table(["pipeline", "min s", "median s", "test acc after 1 epoch", "speed-up (min)"], rows)
            + "\n\nTarget: ours ≥ 4× faster.")
    return text, {"seed": seed_times, "ours": our_times, "ours_train": our_train, "ratio": ratio,
                  "ours_torch_ops": torch_times, "ours_torch_ops_train": torch_train}


def section_accuracy(args, device: torch.device, workdir: Path) -> tuple[str, dict]:
    targets = (0.982, 0.990)
    found: dict[float, list[float]] = {target: [] for target in targets}
    finals = []
    for seed in range(args.seeds):
        config = resolve_train_config("fast", {"seed": seed})
        run = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        metrics = train(config, run_dir=run, device=str(device), progress=False, log=quiet).metrics
        elapsed = 0.0
        reached: dict[float, float] = {}
        for record in metrics:
            elapsed += record["seconds"]
            for target in targets:
                if target not in reached and record["test_accuracy"] >= target:
                    reached[target] = elapsed
        for target in targets:
            found[target].append(reached.get(target, float("inf")))
        finals.append(metrics[-1]["test_accuracy"])
        print(f"  seed {seed}: " + ", ".join(f"{100 * t:.1f}% at {reached.get(t, float('inf')):.1f}s"
                                             for t in targets) + f", final {100 * finals[-1]:.2f}%", flush=True)
    rows = []
    for target, limit in zip(targets, (5.0, 30.0)):
        times = found[target]
        rows.append([f"{100 * target:.1f} %", f"{statistics.mean(times):.1f}", f"{min(times):.1f}",
                     f"{max(times):.1f}", f"≤ {limit:.0f} s", "met" if max(times) <= limit else "**missed**"])
    text = (f"### Time to accuracy, seed architecture (`--preset fast`, seeds 0–{args.seeds - 1}; wall time "
            "of training + per-epoch test passes until the test accuracy first reaches the target)\n\n"
            + table(["target", "mean s", "min s", "max s", "target", "status"], rows)
            + f"\n\nFinal accuracy after {config.epochs} epochs: "
            + ", ".join(f"{100 * a:.2f} %" for a in finals) + ".")
    return text, {"reached": {str(k): v for k, v in found.items()}, "finals": finals}


def training_flops_per_sample(device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from mnist_cnn.losses import kl_loss

    model = build_model("seed").to(device)
    x = torch.rand(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    # The model's nominal FLOPs, with torch's ops (build_model's model is plain torch): the
    # counter cannot see inside the custom kernels, which also skip work (a quarter of each
    # convolution's backward).
    with FlopCounterMode(display=False) as counter:
        kl_loss(model(x), y).backward()
    return counter.get_total_flops() / 128


def matmul_gflops(device: torch.device, size: int = 2048, seconds: float = 2.0) -> float:
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    torch.mm(a, b)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - started) / 1e9


def section_flops(args, device: torch.device, workdir: Path, epoch_figures: dict | None) -> tuple[str, dict]:
    per_sample = training_flops_per_sample(device)
    peak = matmul_gflops(device)
    if epoch_figures is None:
        epoch_figures = {"ours_train": [our_epoch(TrainConfig(epochs=1), str(device), workdir)["train_seconds"]]}
    passes = {"mnist-cnn (custom kernels where faster)": min(epoch_figures["ours_train"])}
    if epoch_figures.get("ours_torch_ops_train"):
        passes["mnist-cnn, `MNIST_CNN_KERNELS=torch`"] = min(epoch_figures["ours_torch_ops_train"])
    floor = per_sample * 60000 / 1e9 / peak
    rows, achieved = [], {}
    for label, train_seconds in passes.items():
        achieved[label] = per_sample * 60000 / train_seconds / 1e9
        rows.append([label, f"{per_sample / 1e6:.2f}", f"{per_sample * 60000 / 1e9:.1f}", f"{train_seconds:.2f}",
                     f"{achieved[label]:.1f}", f"{peak:.0f}", f"{100 * achieved[label] / peak:.0f} %",
                     f"{floor:.2f}", f"{train_seconds / floor:.1f}×"])
    text = ("### Achieved training GFLOP/s (seed recipe, batch 128; the model's FLOPs, counted by "
            "torch.utils.flop_counter on forward + backward with torch's ops)\n\n"
            + table(["training pass", "MFLOP / sample", "GFLOP / epoch", "train pass s (min)", "achieved GFLOP/s",
                     "fp32 matmul GFLOP/s (2048²)", "of matmul rate", "floor s / epoch", "above floor"], rows))
    main_label = next(iter(passes))
    return text, {"flops_per_sample": per_sample, "achieved_gflops": achieved[main_label],
                  "achieved_gflops_by_pass": achieved, "matmul_gflops": peak, "floor_seconds": floor}


def section_kernels(args, device: torch.device, workdir: Path) -> tuple[str, dict]:
    if device.type != "cpu":
        return "### Custom training kernels\n\nCPU only; not measured on this device.", {}
    text, figures = kernel_bench.measure(rounds=15, log=lambda line: print(line, flush=True))
    return text, figures


FIRST_STEP = """
import os, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

def first_step(optimizer, args, kwargs):
    print(f"FIRST-STEP {time.time()!r}", file=sys.stderr, flush=True)
    os._exit(0)

register_optimizer_step_post_hook(first_step)
from mnist_cnn.__main__ import main
sys.argv = ["mnist-cnn", *sys.argv[1:]]
main()
"""


def time_to_first_step(run_dir: Path, env: dict) -> float:
    """Seconds from starting `mnist-cnn train` to the end of its first optimizer step."""
    import subprocess

    started = time.time()
    result = subprocess.run([sys.executable, "-c", FIRST_STEP, "train", "--epochs", "1", "--run-dir",
                             str(run_dir), "--no-progress", "--no-report"],
                            env=env, capture_output=True, text=True, timeout=600)
    for line in result.stderr.splitlines():
        if line.startswith("FIRST-STEP "):
            return float(line.split()[1]) - started
    raise RuntimeError(f"`mnist-cnn train` never stepped:\n{result.stderr[-2000:]}")


def section_startup(args, device: torch.device, workdir: Path) -> tuple[str, dict]:
    """Time to the first step, as a user sees it; also with an empty cache (the first run on a
    machine, which builds the custom kernels) and with torch's ops only."""
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]))}
    base.pop("MNIST_CNN_KERNELS", None)
    cases = {"default (kernels cached)": base, "`MNIST_CNN_KERNELS=torch`": {**base, "MNIST_CNN_KERNELS": "torch"}}
    samples: dict[str, list[float]] = {label: [] for label in cases}
    samples["first run on this machine (builds the kernels)"] = []
    for repeat in range(3):
        for label, env in cases.items():
            samples[label].append(time_to_first_step(Path(tempfile.mkdtemp(dir=workdir)) / "run", env))
        empty_cache = {**base, "MNIST_CNN_CACHE": tempfile.mkdtemp(dir=workdir)}
        samples["first run on this machine (builds the kernels)"].append(
            time_to_first_step(Path(tempfile.mkdtemp(dir=workdir)) / "run", empty_cache))
        print("  " + ", ".join(f"{label} {times[-1]:.2f}s" for label, times in samples.items()), flush=True)
    rows = [[label, f"{min(times):.2f}", f"{statistics.median(times):.2f}"] for label, times in samples.items()]
    text = ("### Time from `mnist-cnn train` to the first step (process start to the end of the first "
            "optimizer step; 3 repeats, interleaved)\n\n" + table(["case", "min s", "median s"], rows))
    return text, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="epoch-time repeats (default: 3)")
    parser.add_argument("--seeds", type=int, default=3, help="time-to-accuracy seeds (default: 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--output", help="Markdown file (default: benchmarks/results/<date>-<device>.md)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    try:
        device = resolve_device(args.device)
    except MnistCnnError as error:
        parser.error(str(error))
    today = datetime.date.today().isoformat()
    header = f"## Benchmarks, {today}\n\nMachine: {machine(device)}."
    print(header, flush=True)
    parts, figures = [header], {}
    with tempfile.TemporaryDirectory() as workdir:
        for name in sections:
            print(f"\n[{name}]", flush=True)
            if name == "epoch":
                text, figures[name] = section_epoch(args, device, Path(workdir))
            elif name == "accuracy":
                text, figures[name] = section_accuracy(args, device, Path(workdir))
            elif name == "flops":
                text, figures[name] = section_flops(args, device, Path(workdir), figures.get("epoch"))
            elif name == "kernels":
                text, figures[name] = section_kernels(args, device, Path(workdir))
            elif name == "startup":
                text, figures[name] = section_startup(args, device, Path(workdir))
            else:
                text, figures[name] = section_inference(args, device, Path(workdir))
            print("\n" + text, flush=True)
            parts.append(text)
    output = Path(args.output) if args.output else (
        Path(__file__).parent / "results" / f"{today}-{device.type}.md")
    write_report(output, parts, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
