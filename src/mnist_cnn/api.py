"""The Python API, for notebooks and scripts: a few keyword-only functions that return
plain objects (metric records, probability arrays) and raise `MnistCnnError`.

    from mnist_cnn import TrainConfig, train_model, evaluate_model, load_model, predict_images

Like the CLI's handlers, these are where a call starts: they turn a device name into a
device and a missing model into the default one (the newest finished run under ./runs,
else the shipped model), once, and pass objects down. (train_model is mnist_cnn.train.train,
which resolves its device where its process group forms; the others live here.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mnist_cnn.idx import IMAGE_SIZE
from mnist_cnn.checkpoints import LoadedModel, model_or_default, open_model


def _device(name: str):
    """--device's meaning (auto: cuda, mps, then cpu), resolved once per call."""
    from mnist_cnn.runtime import resolve_device

    return resolve_device(name)


def load_model(source: str | Path | None = None, *, device: str = "cpu") -> LoadedModel:
    """A trained model in eval mode with its config, class names and data folder. `source`
    is a run folder, model.safetensors, checkpoint.pt or a tutorial state_dict file; by
    default the newest finished run under ./runs, else the model shipped with mnist-cnn."""
    return open_model(model_or_default(source), device=_device(device))


def evaluate_model(source: str | Path | None = None, *, data_dir: str | None = None,
                   dataset: str | None = None, split: str = "test", device: str = "auto",
                   batch_size: int = 1000) -> dict[str, Any]:
    """Evaluate a trained model (as load_model finds it) on a split of its data set (or
    `dataset`): the document `mnist-cnn evaluate --json` prints, accuracy exactly
    correct / total."""
    from mnist_cnn.evaluate import evaluate_saved

    return evaluate_saved(model_or_default(source), device=_device(device), data_dir=data_dir,
                          dataset=dataset, split=split, batch_size=batch_size)


def _digit(image: Any) -> np.ndarray:
    """A 28x28 uint8 array is taken as an MNIST digit as it is; anything else (a path, bytes,
    a PIL image, another array) goes through the user-image preprocessing."""
    from mnist_cnn.preprocess import preprocess, preprocess_file

    if isinstance(image, np.ndarray) and image.shape == (IMAGE_SIZE, IMAGE_SIZE) and image.dtype == np.uint8:
        return image
    if isinstance(image, (str, Path, bytes)):
        return preprocess_file(image)
    if isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    return preprocess(image)


def predict_images(images: Iterable[Any] | np.ndarray, *, model: str | Path | None = None,
                   backend: str = "torch", device: str = "cpu") -> np.ndarray:
    """Class probabilities, float32 (N, classes), for N images: file paths, encoded bytes,
    PIL images, or MNIST-style uint8 arrays (one (28, 28) digit each, or one (N, 28, 28)
    array). Users' images are normalised as MNIST's digits were (see mnist_cnn.preprocess)."""
    from mnist_cnn.predict import make_predictor

    if isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == np.uint8 \
            and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
        digits = images
    else:
        digits = np.stack([_digit(image) for image in images]) if images is not None else None
    device = _device(device) if backend == "torch" else "cpu"  # onnxruntime: no torch import
    predictor = make_predictor(model_or_default(model), backend=backend, device=device)
    return predictor.probabilities(digits)


def read_number(image: Any, *, model: str | Path | None = None, backend: str = "torch", device: str = "cpu",
                min_confidence: float | None = None) -> dict[str, Any]:
    """Every digit written in one image, left to right, as `mnist-cnn predict --number` reads
    it: {"text": "2026", "digits": [{"label", "name", "probability", "unsure", "box"}, ...]}.
    `image` is a file path, encoded bytes, a PIL image or a 2-D/3-D uint8 array (any size);
    `text` has "?" where a digit is below `min_confidence` (default: the model's threshold);
    `box` is [x0, y0, x1, y1] in the image's pixels. Raises MnistCnnError (ImageError) when
    the image holds no digit."""
    from PIL import Image

    from mnist_cnn.number import read_image
    from mnist_cnn.predict import make_predictor
    from mnist_cnn.preprocess import open_image

    if isinstance(image, (str, Path, bytes)):
        source = "image" if isinstance(image, bytes) else str(image)
        image = open_image(image)
    else:
        source = "image"
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
    predictor = make_predictor(model_or_default(model), backend=backend, device=device)
    if min_confidence is None:
        min_confidence = predictor.min_confidence
    reading = read_image(predictor, image, min_confidence=min_confidence, source=source)
    return {"text": reading.text, "digits": reading.digits}
