"""Measure the shipped model beyond its training log and record it in its model.json, under
"assessment", for the model card (docs/model-card.md, written from model.json at build time):

- user-style accuracy: the mean over the four renderings of users' files that
  benchmarks/results_table.py uses (ink on paper off-centre, transparent RGBA, JPEG of a scan,
  small and thick) on the first 1,000 test digits, through `mnist-cnn predict`'s preprocessing;
- calibration on the full test set: expected calibration error, and what the default "unsure"
  threshold keeps and catches;
- how many of the letters A-Z `predict` answers "unsure" at that threshold.

    .venv/bin/python scripts/assess_pretrained.py       (about a minute; scripts/make_pretrained_model.py runs it)
"""

from __future__ import annotations

import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

USER_STYLE_IMAGES = 1000


def assess(model_dir: Path) -> dict:
    import numpy as np

    from mnist_cnn import load_model, predict_images
    from mnist_cnn.calibrate import ECE_BINS, expected_calibration_error
    from mnist_cnn.data import load_dataset
    from mnist_cnn.predict import TorchPredictor
    from results_table import letters_unsure, user_style_accuracy

    test = load_dataset("mnist", splits=("test",))["test"]
    images, labels = test.images[:, 0].numpy(), test.labels.numpy()
    probabilities = predict_images(images, model=model_dir)  # as `predict` computes them
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    threshold = TorchPredictor(model_dir, device="cpu").min_confidence
    model = load_model(model_dir).model
    with tempfile.TemporaryDirectory() as folder:
        letters = letters_unsure(model_dir, Path(folder))
    return {
        "measured": datetime.date.today().isoformat(),
        "measured_by": "scripts/assess_pretrained.py",
        "user_style_accuracy": user_style_accuracy(model, images[:USER_STYLE_IMAGES],
                                                   labels[:USER_STYLE_IMAGES]),
        "user_style_images": USER_STYLE_IMAGES,
        "test_ece": expected_calibration_error(probabilities, labels),
        "ece_bins": ECE_BINS,
        "min_confidence": threshold,
        "correct_kept": float(np.mean(confidence[correct] >= threshold)),
        "wrong_caught": float(np.mean(confidence[~correct] < threshold)),
        "letters_unsure": letters,
    }


def main(model_dir: Path | None = None) -> int:
    from mnist_cnn.checkpoints import PRETRAINED_DIR
    from mnist_cnn.runs import MODEL_INFO_FILE

    model_dir = model_dir or PRETRAINED_DIR
    info_path = model_dir / MODEL_INFO_FILE
    info = json.loads(info_path.read_text())
    info["assessment"] = assess(model_dir)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info["assessment"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
