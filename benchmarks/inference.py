"""Inference throughput and end-to-end latency: torch eager, torch.compile, ONNX Runtime."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnist_cnn.config import TrainConfig
from mnist_cnn.data import load_dataset, scale
from mnist_cnn.export import export_model
from mnist_cnn.predict import OnnxPredictor
from mnist_cnn.preprocess import preprocess_file
from mnist_cnn.train import train
from tables import table

BATCHES = (1, 64, 1024)


def throughput(run, x, *, seconds: float = 0.7, rounds: int = 3) -> float:
    """Best images/s over `rounds` rounds of calling run(x) for about `seconds` each."""
    run(x)
    best = 0.0
    for _ in range(rounds):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run(x)
            count += 1
        best = max(best, count * len(x) / (time.perf_counter() - started))
    return best


def latencies(run, repeats: int = 300) -> list[float]:
    run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


def user_image(digit: np.ndarray, path: Path) -> Path:
    """A digit as a user's scan looks: dark ink on a 600x450 light page, off-centre."""
    big = np.asarray(Image.fromarray(digit).resize((180, 180), Image.Resampling.BICUBIC), np.float32)
    page = np.full((450, 600), 235.0, np.float32)
    page[120:300, 200:380] = 235 - big * (205 / 255)
    Image.fromarray(page.astype(np.uint8)).save(path)
    return path


def section_inference(args, device: torch.device, workdir: Path) -> tuple[str, dict]:
    run_dir = workdir / "inference-model"
    train(TrainConfig(epochs=1), run_dir=run_dir, device=str(device), progress=False, log=lambda m: None)
    from mnist_cnn.checkpoints import open_model

    model = open_model(run_dir, device=device).model
    test = load_dataset("mnist", splits=("test",), device=device)["test"]
    inputs = {batch: scale(test.images[:batch]) for batch in BATCHES}

    def probabilities(network):
        def run(x):
            with torch.inference_mode():
                out = torch.softmax(network(x), dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return run

    eager = probabilities(model)
    backends = {"torch eager": eager}
    compile_seconds = None
    try:
        started = time.perf_counter()
        compiled = torch.compile(model)
        with torch.inference_mode():
            for batch in BATCHES:  # compile every shape before timing
                compiled(inputs[batch])
        compile_seconds = time.perf_counter() - started
        backends["torch.compile"] = probabilities(compiled)
    except Exception as error:  # no compiler toolchain, unsupported platform
        print(f"  torch.compile unavailable: {type(error).__name__}: {error}")
    onnx_predictor = None
    if device.type == "cpu":
        onnx_predictor = OnnxPredictor(export_model(run_dir, format="onnx"))
        backends["ONNX Runtime"] = lambda x: onnx_predictor.run(x)
    rows, figures = [], {}
    for name, run in backends.items():
        rates = []
        for batch in BATCHES:
            x = inputs[batch].cpu().numpy() if name == "ONNX Runtime" else inputs[batch]
            rates.append(throughput(run, x))
        figures[name] = dict(zip(map(str, BATCHES), rates))
        print(f"  {name}: " + ", ".join(f"batch {b}: {r:,.0f}/s" for b, r in zip(BATCHES, rates)), flush=True)
        rows.append([name] + [f"{rate:,.0f}" for rate in rates])
    image = user_image(test.images[0, 0].cpu().numpy(), workdir / "user-digit.png")
    latency_rows = []
    end_to_end = {
        "torch eager": lambda: eager(scale(torch.from_numpy(preprocess_file(image))[None, None].to(device))),
    }
    if onnx_predictor is not None:
        end_to_end["ONNX Runtime"] = lambda: onnx_predictor.probabilities(preprocess_file(image)[None])
    for name, run in end_to_end.items():
        samples = latencies(run)
        figures[f"latency {name}"] = samples
        latency_rows.append([name, f"{statistics.median(samples):.2f}",
                             f"{np.percentile(samples, 95):.2f}", f"{min(samples):.2f}"])
    decode = latencies(lambda: preprocess_file(image))
    latency_rows.append(["(of which decode + preprocess)", f"{statistics.median(decode):.2f}",
                         f"{np.percentile(decode, 95):.2f}", f"{min(decode):.2f}"])
    text = ("### Inference (softmax probabilities; images/s, best of 3 rounds)\n\n"
            + table(["backend"] + [f"batch {b}" for b in BATCHES], rows)
            + (f"\n\ntorch.compile took {compile_seconds:.1f} s to compile the three shapes."
               if compile_seconds is not None else "")
            + "\n\nTarget: ≥ 50,000 images/s at a large batch.\n\n"
            "### Latency of one user image, end to end (decode a 600x450 PNG, preprocess, predict; ms)\n\n"
            + table(["backend", "p50", "p95", "min"], latency_rows)
            + "\n\nTarget: ≤ 2 ms p50.")
    return text, figures

