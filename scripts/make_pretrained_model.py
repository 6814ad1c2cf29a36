"""Re-create the model shipped in the package (src/mnist_cnn/pretrained/): the batch-norm
CNN trained with `--preset best-oe` (the best recipe on all training images, with outlier
exposure to synthesised non-digits: docs/not-a-digit.md), seed 0, on the shipped MNIST.

    .venv/bin/python scripts/make_pretrained_model.py
    .venv/bin/python benchmarks/not_a_digit.py --write   # then: its "unsure" rates

It runs the same training as `mnist-cnn train --preset best-oe --seed 0 --no-report` and
copies model.safetensors and model.json (with the command added) into the package, then
scripts/assess_pretrained.py adds the model card's user-style and calibration figures. The same
seed on the same kind of machine gives the same weights; other CPUs may differ in the last bits.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from mnist_cnn.checkpoints import PRETRAINED_DIR
from mnist_cnn.runs import MODEL_FILE, MODEL_INFO_FILE
from mnist_cnn.train import train
from mnist_cnn.config import resolve_train_config

PRESET = "best-oe"
COMMAND = f"mnist-cnn train --preset {PRESET} --seed 0"


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "run"
        result = train(resolve_train_config(PRESET, {"seed": 0}), run_dir=run, device="cpu", progress=False)
        PRETRAINED_DIR.mkdir(exist_ok=True)
        shutil.copyfile(run / MODEL_FILE, PRETRAINED_DIR / MODEL_FILE)
        info = json.loads((run / MODEL_INFO_FILE).read_text())
        info["command"] = COMMAND
        info["made_by"] = "scripts/make_pretrained_model.py"
        (PRETRAINED_DIR / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import assess_pretrained

    assess_pretrained.main(PRETRAINED_DIR)
    last = result.metrics[-1]
    print(f"wrote {PRETRAINED_DIR / MODEL_FILE}: test accuracy {100 * last['test_accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
