"""Does test-time augmentation pay? Each run's model reads every image as it is and moved
slightly (whole-pixel and half-pixel shifts, turns of 5 and 10 degrees, scale 0.9 and 1.1);
a set of views is scored by the argmax of its mean probabilities.

    .venv/bin/python benchmarks/test_time_augmentation.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results]

Each run is scored on its own validation split (the images its `--val-size` and `--seed`
held out; runs without one are refused) to choose by, and on the test split to report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tables import table  # noqa: E402

from mnist_cnn.augment import affine_matrices, apply_affine  # noqa: E402
from mnist_cnn.checkpoints import load_split_for, open_model  # noqa: E402
from mnist_cnn.data import Split, hold_out, scale  # noqa: E402

# name: (degrees, scale, dx, dy)
VIEWS = {
    "as is": (0, 1.0, 0, 0),
    **{f"shift {dx:+g},{dy:+g}": (0, 1.0, dx, dy)
       for step in (1, 0.5) for dx, dy in ((step, 0), (-step, 0), (0, step), (0, -step))},
    **{f"turn {a:+d}": (a, 1.0, 0, 0) for a in (5, -5, 10, -10)},
    **{f"scale {s:g}": (0, s, 0, 0) for s in (0.9, 1.1)},
}
SHIFTS_1 = [name for name in VIEWS if name.startswith("shift") and "0.5" not in name]
SHIFTS_HALF = [name for name in VIEWS if "0.5" in name]
SETS = {
    "as is (no augmentation)": ["as is"],
    "+ shifts of 1 px": ["as is", *SHIFTS_1],
    "+ shifts of 0.5 px": ["as is", *SHIFTS_HALF],
    "+ turns of 5°": ["as is", "turn +5", "turn -5"],
    "+ turns of 10°": ["as is", "turn +10", "turn -10"],
    "+ scales 0.9, 1.1": ["as is", "scale 0.9", "scale 1.1"],
    "+ turns of 5° + shifts of 0.5 px": ["as is", "turn +5", "turn -5", *SHIFTS_HALF],
    "all 15 views": list(VIEWS),
}


def view_probabilities(model: torch.nn.Module, split: Split) -> dict[str, torch.Tensor]:
    """Softmax probabilities (N, classes) of every view of every image of `split`."""
    x = scale(split.images)
    n = len(x)
    out = {}
    model.eval()
    with torch.inference_mode():
        for name, (degrees, factor, dx, dy) in VIEWS.items():
            moved = x if name == "as is" else apply_affine(x, affine_matrices(
                torch.full((n,), math.radians(degrees)), torch.full((n,), factor),
                torch.full((n,), float(dx)), torch.full((n,), float(dy)), size=x.shape[-1]))
            out[name] = torch.cat([torch.softmax(model(moved[i:i + 1000]), dim=1)
                                   for i in range(0, n, 1000)]).double()
    return out


def correct(probabilities: dict[str, torch.Tensor], labels: torch.Tensor, views: list[str]) -> int:
    mean = sum(probabilities[name] for name in views) / len(views)
    return int((mean.argmax(dim=1) == labels).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders trained with --val-size")
    parser.add_argument("--out", default=None, help="write test-time-augmentation.json here")
    args = parser.parse_args()

    scores = {name: {"val": [], "test": []} for name in SETS}
    sizes = {"val": 0, "test": 0}
    for run in args.runs:
        loaded = open_model(run)
        if not loaded.config.val_size:
            sys.exit(f"{run}: trained without a validation split; nothing to choose by")
        train = load_split_for(loaded, split="train")
        _, val = hold_out(train, loaded.config.val_size, seed=loaded.config.seed)
        for split_name, split in (("val", val), ("test", load_split_for(loaded, split="test"))):
            probabilities = view_probabilities(loaded.model, split)
            sizes[split_name] += len(split)
            for name, views in SETS.items():
                scores[name][split_name].append(correct(probabilities, split.labels, views))

    rows = [[name, f"{100 * sum(s['val']) / sizes['val']:.3f} %", " / ".join(map(str, s["val"])),
             f"{100 * sum(s['test']) / sizes['test']:.3f} %", " / ".join(map(str, s["test"]))]
            for name, s in scores.items()]
    print(f"{len(args.runs)} runs; validation {sizes['val']} images, test {sizes['test']} images "
          "(pooled over the runs)")
    print(table(["views", "validation (choose)", "right per run", "test (report)", "right per run"], rows))
    if args.out:
        document = {"date": datetime.date.today().isoformat(), "runs": args.runs, "sizes": sizes,
                    "views": {name: list(v) for name, v in VIEWS.items()}, "sets": SETS, "correct": scores}
        path = Path(args.out) / "test-time-augmentation.json"
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
