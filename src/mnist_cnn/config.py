"""Typed configs for the commands (no torch import here: `mnist-cnn --help` stays instant).

Each recipe field carries its flag's help and its check in `dataclasses.field(metadata=...)`:
the CLI builds `mnist-cnn train`'s flags from them and `validate_train_config` applies the
same checks to configs made in Python, so a new hyper-parameter is one edit here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from mnist_cnn import MnistCnnError

LOSSES = ("kl", "ce")
SCHEDULES = ("constant", "onecycle")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("torch", "onnxruntime")  # what runs a trained model for predict and serve
PRECISIONS = ("fp32", "bf16", "fp16")
KERNELS = ("auto", "torch", "custom")  # see mnist_cnn.kernels


@dataclass(frozen=True)
class Check:
    """A named test of one value, e.g. 'positive integer'."""

    description: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return self.test(value)


FINITE = float("inf")
POSITIVE_INT = Check("positive integer", lambda v: v >= 1)
NON_NEGATIVE_INT = Check("non-negative integer", lambda v: v >= 0)
POSITIVE_NUMBER = Check("positive number", lambda v: 0 < v < FINITE)
NON_NEGATIVE_NUMBER = Check("non-negative number", lambda v: 0 <= v < FINITE)
FRACTION = Check("fraction in [0, 1)", lambda v: 0 <= v < 1)


@dataclass(frozen=True)
class Registry:
    """Names registered in another module, looked up only when a value is checked (the
    model registry lives beside torch; importing it for --help would cost a second)."""

    module: str
    attribute: str

    def names(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.attribute))


def option(default: Any, help: str, *, check: Check | None = None,
           choices: tuple[str, ...] | Registry | None = None, flag: bool = True) -> Any:
    """A config field with its command-line flag's help and validation."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "flag": flag})


MODEL_NAMES = Registry("mnist_cnn.model", "MODELS")
DATASET_NAMES = Registry("mnist_cnn.catalog", "DATASETS")


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved in config.json and in every checkpoint.

    The defaults are the tutorial's recipe.
    """

    model: str = option("seed", "model architecture from the registry (mnist-cnn summary --list)",
                        choices=MODEL_NAMES)
    dataset: str = option("mnist", "mnist, fashion-mnist, kmnist, qmnist or custom (your own IDX files)",
                          choices=DATASET_NAMES)
    epochs: int = option(20, "passes over the training set", check=POSITIVE_INT)
    batch_size: int = option(128, "images per optimizer step, over all processes", check=POSITIVE_INT)
    lr: float = option(1e-4, "Adam learning rate (the peak with onecycle)", check=POSITIVE_NUMBER)
    loss: str = option("kl", "kl: KL(one-hot||prediction) summed over the batch, as the tutorial; "
                       "ce: mean cross-entropy", choices=LOSSES)
    schedule: str = option("constant", "learning-rate schedule: constant, or onecycle (linear "
                           "warm-up, then linear decay to 0)", choices=SCHEDULES)
    warmup: float = option(0.2, "onecycle: fraction of all steps spent warming up", check=FRACTION)
    weight_decay: float = option(0.0, "decoupled (AdamW-style) weight decay; 0 is plain Adam",
                                 check=NON_NEGATIVE_NUMBER)
    label_smoothing: float = option(0.0, "label smoothing (ce only)", check=FRACTION)
    shift: int = option(0, "augment: random translations of up to N pixels (0 = off)",
                        check=Check("shift of 0 to 8 pixels", lambda v: 0 <= v <= 8))
    rotate: float = option(0.0, "augment: random rotations of up to DEG degrees either way (0 = off)",
                           check=Check("angle of 0 to 180 degrees", lambda v: 0 <= v <= 180))
    scale: float = option(0.0, "augment: random zoom by a factor in [1 - F, 1 + F] (0 = off)",
                          check=Check("scale fraction in [0, 0.5]", lambda v: 0 <= v <= 0.5))
    flip: float = option(0.0, "augment: mirror each image left to right with probability P (0 = off; "
                         "for clothes, not for digits)", check=Check("probability in [0, 1]", lambda v: 0 <= v <= 1))
    ema: float = option(0.0, "keep an exponential moving average of the weights with this decay per step "
                        "(e.g. 0.999) and evaluate and save it instead of the last step's weights (0 = off)",
                        check=FRACTION)
    outlier_exposure: float = option(0.0, "outlier exposure: add F x batch-size synthesised non-digits "
                                     "(letters, symbols, scribbles: mnist_cnn.outliers) to every batch, "
                                     "trained toward a flat prediction so predict answers unsure for "
                                     "them (0 = off)", check=Check("fraction in [0, 1]", lambda v: 0 <= v <= 1))
    val_size: int = option(0, "hold out N training images (chosen by --seed) as a validation split, "
                           "evaluated every epoch and never trained on", check=NON_NEGATIVE_INT)
    seed: int = option(0, "seeds initialisation, shuffling, dropout and augmentation",
                       check=NON_NEGATIVE_INT)
    eval_batch_size: int = option(1000, "images per forward pass when evaluating", check=POSITIVE_INT)
    precision: str = option("fp32", "autocast precision (fp16 needs CUDA)", choices=PRECISIONS)
    kernels: str = option("auto", "the seed model's conv blocks while training: auto (the custom C "
                          "kernels where measured faster), custom (wherever they apply) or torch "
                          "(torch's ops only); $MNIST_CNN_KERNELS overrides", choices=KERNELS)
    preset: str | None = option(None, "the named recipe these values came from", flag=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def recipe_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields that are command-line flags, in declaration order."""
    return [f for f in fields(TrainConfig) if f.metadata.get("flag", True)]


def flag_name(name: str) -> str:
    """The command-line flag of config field `name` (batch_size → --batch-size)."""
    return "--" + name.replace("_", "-")


# Named recipes: values that replace the defaults; explicit flags still win.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    # The seed architecture trained to >= 99 % as fast as we could make it on 2 CPU cores:
    # larger batches (fewer, better-vectorised steps), a one-cycle schedule at a 30x higher
    # peak rate, cross-entropy with light label smoothing, and +-2 px random shifts.
    "fast": {
        "epochs": 8,
        "batch_size": 256,
        "lr": 3e-3,
        "loss": "ce",
        "schedule": "onecycle",
        "warmup": 0.15,
        "label_smoothing": 0.05,
        "shift": 2,
    },
    # The seed architecture in 2 epochs: chosen by `mnist-cnn sweep` on the validation split
    # (benchmarks/results/2026-12-01-sweeps.md, studies fast-3ep and fast-2ep): a smaller batch,
    # a 6x higher peak rate than `fast`, a long warm-up and more label smoothing.
    "sprint": {
        "epochs": 2,
        "batch_size": 128,
        "lr": 0.01775,
        "loss": "ce",
        "schedule": "onecycle",
        "warmup": 0.2608,
        "label_smoothing": 0.097,
        "shift": 1,
    },
    # `fast` for a GPU: the seed architecture in 4x larger batches (59 steps an epoch instead of
    # 235: a GPU's step costs about the same at either size), the peak rate scaled up with the
    # batch, and the test set in one forward pass. Chosen on the CPU (same arithmetic; seed 0,
    # 2026-12-01): 99.06 % after 7 epochs, 99.17 % after 10 (batch 1024 at 6e-3: 98.99 %).
    # On a GPU: unmeasured so far (docs/performance-round3.md).
    "gpu-fast": {
        "epochs": 10,
        "batch_size": 1024,
        "lr": 1e-2,
        "loss": "ce",
        "schedule": "onecycle",
        "warmup": 0.15,
        "label_smoothing": 0.05,
        "shift": 2,
        "eval_batch_size": 10000,
    },
    # The wide batch-norm CNN with rotation/scale/shift augmentation, 20 epochs, evaluated and
    # saved as the moving average of its weights. Chosen on the validation split only (the
    # 5,000 held-out training images it keeps: they also fit the temperature and the "unsure"
    # threshold), against `bn` for 30 epochs over seeds 0-4; the test set was never used to
    # choose (docs/sweeps.md, What the searches showed).
    "best": {
        "model": "bn-wide",
        "epochs": 20,
        "ema": 0.999,
        "batch_size": 256,
        "lr": 4e-3,
        "loss": "ce",
        "schedule": "onecycle",
        "warmup": 0.2,
        "label_smoothing": 0.05,
        "rotate": 10.0,
        "scale": 0.1,
        "shift": 2,
        "val_size": 5000,
    },
    # The model shipped in the package (scripts/make_pretrained_model.py): the augmentation and
    # schedule of `best` on the narrow `bn` (a quarter of bn-wide's arithmetic) and all
    # 60,000 training images (no validation split: "unsure" below the default 0.5), 10 epochs,
    # with outlier exposure, half as many synthesised non-digits as digits in every batch, so
    # that letters, symbols and scribbles are answered "unsure" (docs/not-a-digit.md).
    "best-oe": {
        "model": "bn",
        "epochs": 10,
        "batch_size": 256,
        "lr": 4e-3,
        "loss": "ce",
        "schedule": "onecycle",
        "warmup": 0.2,
        "label_smoothing": 0.05,
        "rotate": 10.0,
        "scale": 0.1,
        "shift": 2,
        "outlier_exposure": 0.5,
    },
    # Fashion-MNIST (--dataset fashion-mnist): clothes are photographed upright and centred, so
    # lighter geometry and more label smoothing; a wider network for their textures, mirroring
    # (a shoe points either way), 30 epochs and the moving average of the weights. Chosen on the
    # validation split (benchmarks/results/2026-12-01-best-fashion.md).
    "best-fashion": {
        "model": "bn-wide",
        "dataset": "fashion-mnist",
        "epochs": 30,
        "flip": 0.5,
        "ema": 0.999,
        "batch_size": 256,
        "lr": 4e-3,
        "loss": "ce",
        "schedule": "onecycle",
        "warmup": 0.2,
        "label_smoothing": 0.1,
        "scale": 0.05,
        "shift": 2,
        "val_size": 5000,
    },
}


def resolve_train_config(preset: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the preset's values, then explicit overrides (None = not given)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise MnistCnnError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update({key: value for key, value in overrides.items() if value is not None})
    return TrainConfig.from_dict(values)


def check_value(name: str, value: Any, metadata: dict[str, Any]) -> str | None:
    """Why `value` is not allowed for field `name`, or None when it is."""
    choices = metadata.get("choices")
    if isinstance(choices, Registry):
        choices = choices.names()
        if value not in choices:
            return f"unknown {name} {value!r}; choose one of: {', '.join(choices)}"
    if choices is not None and value not in choices:
        return f"{flag_name(name)}: {value!r} is not one of {', '.join(choices)}"
    check = metadata.get("check")
    if check is not None:
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            return f"{flag_name(name)}: {value!r} is not a valid {check.description}"
    return None


def validate_train_config(config: TrainConfig) -> None:
    """Reject values no run can use, with the flag's name in the message: the same checks
    as the command line's, for configs made in Python or read back from a run folder."""
    for spec in recipe_fields():
        problem = check_value(spec.name, getattr(config, spec.name), dict(spec.metadata))
        if problem:
            raise MnistCnnError(problem)
    if config.label_smoothing and config.loss != "ce":
        raise MnistCnnError("--label-smoothing needs --loss ce")
