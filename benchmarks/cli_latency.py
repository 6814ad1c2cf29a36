"""How quickly the command answers, process start to exit, as a user runs it.

    .venv/bin/python benchmarks/cli_latency.py [--repeats 5]

Times `mnist-cnn --help` and every subcommand's `--help` (target < 0.2 s), and one image
through `mnist-cnn predict` with each backend (target for onnxruntime: <= 0.5 s; it imports
no torch). Prints a Markdown table with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from mnist_cnn.checkpoints import PRETRAINED_DIR
from mnist_cnn.runtime import cpu_model

COMMANDS = ("train", "evaluate", "predict", "show", "plot", "report", "summary", "explain",
            "export", "serve")


def wall(argv: list[str], repeats: int) -> tuple[float, float]:
    """(min, median) seconds from process start to exit."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return min(times), statistics.median(times)


def user_image(folder: Path) -> Path:
    """A shipped-MNIST-like digit drawn as dark ink on a 600x450 page."""
    from mnist_cnn.data import load_dataset

    digit = load_dataset("mnist", splits=("test",))["test"].images[0, 0].numpy()
    page = Image.new("L", (600, 450), 250)
    page.paste(Image.fromarray(255 - digit).resize((140, 140)), (200, 120))
    path = folder / "digit.png"
    page.save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "mnist_cnn"]
    rows = [("mnist-cnn --help", *wall([*cli, "--help"], args.repeats))]
    rows += [(f"mnist-cnn {name} --help", *wall([*cli, name, "--help"], args.repeats)) for name in COMMANDS]
    with tempfile.TemporaryDirectory() as folder:
        image = user_image(Path(folder))
        model = Path(folder) / "model"
        model.mkdir()
        for item in PRETRAINED_DIR.iterdir():
            (model / item.name).write_bytes(item.read_bytes())
        subprocess.run([*cli, "export", "--model", str(model)], check=True, capture_output=True)
        for backend in ("onnxruntime", "torch"):
            rows.append((f"mnist-cnn predict --backend {backend} (one 600x450 PNG)",
                         *wall([*cli, "predict", "--backend", backend, "--model", str(model), str(image)],
                               args.repeats)))
    print(f"CLI latency, process start to exit, {args.repeats} runs each; {cpu_model()}, "
          f"{datetime.date.today().isoformat()}\n")
    print("| command | min s | median s |\n|---|---|---|")
    for label, low, middle in rows:
        print(f"| `{label}` | {low:.3f} | {middle:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
