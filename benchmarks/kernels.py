"""Per-block timings of the custom training kernels against torch's ops, and a whole step.

    .venv/bin/python benchmarks/kernels.py [--rounds 15] [--batches 128,256]

Each block (conv -> 2x2 max-pool -> ReLU) is timed forward + backward (weight and bias
gradients; the input gradient too for conv2, whose input comes from conv1), channels-last,
the way training calls it. The two variants alternate round by round (A B A B ...) in one
process, so load from other processes on a shared machine hits both alike; the table shows
medians over the rounds, each round the mean of several calls. `run.py --sections kernels`
includes the same table in the full report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import table  # noqa: E402

from mnist_cnn import kernels  # noqa: E402
from mnist_cnn.losses import kl_loss  # noqa: E402
from mnist_cnn.model import to_device  # noqa: E402


def interleaved(variants: dict, *, rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round, variants alternating."""
    for run in variants.values():
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - started) / calls)
    return samples


def block_variants(name: str, batch: int) -> dict:
    spec = kernels.BLOCKS[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, spec.in_channels, spec.size, spec.size, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(name != "conv1")
    conv = torch.nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel).to(memory_format=torch.channels_last)
    wanted = [t for t in (x, conv.weight, conv.bias) if t.requires_grad]
    grad = torch.randn(batch, spec.out_channels, spec.pooled, spec.pooled, generator=generator)

    def run(force: bool, fused: bool = False):
        out = kernels.conv_pool_relu(x, conv.weight, conv.bias, block=name, force=force, fused=fused,
                                     flat_output=name == "conv2")
        torch.autograd.grad(out, wanted, grad)

    return {"torch": lambda: run(False), "custom pool + backward": lambda: run(True),
            "custom, conv fused": lambda: run(True, fused=True)}


def step_variants(batch: int) -> dict:
    """A whole training step of the seed model (forward, KL loss, backward, fused Adam)."""
    torch.manual_seed(0)
    model = to_device(kernels.KernelSeedCNN(frozenset(kernels.BLOCKS)), "cpu").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step(choice: str):
        # One model for both, so both variants step the same weights: only the blocks differ.
        model.blocks = frozenset(kernels.BLOCKS) if choice == "custom" else frozenset()
        optimizer.zero_grad(set_to_none=True)
        kl_loss(model(x), y).backward()
        optimizer.step()

    return {"torch": lambda: step("torch"), "custom": lambda: step("custom")}


def measure(*, batches=(128, 256), rounds: int = 15, log=print) -> tuple[str, dict]:
    if kernels.load_library() is None:
        text = f"Custom kernels unavailable here: {kernels.failure()}"
        return text, {"unavailable": kernels.failure()}
    rows, figures = [], {}
    cases = [(f"{name}+pool+ReLU fwd+bwd", name, batch) for name in kernels.BLOCKS for batch in batches]
    cases += [("whole training step", "step", batch) for batch in batches]
    for label, name, batch in cases:
        variants = step_variants(batch) if name == "step" else block_variants(name, batch)
        samples = interleaved(variants, rounds=rounds, calls=5 if name == "step" else 10)
        ref = statistics.median(samples["torch"])
        figures[f"{name}/{batch}"] = samples
        for variant, times in samples.items():
            if variant == "torch":
                continue
            custom = statistics.median(times)
            what = label if name == "step" else f"{label} ({variant})"
            rows.append([what, str(batch), f"{1e3 * ref:.3f}", f"{1e3 * custom:.3f}", f"{ref / custom:.2f}×"])
            log(f"  {what}, batch {batch}: torch {1e3 * ref:.3f} ms, custom {1e3 * custom:.3f} ms")
    text = (f"### Custom training kernels vs torch ops ({torch.get_num_threads()} threads, channels-last; "
            f"median ms per call over {rounds} interleaved rounds)\n\n"
            + table(["what", "batch", "torch ms", "custom ms", "speed-up"], rows))
    return text, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default: 15)")
    parser.add_argument("--batches", default="128,256", help="batch sizes (default: 128,256)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the core count)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    text, _ = measure(batches=tuple(int(b) for b in args.batches.split(",")), rounds=args.rounds)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
