"""Training: the tutorial's loop, made exact, resumable and fast.

`train` starts a run, `resume` continues one; both end once model.safetensors and
model.json are written (the run folder's layout belongs to mnist_cnn.runs; pictures and
reports to mnist_cnn.report).
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mnist_cnn import MnistCnnError, checkpoints, distributed, kernels, runs
from mnist_cnn.config import TrainConfig, validate_train_config
from mnist_cnn.augment import augment, random_shift  # noqa: F401 (random_shift: public here too)
from mnist_cnn.calibrate import calibrate, format_calibration
from mnist_cnn.catalog import get_spec
from mnist_cnn.data import Split, hold_out, load_dataset, steps_per_epoch, train_batches
from mnist_cnn.distributed import World
from mnist_cnn.evaluate import evaluate, evaluation_from_logits, evaluation_report, split_logits
from mnist_cnn.losses import batch_loss, outlier_loss
from mnist_cnn.model import count_parameters, to_device
from mnist_cnn.runtime import environment

OUTLIER_WEIGHT = 0.5  # outlier exposure: weight of the flat-prediction term (Hendrycks et al.'s λ)
OUTLIER_BANK = 10_000  # at most this many non-digits are drawn, once, at the start of a run
Log = Callable[[str], None]
OnEpoch = Callable[[dict[str, Any]], None]  # sees each finished epoch's record; may raise to stop


class TrainingDiverged(MnistCnnError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


@dataclass
class TrainResult:
    """What a training or resume call returns: where the run is and how far it got."""

    run_dir: Path
    metrics: list[dict[str, Any]]  # one record per finished epoch
    completed: bool  # False when stopped by Ctrl-C / SIGTERM (a checkpoint was saved)
    main: bool = True  # False on the other ranks under torchrun: rank 0 alone reports
    device: torch.device | None = None  # where it trained: the report after training uses it too


@dataclass
class Run:
    """Everything a training run holds in memory; `epoch`/`step` say where it stands."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    data_dir: str | None
    data: dict[str, Split]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps: int  # optimizer steps per epoch
    metrics: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0  # 0-based epoch in progress
    step: int = 0  # steps done in that epoch
    loss_sum: torch.Tensor | None = None  # training loss summed over the epoch's images so far
    seconds: float = 0.0  # time spent in the epoch before a resume
    world: World = field(default_factory=World)  # the processes this run is spread over
    net: nn.Module | None = None  # the model under DistributedDataParallel, for training steps
    outliers: torch.Tensor | None = None  # uint8 (N, 1, 28, 28) non-digits (--outlier-exposure)
    average: nn.Module | None = None  # --ema: the moving average of the weights, evaluated and saved

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated and saved: the moving average with --ema."""
        return self.average if self.average is not None else self.model

    @property
    def total_steps(self) -> int:
        return self.steps * self.config.epochs


# ---------------------------------------------------------------- pure pieces


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """The learning rate at optimizer step `step` (0-based): a pure function of the step,
    so a resumed run needs only counters."""
    if config.schedule == "constant":
        return config.lr
    warmup_steps = max(1, round(config.warmup * total_steps))
    if step < warmup_steps:
        return config.lr * (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    return config.lr * max(0.0, (total_steps - step) / remaining)


def average_decay(decay: float, step: int) -> float:
    """--ema's decay after optimizer step `step` (1-based): short at first, so that the
    average soon forgets the random initial weights, then `decay`."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average ← decay · average + (1 − decay) · model, for the weights and the batch-norm
    statistics (counters are copied)."""
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)
    for mine, theirs in zip(average.buffers(), model.buffers()):
        if mine.is_floating_point():
            mine.lerp_(theirs, 1 - decay)
        else:
            mine.copy_(theirs)


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam (AdamW with --weight-decay) over `model`'s parameters, fused where the device
    has it."""
    # Fused Adam updates every parameter in one kernel (CPU and CUDA); on the seed model it
    # measured no faster than the default on 2 CPU cores (the step is ~1 % of the time), and
    # saves per-parameter launches on a GPU.
    fused = device.type in ("cpu", "cuda")
    if config.weight_decay:
        return torch.optim.AdamW(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay, fused=fused)
    return torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)


def autocast_context(config: TrainConfig, device: torch.device):
    """The autocast context of --precision: none for fp32, else bf16/fp16 on `device`."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random state a checkpoint saves (CPU, and every GPU's on CUDA), so a resume
    draws the same dropout and augmentation."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore a state saved by rng_state()."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One epoch's record as the line training prints."""
    width = len(str(epochs))
    return (f"epoch {record['epoch']:>{width}}/{epochs}  train_loss {record['train_loss']:.4f}  "
            f"test_loss {record['test_loss']:.4f}  test_acc {100 * record['test_accuracy']:.2f}% "
            f"({record['test_correct']}/{record['test_total']})  "
            + (f"val_acc {100 * record['val_accuracy']:.2f}%  " if "val_accuracy" in record else "")
            + f"{record['seconds']:.1f}s")


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a request checked between steps, so the loop
    can save a consistent checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:  # under torchrun, the signal may have come to another rank
        return self.signal_name or "a signal to another rank"

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- entry points


def train(config: TrainConfig | None = None, *, run_dir: str | Path | None = None,
          device: str = "auto", data_dir: str | None = None, progress: bool = True,
          log: Log = print, on_epoch: OnEpoch | None = None) -> TrainResult:
    """Train `config` (the tutorial's recipe by default) into a new run folder; under
    torchrun, one data-parallel run over all its processes (mnist_cnn.distributed).
    `on_epoch` is called with each epoch's record once it is saved (a sweep reports it to
    its pruner, which stops the run by raising)."""
    config = config or TrainConfig()
    validate_train_config(config)
    data_dir = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    with distributed.session(device) as world:
        return train_in_world(world, config, run_dir=run_dir, data_dir=data_dir, progress=progress,
                              log=log, on_epoch=on_epoch)


def train_in_world(world: distributed.World, config: TrainConfig, *, run_dir: str | Path | None,
                   data_dir: str | None, progress: bool, log: Log,
                   on_epoch: OnEpoch | None = None) -> TrainResult:
    """train() within its process group (the run's state is gone when this returns)."""
    log = world.main_only(log)
    run = build_run(config, device=world.device, data_dir=data_dir, log=log,
                    run_dir=lambda: world.on_main(lambda: runs.create_run_dir(run_dir)))
    join_world(run, world)

    def start_folder() -> None:
        runs.write_metrics(run.run_dir, [])
        runs.write_run_config(run.run_dir, {
            "config": run.config.to_dict(), "data_dir": data_dir, "environment": environment(run.device),
            "kernel_blocks": kernels.kernel_blocks(run.model),  # on the custom kernels, here
            "argv": sys.argv, "parameters": count_parameters(run.model), "steps_per_epoch": run.steps,
            "world_size": world.size,
            "started": datetime.now().astimezone().isoformat(timespec="seconds")})

    world.on_main(start_folder)
    result = run_epochs(run, progress=progress and world.is_main, log=log, on_epoch=on_epoch)
    result.main = world.is_main
    return result


def resume(run_dir: str | Path, *, device: str = "auto", data_dir: str | None = None,
           progress: bool = True, log: Log = print) -> TrainResult:
    """Continue the run in `run_dir` from its checkpoint, with its saved recipe; the final
    weights are bit-identical to an uninterrupted run's with as many processes."""
    with distributed.session(device) as world:
        return resume_in_world(world, run_dir, data_dir=data_dir, progress=progress, log=log)


def resume_in_world(world: distributed.World, run_dir: str | Path, *, data_dir: str | None,
                    progress: bool, log: Log) -> TrainResult:
    """resume() within its process group (the run's state is gone when this returns)."""
    log = world.main_only(log)
    opened = world.on_main(lambda: checkpoints.open_run(run_dir))  # only rank 0 reads the folder
    data_dir = data_dir or opened.data_dir
    run = build_run(opened.config, device=world.device, data_dir=data_dir, log=log,
                    run_dir=lambda: opened.run_dir)
    join_world(run, world)
    if opened.checkpoint is None:
        log(f"{opened.run_dir} has no checkpoint yet: starting the run over")
    else:
        restore(run, opened.checkpoint)
        if run.epoch >= run.config.epochs:
            log(f"{run.run_dir} has finished its {run.config.epochs} epochs: writing its model again")
        else:
            log(f"resuming {run.run_dir} at epoch {run.epoch + 1}/{run.config.epochs}"
                + (f", step {run.step}/{run.steps}" if run.step else ""))
        saved = opened.checkpoint.get("world_size", 1)
        if saved != world.size:
            log(f"the checkpoint was written by {saved} process(es), this run has {world.size}: "
                "random streams restart from (seed, epoch, step, rank), so the result differs "
                "from an uninterrupted run's (bit-identity needs the same world size)")
    world.on_main(lambda: runs.write_metrics(run.run_dir, run.metrics))
    result = run_epochs(run, progress=progress and world.is_main, log=log)
    result.main = world.is_main
    return result


def build_run(config: TrainConfig, *, device: torch.device, data_dir: str | None, log: Log,
              run_dir: Callable[[], Path]) -> Run:
    """Data, model and optimizer on `device` (the World's), freshly seeded; the run folder is
    created last, so a run that cannot start (bad data, unknown model) leaves no folder behind."""
    if config.precision == "fp16" and device.type != "cuda":
        raise MnistCnnError("--precision fp16 needs a CUDA device; use bf16 or fp32")
    if device.type == "cuda":  # same seed → same weights, on the GPU too
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    data = load_dataset(config.dataset, data_dir, device=device, log=log)
    if config.val_size:  # the same images in every process and on resume: a function of the seed
        data["train"], data["val"] = hold_out(data["train"], config.val_size, seed=config.seed)
    choice = kernels.mode(config.kernels)
    if choice != config.kernels:  # recorded as used: config.json and checkpoints say what ran
        log(f"{kernels.ENV}={choice} overrides the run's kernels setting ({config.kernels})")
        config = replace(config, kernels=choice)
    outliers = make_outliers(config, len(data["train"]), device, log) if config.outlier_exposure else None
    torch.manual_seed(config.seed)
    model = to_device(kernels.build_training_model(
        config.model, num_classes=len(get_spec(config.dataset).classes), choice=config.kernels), device)
    return Run(config=config, run_dir=run_dir(), device=device, data_dir=data_dir, data=data,
               model=model, optimizer=make_optimizer(model, config, device),
               scaler=torch.amp.GradScaler("cuda", enabled=config.precision == "fp16"),
               steps=steps_per_epoch(len(data["train"]), config.batch_size),
               loss_sum=torch.zeros((), device=device), outliers=outliers,
               average=copy.deepcopy(model) if config.ema else None)


def make_outliers(config: TrainConfig, train_size: int, device: torch.device, log: Log) -> torch.Tensor:
    """The non-digits of --outlier-exposure, a function of the seed alone (the same in every
    process and on resume): as many as one epoch draws (F x the training images), at least
    256 and at most OUTLIER_BANK (10,000: about 40 s of drawing on 2 cores)."""
    from mnist_cnn.outliers import training_outliers

    started = time.perf_counter()
    count = min(OUTLIER_BANK, max(256, round(config.outlier_exposure * train_size)))
    bank = torch.from_numpy(training_outliers(count, seed=config.seed))[:, None].to(device)
    log(f"outlier exposure: drew {count} non-digits in {time.perf_counter() - started:.1f}s")
    return bank


def outlier_batch(run: Run, digits: int) -> torch.Tensor | None:
    """--outlier-exposure F: F x `digits` random non-digits from the bank, scaled to [0, 1]
    (drawn from the global RNG, saved in every checkpoint)."""
    count = round(run.config.outlier_exposure * digits) if run.outliers is not None else 0
    if count == 0:
        return None
    index = torch.randint(len(run.outliers), (count,), device=run.outliers.device)
    return run.outliers[index].float() / 255.0


def restore(run: Run, state: dict[str, Any]) -> None:
    """Put a checkpoint's weights, optimizer, scaler, random state and counters into
    `run`."""
    run.model.load_state_dict(state["model"])
    if run.average is not None:
        run.average.load_state_dict(state["average"])
    run.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(run, state)
    run.epoch, run.step, run.metrics = state["epoch"], state["step"], list(state["metrics"])
    run.loss_sum, run.seconds = state["train_loss_sum"].to(run.device), state["epoch_seconds"]


def restore_rng(run: Run, state: dict[str, Any]) -> None:
    """Each rank's random stream as saved; under another world size, fresh streams from
    (seed, epoch, step, rank): deterministic, but not the uninterrupted run's."""
    saved = state.get("world_size", 1)
    if saved == run.world.size:
        set_rng_state(state["rng_ranks"][run.world.rank] if saved > 1 else state["rng"], run.device)
    else:
        torch.manual_seed(distributed.stream_seed(run.config.seed, state["epoch"], state["step"],
                                                  run.world.rank))


def join_world(run: Run, world: World) -> None:
    """Make `run` one rank's replica of a data-parallel run (alone: nothing changes)."""
    run.world = world
    if world.size == 1:
        return
    smallest = len(run.data["train"]) - (run.steps - 1) * run.config.batch_size
    if min(smallest, run.config.batch_size) < world.size:
        raise MnistCnnError(f"--batch-size {run.config.batch_size}: a batch of {smallest} images "
                            f"cannot give each of {world.size} processes one; choose another batch size")
    run.net = world.wrap(run.model)
    world.seed_rank(run.config.seed)


def save_checkpoint(run: Run) -> None:
    """Every rank's random state is gathered (a collective under torchrun); rank 0 writes the
    unwrapped model's weights, so any number of processes can load them."""
    states = run.world.gather(rng_state(run.device))
    run.world.on_main(lambda: checkpoints.save_checkpoint(run.run_dir, {
        "config": run.config.to_dict(), "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        "rng": states[0], "world_size": run.world.size,
        **({"rng_ranks": states} if run.world.size > 1 else {}),
        "epoch": run.epoch, "step": run.step,
        "train_loss_sum": run.loss_sum.detach().cpu(), "epoch_seconds": run.seconds,
        "metrics": run.metrics, "data_dir": run.data_dir,
        **({"average": run.average.state_dict()} if run.average is not None else {}),
    }))


# ---------------------------------------------------------------- the loop


def run_epochs(run: Run, *, progress: bool, log: Log, on_epoch: OnEpoch | None = None) -> TrainResult:
    """Epochs from where `run` stands to the end; a checkpoint after each. Ctrl-C saves the
    current step (or the finished epoch, when it arrives during the test pass) and stops."""
    # The seed model on the CPU: its kernels take torch's threads and torch's own ops get one
    # (mnist_cnn.kernels.training_threads). The test passes too: on 2 cores shared with other
    # jobs, their convolutions took 0.8 s on 2 threads against 0.13 s on 1 (2026-12-01, AMD).
    kernel_run = (run.device.type == "cpu" and run.config.model == "seed"
                  and kernels.wanted("conv1", run.config.kernels))
    with kernels.training_threads(kernel_run):
        return _run_epochs(run, progress=progress, log=log, on_epoch=on_epoch)


def _run_epochs(run: Run, *, progress: bool, log: Log, on_epoch: OnEpoch | None) -> TrainResult:
    with StopRequest() as stop:
        while run.epoch < run.config.epochs:
            started = time.perf_counter() - run.seconds
            if not train_one_epoch(run, stop, progress=progress):
                run.seconds = time.perf_counter() - started
                save_checkpoint(run)
                log(f"{stop.name}: saved a checkpoint at epoch {run.epoch + 1}, step "
                    f"{run.step}/{run.steps}; continue with: mnist-cnn train --resume {run.run_dir}")
                return TrainResult(run.run_dir, run.metrics, completed=False, device=run.device)
            record = end_epoch(run, started)
            log(format_epoch(record, run.config.epochs))
            if on_epoch is not None:
                on_epoch(record)
            if run.world.any(stop.signal_name is not None) and run.epoch < run.config.epochs:
                log(f"{stop.name}: saved a checkpoint after epoch {run.epoch}; "
                    f"continue with: mnist-cnn train --resume {run.run_dir}")
                return TrainResult(run.run_dir, run.metrics, completed=False, device=run.device)
    run.world.on_main(lambda: save_final_model(run, log=log))
    return TrainResult(run.run_dir, run.metrics, completed=True, device=run.device)


def train_one_epoch(run: Run, stop: StopRequest, *, progress: bool) -> bool:
    """Optimizer steps from `run.step` to the end of the epoch; False when a stop request
    came in first (run.step then says how far it got)."""
    from tqdm import tqdm

    config, optimizer, world = run.config, run.optimizer, run.world
    net = run.net or run.model
    every = finite_check_every(run.device)
    net.train()
    batches = train_batches(run.data["train"], config.batch_size, seed=config.seed,
                            epoch=run.epoch, start_step=run.step, rank=world.rank, world_size=world.size)
    with tqdm(total=run.steps, initial=run.step, desc=f"epoch {run.epoch + 1}/{config.epochs}",
              unit="step", leave=False, file=sys.stderr, disable=None if progress else True) as bar:
        for x, y in batches:
            lr = learning_rate(run.epoch * run.steps + run.step, run.total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            extra = outlier_batch(run, len(y))
            if extra is not None:  # one forward pass over digits and non-digits together
                x = torch.cat([x, extra])
            x = augment(x, rotate=config.rotate, scale=config.scale, shift=config.shift, flip=config.flip)
            with autocast_context(config, run.device):
                logits = net(x)
            logits, outlier_logits = logits[:len(y)], logits[len(y):]
            loss = batch_loss(config.loss, logits.float(), y, label_smoothing=config.label_smoothing)
            summed = loss.detach() if config.loss == "kl" else loss.detach() * len(y)  # digits only
            if len(outlier_logits):
                loss = loss + OUTLIER_WEIGHT * outlier_loss(outlier_logits.float(), summed=config.loss == "kl")
            if world.size > 1:  # the global batch's gradient and summed loss, as one process's
                images = min(config.batch_size, len(run.data["train"]) - run.step * config.batch_size)
                loss = world.objective(loss, images=images, mean=config.loss != "kl", share=len(y))
                summed = world.all_sum(summed)
            if every == 1:
                check_finite(summed, run)
            optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(loss).backward()
            run.scaler.step(optimizer)
            run.scaler.update()
            run.loss_sum = run.loss_sum + summed  # on the device: no extra host sync
            run.step += 1
            if run.average is not None:
                update_average(run.average, run.model, average_decay(config.ema, run.epoch * run.steps + run.step))
            bar.update()
            if every > 1 and (run.step % every == 0 or run.step == run.steps):
                check_finite(run.loss_sum, run, every=every)
            if world.any(stop.signal_name is not None):  # all ranks stop after the same step
                if every > 1:  # nothing unchecked goes into the checkpoint
                    check_finite(run.loss_sum, run, every=every)
                return False
    return True


# How often the loss is checked for NaN or infinity, which reads it on the host: every step
# on the CPU, where that costs nothing; on an accelerator every FINITE_CHECK_STEPS steps and at
# the epoch's end (on the epoch's running sum, which a bad step anywhere makes non-finite), as a
# read per step would make the host wait for the device at every step. Either way, no NaN
# reaches a checkpoint.
FINITE_CHECK_STEPS = 32


def finite_check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else FINITE_CHECK_STEPS


def check_finite(loss: torch.Tensor, run: Run, *, every: int = 1) -> None:
    """Stop before a NaN or infinite loss reaches the weights (with `every` > 1: before it
    reaches a checkpoint); the checkpoint on disk is the last good state."""
    value = float(loss.detach())
    if not math.isfinite(value):
        kept = (f"the last checkpoint ({run.run_dir / runs.CHECKPOINT_FILE}, after epoch "
                f"{len(run.metrics)}) is intact" if run.metrics else "no checkpoint was written")
        where = (f"at epoch {run.epoch + 1}, step {run.step + 1}" if every == 1 else
                 f"by epoch {run.epoch + 1}, step {run.step} (checked every {every} steps)")
        raise TrainingDiverged(f"the loss became {value} {where}; {kept}; lower --lr and start a new run")


def end_epoch(run: Run, started: float) -> dict[str, Any]:
    """Evaluate on the test split, record the epoch in metrics.jsonl, save a checkpoint."""
    train_seconds = time.perf_counter() - started
    num_classes = len(get_spec(run.config.dataset).classes)
    evaluation = run.world.on_main(lambda: evaluate(  # rank 0 evaluates, the others wait
        run.evaluated, run.data["test"], loss=run.config.loss,
        batch_size=run.config.eval_batch_size, num_classes=num_classes))
    validation = run.world.on_main(lambda: evaluate(
        run.evaluated, run.data["val"], loss=run.config.loss, batch_size=run.config.eval_batch_size,
        num_classes=num_classes)) if "val" in run.data else None
    seconds = time.perf_counter() - started
    record = {
        "epoch": run.epoch + 1,
        "train_loss": float(run.loss_sum) / len(run.data["train"]),
        "test_loss": evaluation.loss,
        "test_accuracy": evaluation.accuracy,
        "test_correct": evaluation.correct,
        "test_total": evaluation.total,
        **({"val_loss": validation.loss, "val_accuracy": validation.accuracy,
            "val_correct": validation.correct, "val_total": validation.total} if validation else {}),
        "lr": learning_rate(run.epoch * run.steps + run.steps - 1, run.total_steps, run.config),
        "seconds": seconds,
        "train_seconds": train_seconds,
        "eval_seconds": seconds - train_seconds,
    }
    run.metrics.append(record)
    run.world.on_main(lambda: runs.append_metrics(run.run_dir, record))
    run.epoch, run.step, run.seconds = run.epoch + 1, 0, 0.0
    run.loss_sum = torch.zeros((), device=run.device)
    save_checkpoint(run)
    return record


def save_final_model(run: Run, *, log: Log = print) -> Path:
    """model.safetensors and model.json, with the final test evaluation; with a validation
    split, also the temperature and "unsure" threshold fitted on it (mnist_cnn.calibrate)."""
    classes = get_spec(run.config.dataset).classes
    test_logits = split_logits(run.evaluated, run.data["test"], batch_size=run.config.eval_batch_size)
    evaluation = evaluation_from_logits(test_logits, run.data["test"].labels, loss=run.config.loss,
                                        num_classes=len(classes), batch_size=run.config.eval_batch_size)
    calibration = None
    if "val" in run.data:
        calibration = calibrate(split_logits(run.evaluated, run.data["val"], batch_size=run.config.eval_batch_size),
                                run.data["val"].labels, test_logits, run.data["test"].labels,
                                fit=not run.config.outlier_exposure)
        log(format_calibration(calibration))
    info = {
        "metrics": run.metrics[-1] if run.metrics else {},
        "evaluation": evaluation_report(evaluation, classes),
        "train_seconds_total": sum(record["seconds"] for record in run.metrics),
        "parameters": count_parameters(run.evaluated),
        "environment": environment(run.device),
        "checkpoint_format_version": checkpoints.FORMAT_VERSION,
        **({"calibration": calibration} if calibration else {}),
    }
    return checkpoints.save_model(run.run_dir, run.evaluated, run.config, info)
