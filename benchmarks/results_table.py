"""The "Presets and what they reach" table of docs/training.md, re-run from scratch.

    .venv/bin/python benchmarks/results_table.py [--seeds 0 1 2] [--only best,fast]
        [--runs-dir runs/results-table] [--fashion-dir DIR] [--measure-only]

Each entry is trained with the exact `mnist-cnn train` command printed beside it, one run at
a time; a run folder that already holds a finished model is reused (its timing.json keeps the
wall and CPU seconds measured when it was trained). Then, per run: test accuracy (exact, from
model.json), parameters, multiply-adds per image, the epoch and time at which test accuracy
first reached 99.6 % (MNIST), test ECE before/after calibration, the user-style accuracy (the
four renderings of tests/test_preprocess.py on the first 1,000 test digits) and how many of
the letters A-Z (tests/test_calibrate.py's rendering) `predict` answers "unsure" at the
model's default --min-confidence. Writes benchmarks/results/<date>-results.{json,md}.

Presets were chosen on their validation split only; every figure here is on the test set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from tables import table  # noqa: E402

FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"), Path("/work/shared/data/fashion-mnist"))
# name → (data set, flags after `mnist-cnn train`)
ENTRIES = {
    "seed": ("mnist", ["--preset", "seed"]),
    "fast": ("mnist", ["--preset", "fast"]),
    "best": ("mnist", ["--preset", "best"]),
    "best-fashion": ("fashion-mnist", ["--preset", "best-fashion"]),
}
MILESTONE = 0.996  # MNIST: when test accuracy first reaches it


def machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def display(command: list[str]) -> str:
    """The command as a user types it, with paths under the repository made relative."""
    return "mnist-cnn " + " ".join(command[3:]).replace(str(ROOT) + "/", "")


def train_run(name: str, seed: int, runs_dir: Path, fashion_dir: Path | None) -> Path | None:
    dataset, flags = ENTRIES[name]
    run = runs_dir / f"{name}-s{seed}"
    command = [sys.executable, "-m", "mnist_cnn", "train", *flags, "--seed", str(seed),
               "--run-dir", str(run), "--no-report", "--no-progress"]
    if dataset == "fashion-mnist":
        if fashion_dir is None:
            print(f"skip {name}: Fashion-MNIST not found (--fashion-dir)")
            return None
        command += ["--data-dir", str(fashion_dir)]
    if (run / "model.safetensors").is_file() and (run / "timing.json").is_file():
        return run
    if run.exists():
        raise SystemExit(f"{run} exists but is unfinished: remove it or resume it with mnist-cnn train --resume")
    print("$", display(command), flush=True)
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {"wall_seconds": time.perf_counter() - started,
              "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
              "command": display(command),
              "load_average_after": os.getloadavg()}
    (run / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return run


def user_style_accuracy(model, images, labels) -> float:
    """Mean accuracy over the four renderings the preprocessing test uses for users' files."""
    import numpy as np
    import torch
    from PIL import Image
    from test_preprocess import jpeg, on_paper, transparent

    from mnist_cnn.data import scale
    from mnist_cnn.preprocess import preprocess

    rng = np.random.default_rng(0)
    makers = [
        lambda d: on_paper(d, at=(int(rng.integers(0, 250)), int(rng.integers(0, 130))), rng=rng),
        lambda d: transparent(d),
        lambda d: jpeg(on_paper(d, size=int(rng.integers(60, 200)), rng=rng)),
        lambda d: Image.fromarray(d).resize((40, 52)),
    ]
    scores = []
    for make in makers:
        user = np.stack([preprocess(make(d)) for d in images])
        with torch.inference_mode():
            predicted = model(scale(torch.from_numpy(user)[:, None])).argmax(1).numpy()
        scores.append(float((predicted == labels).mean()))
    return statistics.mean(scores)


def letters_unsure(run: Path, folder: Path) -> int:
    from test_calibrate import letters

    from mnist_cnn.predict import TorchPredictor, predict_files

    folder.mkdir(parents=True, exist_ok=True)
    for letter, image in letters().items():
        image.save(folder / f"{letter}.png")
    results = predict_files(TorchPredictor(run, device="cpu"), [str(folder)])
    return sum(result.unsure for result in results)


def preset_of(config: dict) -> str | None:
    """The preset a run's recipe is, also when it was given as the preset's explicit flags."""
    from mnist_cnn.config import PRESETS, TrainConfig

    if config.get("preset"):
        return config["preset"]
    # Compared with the defaults filled in (runs older than a field lack it), and without
    # `kernels`: how a run computed, not what it trained.
    ignored = {"preset", "kernels"}
    actual = {k: v for k, v in TrainConfig.from_dict(config).to_dict().items() if k not in ignored}
    for name, values in PRESETS.items():
        expected = TrainConfig.from_dict({**values, "seed": config["seed"]}).to_dict()
        if {k: v for k, v in expected.items() if k not in ignored} == actual:
            return name
    return None


def measure(run: Path, mnist_test) -> dict:
    from mnist_cnn.explain import multiply_adds
    from mnist_cnn.model import build_model
    from mnist_cnn.predict import TorchPredictor
    from mnist_cnn.checkpoints import open_model
    from mnist_cnn.runs import read_metrics

    info = json.loads((run / "model.json").read_text())
    timing = json.loads((run / "timing.json").read_text())
    metrics = read_metrics(run)
    config = info["config"]
    elapsed, milestone = 0.0, None
    for record in metrics:
        elapsed += record["seconds"]
        if milestone is None and record["test_accuracy"] >= MILESTONE:
            milestone = {"epoch": record["epoch"], "seconds": elapsed}
    row = {
        "run": str(run), "dataset": config["dataset"], "model": config["model"], "preset": preset_of(config),
        "seed": config["seed"], "accuracy": info["evaluation"]["accuracy"],
        "correct": info["evaluation"]["correct"], "total": info["evaluation"]["total"],
        "parameters": info["parameters"], "multiply_adds": multiply_adds(build_model(config["model"])),
        "train_seconds": info["train_seconds_total"], **timing,
        "first_996": milestone, "calibration": info.get("calibration"),
        "min_confidence": TorchPredictor(run, device="cpu").min_confidence,
    }
    if config["dataset"] == "mnist":
        images, labels = mnist_test
        row["user_style_accuracy"] = user_style_accuracy(open_model(run).model, images, labels)
        row["letters_unsure"] = letters_unsure(run, run.parent / "letters")
    return row


def summarise(rows: list[dict]) -> list[list[str]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["preset"]), []).append(row)
    out = []
    for (dataset, model, preset), group in groups.items():
        accuracies = [100 * r["accuracy"] for r in group]
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(group) > 1 else ""
        mean = lambda key: statistics.mean(r[key] for r in group)  # noqa: E731
        milestones = [r["first_996"] for r in group if r["first_996"]]
        user = [r["user_style_accuracy"] for r in group if "user_style_accuracy" in r]
        ece = [r["calibration"] for r in group if r["calibration"]]
        out.append([
            dataset, model, preset or "-", f"{statistics.mean(accuracies):.2f}{spread} (n={len(group)}: "
            + ", ".join(f"{a:.2f}" for a in accuracies) + ")",
            f"{mean('wall_seconds'):.0f} s / {mean('cpu_seconds'):.0f} s",
            f"{group[0]['parameters']:,}", f"{group[0]['multiply_adds'] / 1e6:.2f} M",
            ("-" if dataset != "mnist" else ", ".join(f"ep {m['epoch']}, {m['seconds']:.0f} s" for m in milestones)
             or "not reached"),
            f"{100 * statistics.mean(user):.2f}" if user else "-",
            (f"{100 * statistics.mean(c['test_ece_before'] for c in ece):.2f} → "
             f"{100 * statistics.mean(c['test_ece_after'] for c in ece):.2f}") if ece else "-",
            (f"{statistics.mean(r['letters_unsure'] for r in group):.1f}/26 at "
             f"{statistics.mean(r['min_confidence'] for r in group):.3f}") if "letters_unsure" in group[0] else "-",
        ])
    return out


HEADERS = ["data set", "model", "preset", "test accuracy % (mean ± std)", "wall / CPU time",
           "parameters", "multiply-adds / image", "first ≥ 99.6 %", "user-style %",
           "test ECE % before → after", "letters unsure (default threshold)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", help="comma-separated entries (default: all): " + ", ".join(ENTRIES))
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "results-table")
    parser.add_argument("--fashion-dir", type=Path,
                        default=next((d for d in FASHION_DIRS if d.is_dir()), None))
    parser.add_argument("--measure-only", action="store_true", help="tabulate the finished runs; train nothing")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(ENTRIES)
    runs = []
    for name in names:
        for seed in args.seeds:
            run = args.runs_dir / f"{name}-s{seed}"
            if args.measure_only:
                if (run / "timing.json").is_file() and (run / "model.safetensors").is_file():
                    runs.append(run)
                continue
            run = train_run(name, seed, args.runs_dir, args.fashion_dir)
            if run is not None:
                runs.append(run)

    from mnist_cnn.data import load_dataset

    test = load_dataset("mnist", splits=("test",))["test"]
    mnist_test = (test.images[:1000, 0].numpy(), test.labels[:1000].numpy())
    rows = [measure(run, mnist_test) for run in runs]
    date = datetime.date.today().isoformat()
    markdown = "\n".join([
        f"Measured {date} on {machine()} ({os.cpu_count()} logical CPUs), torch "
        f"{__import__('torch').__version__}; wall time of the training command and its CPU time "
        "(user + system, all threads).", "",
        table(HEADERS, summarise(rows)), "",
        "Commands:", "", *sorted({"    " + row["command"].replace(str(ROOT) + "/", "") for row in rows}), ""])
    out = ROOT / "benchmarks" / "results" / f"{date}-results"
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "date": date, "runs": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
