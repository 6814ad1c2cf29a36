"""Performance round 3: the training kernels against torch's ops, our epoch against the
tutorial's pipeline, and where a training step's time goes, on this machine.

    .venv/bin/python benchmarks/round3.py [--repeats 3] [--rounds 9] [--threads 1,2]

One bounded command (about 1-2 minutes on a quiet 2-core machine) that writes
benchmarks/results/<date>-round3-<vendor>.md and .json: the machine (CPU model, vendor,
threads, load average before and after), the date, and every sample. Variants alternate
(A B A B ...) within one process, so load from other processes hits them alike; the tables
show medians, and ratios are only taken between figures of the same run. The epoch is timed
at each thread count given (default: 1 and torch's default, the core count): on a machine
shared with other jobs, torch's multi-threaded ops slow down far more than one thread does.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels as kernel_bench  # noqa: E402
from run import machine, section_epoch  # noqa: E402
from tables import table, write_report  # noqa: E402

from mnist_cnn import kernels  # noqa: E402
from mnist_cnn.data import load_dataset, train_batches  # noqa: E402
from mnist_cnn.losses import batch_loss  # noqa: E402
from mnist_cnn.model import build_model, to_device  # noqa: E402
from mnist_cnn.runtime import cpu_model  # noqa: E402


def head_variants(batch: int) -> dict:
    """The head (linear, dropout, ReLU, linear) and the KL loss, forward + backward."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 256, generator=generator).requires_grad_()
    lin1, lin2 = torch.nn.Linear(256, 96), torch.nn.Linear(96, 10)
    labels = torch.arange(batch) % 10
    params = (x, lin1.weight, lin1.bias, lin2.weight, lin2.bias)

    def run(force: bool):
        logits = kernels.head(*params, p=0.2, force=force)
        torch.autograd.grad(batch_loss("kl", logits, labels), params)

    return {"torch": lambda: run(False), "custom": lambda: run(True)}


def section_pieces(rounds: int) -> tuple[str, dict]:
    text, figures = kernel_bench.measure(batches=(128,), rounds=rounds, log=lambda line: print(line, flush=True))
    samples = kernel_bench.interleaved(head_variants(128), rounds=rounds, calls=10)
    ref, ours = statistics.median(samples["torch"]), statistics.median(samples["custom"])
    figures["head/128"] = samples
    text += "\n" + table(["what", "batch", "torch ms", "custom ms", "speed-up"], [[
        "head: lin1, dropout, ReLU, lin2 + KL loss, fwd+bwd", "128", f"{1e3 * ref:.3f}", f"{1e3 * ours:.3f}",
        f"{ref / ours:.2f}×"]]).split("\n", 2)[2]
    print(f"  head, batch 128: torch {1e3 * ref:.3f} ms, custom {1e3 * ours:.3f} ms", flush=True)
    return text, figures


def section_profile(steps: int = 40) -> tuple[str, dict]:
    """torch.profiler over `steps` steps of the seed recipe (defaults: the kernels where on)."""
    from torch.profiler import ProfilerActivity, profile

    data = load_dataset("mnist", device="cpu")
    torch.manual_seed(0)
    model = to_device(build_model("seed"), "cpu").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    batches = list(train_batches(data["train"], 128, seed=0, epoch=0))[:steps + 5]

    def step(x, y):
        loss = batch_loss("kl", model(x), y)
        float(loss.detach())  # the loop's NaN check
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for x, y in batches[:5]:
        step(x, y)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches[5:]:
            step(x, y)
    wall = (time.perf_counter() - started) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows, figures = [], {"ms_per_step_profiled": 1e3 * wall, "ops": {}}
    for event in events[:14]:
        share = event.self_cpu_time_total / total
        per_step = event.self_cpu_time_total / steps / 1e3
        figures["ops"][event.key] = {"ms_per_step": per_step, "share": share, "calls": event.count / steps}
        rows.append([f"`{event.key}`", f"{per_step:.3f}", f"{100 * share:.1f} %", f"{event.count / steps:g}"])
    text = (f"### Where a training step's time goes (seed recipe, batch 128, {steps} steps under "
            f"torch.profiler; {1e3 * wall:.2f} ms per step with the profiler on)\n\n"
            + table(["op (self time)", "ms / step", "share", "calls / step"], rows))
    return text, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="epoch repeats (default: 3)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per kernel timing (default: 9)")
    parser.add_argument("--threads", help="comma-separated torch thread counts for the epoch; the first "
                        "also for the other sections (default: 1 and torch's default, the core count)")
    parser.add_argument("--sections", default="pieces,epoch,profile", help="subset of pieces,epoch,profile")
    parser.add_argument("--budget", type=float, default=170.0,
                        help="seconds after which the remaining epoch thread counts and sections are "
                             "skipped (default: 170; a busy machine can take 10x longer)")
    parser.add_argument("--output", help="Markdown file (default: benchmarks/results/<date>-round3-<vendor>.md)")
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    counts = ([int(n) for n in args.threads.split(",")] if args.threads
              else sorted({1, default_threads}))
    torch.set_num_threads(counts[0])
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(kernels._cpu_vendor(), "other")
    today = datetime.date.today().isoformat()
    load_before = os.getloadavg()
    header = (f"## Performance round 3, {today}\n\nMachine: {machine(torch.device('cpu'))}. "
              f"CPU vendor {kernels._cpu_vendor() or '?'}; load average before "
              f"{load_before[0]:.1f}. Kernels: {'built' if kernels.load_library() else kernels.failure()}; "
              f"on by default here: {', '.join(b for b in ('conv1', 'conv2', 'head') if kernels.DEFAULT_ON.get(kernels._cpu_vendor(), {}).get(b)) or 'none'}.")
    print(header, flush=True)
    parts, figures = [header], {"machine": {"cpu": cpu_model(), "vendor": kernels._cpu_vendor(),
                                            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                            "python": platform.python_version(), "torch": torch.__version__,
                                            "date": today, "load_before": load_before}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
            print(f"\n[{name}]", flush=True)
            if time.perf_counter() - started > args.budget:
                parts.append(f"(section {name} skipped: over the {args.budget:g} s budget)")
                continue
            if name == "pieces":
                text, figures[name] = section_pieces(args.rounds)
            elif name == "epoch":
                texts, figures[name] = [], {}
                for count in counts:
                    if texts and time.perf_counter() - started > args.budget:
                        texts.append(f"(epoch at {count} threads skipped: over the {args.budget:g} s budget)")
                        continue
                    torch.set_num_threads(count)
                    print(f"  {count} thread(s)", flush=True)
                    part, figures[name][str(count)] = section_epoch(
                        SimpleNamespace(repeats=args.repeats), torch.device("cpu"), Path(workdir))
                    texts.append(part.replace("### Epoch time,", f"### Epoch time, {count} thread(s),", 1))
                torch.set_num_threads(counts[0])
                text = "\n\n".join(texts)
            elif name == "profile":
                text, figures[name] = section_profile()
            else:
                parser.error(f"unknown section {name!r}")
            print("\n" + text, flush=True)
            parts.append(text)
    load_after = os.getloadavg()
    figures["machine"]["load_after"] = load_after
    figures["machine"]["seconds"] = time.perf_counter() - started
    parts.append(f"Load average after: {load_after[0]:.1f} (over 1 minute; on {os.cpu_count()} CPUs). "
                 f"Took {time.perf_counter() - started:.0f} s.")
    output = Path(args.output) if args.output else (
        Path(__file__).parent / "results" / f"{today}-round3-{vendor}.md")
    write_report(output, parts, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
