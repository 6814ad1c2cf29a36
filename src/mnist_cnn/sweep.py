"""Sweeps: search training recipes on the validation split with Optuna, on one machine or many.

A study lives in a storage: SQLite in the sweep folder by default, any SQLAlchemy URL Optuna
accepts (PostgreSQL for several machines), or Optuna's journal file (`journal:PATH`) on a
shared file system. Every trial trains an ordinary run folder, `<sweep-dir>/<study>/trials/
<number>/`, and its objective reads only the validation figures of that run's epochs, never
the test split's. `run_sweep` runs trials until the study holds `trials` finished ones
(running the same command again continues the study), then writes the summary files.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from mnist_cnn import MnistCnnError
from mnist_cnn.config import TrainConfig, check_value, recipe_fields, resolve_train_config, validate_train_config
from mnist_cnn.fileio import atomic_write_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

Log = Callable[[str], None]

DEFAULT_STUDY = "default"
DEFAULT_VAL_SIZE = 5000  # images held out for the objective when the recipe holds out none
JOURNAL_PREFIX = "journal:"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "trials.md"
HISTORY_FILE = "history.png"
IMPORTANCE_FILE = "importance.png"
TRIALS_DIR = "trials"


class SweepError(MnistCnnError):
    """A sweep that cannot start: a bad space, objective or storage."""


# ---------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: log-uniform, uniform, integer or a choice."""

    name: str
    kind: str  # "log", "uniform", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.kind == "log")
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def corners(self) -> tuple[Any, ...]:
        """The values that bound the range (all of them for a choice): checked before a run."""
        return self.choices if self.kind == "choice" else (self.low, self.high)

    def __str__(self) -> str:
        if self.kind == "choice":
            return f"choice:{','.join(map(str, self.choices))}"
        return f"{'' if self.kind == 'uniform' else self.kind + ':'}{self.low}..{self.high}"


def field_types() -> dict[str, type]:
    """The searchable TrainConfig fields and the type of their values."""
    return {spec.name: {"int": int, "float": float}.get(str(spec.type), str) for spec in recipe_fields()}


def convert(name: str, kind: type, text: str) -> Any:
    try:
        value = kind(text.strip())
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, "a value")
        raise SweepError(f"--space {name}: {text.strip()!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise SweepError(f"--space {name}: {text.strip()!r} is not a finite number")
    return value


def parse_param(name: str, spec: str) -> Param:
    """`log:a..b`, `int:a..b`, `a..b` (uniform; integers for an integer field) or `choice:a,b,c`."""
    types = field_types()
    if name not in types:
        raise SweepError(f"--space {name}: no such training field; searchable: {', '.join(types)}")
    kind = types[name]
    prefix, _, rest = spec.partition(":") if ":" in spec else ("", "", spec)
    if prefix == "choice":
        choices = tuple(convert(name, kind, text) for text in rest.split(","))
        if len(set(choices)) != len(choices) or not rest.strip():
            raise SweepError(f"--space {name}={spec}: give distinct choices, e.g. choice:128,256,512")
        return Param(name, "choice", choices=choices)
    if prefix not in ("", "log", "int"):
        raise SweepError(f"--space {name}={spec}: unknown kind {prefix!r}; use log:, int:, choice: or a..b")
    if kind is str:
        raise SweepError(f"--space {name}={spec}: {name} takes names; search it with choice:a,b")
    low_text, dots, high_text = rest.partition("..")
    if not dots:
        raise SweepError(f"--space {name}={spec}: a range is written LOW..HIGH, e.g. {name}=log:1e-4..1e-2")
    number = int if prefix == "int" or kind is int else float
    if prefix == "int" and kind is not int and kind is not float:
        raise SweepError(f"--space {name}={spec}: {name} is not a number")
    low, high = convert(name, number, low_text), convert(name, number, high_text)
    if not low < high:
        raise SweepError(f"--space {name}={spec}: the range is empty (LOW must be below HIGH)")
    if prefix == "log" and low <= 0:
        raise SweepError(f"--space {name}={spec}: a log range needs LOW > 0")
    return Param(name, prefix or "uniform", low=low, high=high)


def parse_space_arg(text: str) -> Param:
    name, equals, spec = text.partition("=")
    if not equals or not name.strip() or not spec.strip():
        raise SweepError(f"--space {text!r}: write FIELD=SPEC, e.g. lr=log:1e-4..1e-2")
    return parse_param(name.strip(), spec.strip())


def read_space_file(path: str | Path) -> list[Param]:
    """A TOML (or YAML) file of FIELD = "SPEC" lines, at the top or under [space]; a list
    of values is a choice."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SweepError(f"--space-file {path}: {error.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            document = yaml.safe_load(text)
        else:
            document = tomllib.loads(text)
    except Exception as error:  # both parsers raise their own error types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SweepError(f"--space-file {path}: not valid {path.suffix.lstrip('.') or 'TOML'} ({first_line})") from None
    if isinstance(document, dict) and isinstance(document.get("space"), dict):
        document = document["space"]
    if not isinstance(document, dict) or not document:
        raise SweepError(f"--space-file {path}: expected FIELD = \"SPEC\" entries (at the top or under [space])")
    return [parse_param(str(name), "choice:" + ",".join(map(str, spec)) if isinstance(spec, list) else str(spec))
            for name, spec in document.items()]


def build_space(specs: list[str], space_file: str | None) -> dict[str, Param]:
    params = [*(read_space_file(space_file) if space_file else []), *map(parse_space_arg, specs)]
    space: dict[str, Param] = {}
    for param in params:
        if param.name in space:
            raise SweepError(f"--space {param.name} is given twice")
        space[param.name] = param
    if not space:
        raise SweepError("nothing to search: give --space FIELD=SPEC (e.g. --space lr=log:1e-4..1e-2) "
                         "or --space-file")
    return space


def base_config(preset: str | None, fixed: dict[str, Any], space: dict[str, Param]) -> TrainConfig:
    """The recipe every trial starts from; each searched field's bounds are checked on it, so
    a bad range fails here, before any trial runs. Holds out a validation split by default."""
    both = sorted(set(fixed) & set(space))
    if both:
        raise SweepError(f"--{both[0].replace('_', '-')} is fixed and also searched; drop one")
    if fixed.get("val_size") == 0:
        raise SweepError("--val-size 0: a sweep's objective needs a validation split")
    config = resolve_train_config(preset, fixed)
    if not config.val_size and "val_size" not in space:
        config = replace(config, val_size=DEFAULT_VAL_SIZE)
    validate_train_config(config)
    metadata = {spec.name: dict(spec.metadata) for spec in recipe_fields()}
    for param in space.values():
        for value in param.corners():
            problem = check_value(param.name, value, metadata[param.name])
            if problem:
                raise SweepError(f"--space {param.name}={param}: {problem}")
            try:
                validate_train_config(replace(config, **{param.name: value}))
            except MnistCnnError as error:
                raise SweepError(f"--space {param.name}={param}: {error}") from None
    return config


# ---------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """val_accuracy: the last epoch's validation accuracy (maximised); time_to:T: seconds of
    training until the validation accuracy first reaches T (minimised)."""

    name: str
    threshold: float | None = None

    @property
    def direction(self) -> str:
        return "maximize" if self.threshold is None else "minimize"

    def value(self, metrics: list[dict[str, Any]]) -> float | None:
        """The objective of a finished run; None when time_to's threshold was never reached."""
        if self.threshold is None:
            return metrics[-1]["val_accuracy"]
        seconds = 0.0
        for record in metrics:
            seconds += record["train_seconds"]
            if record["val_accuracy"] >= self.threshold:
                return seconds
        return None

    def intermediate(self, record: dict[str, Any]) -> float:
        """What an epoch reports to the pruner (in the study's direction): the validation
        accuracy, or for time_to its error rate (the time is known only once reached)."""
        return record["val_accuracy"] if self.threshold is None else 1.0 - record["val_accuracy"]


def parse_objective(text: str) -> Objective:
    if text == "val_accuracy":
        return Objective(text)
    name, _, threshold = text.partition(":")
    if name == "time_to":
        try:
            value = float(threshold)
        except ValueError:
            value = math.nan
        if 0 < value <= 1:
            return Objective(f"time_to:{threshold}", value)
    raise SweepError(f"--objective {text!r}: use val_accuracy or time_to:ACCURACY (e.g. time_to:0.99)")


# ---------------------------------------------------------------- storage and study


@dataclass
class SweepOptions:
    """One `mnist-cnn sweep` command, resolved."""

    study: str = DEFAULT_STUDY
    storage: str | None = None  # None: sqlite:///<sweep_dir>/<study>/study.db
    sweep_dir: Path = Path("sweeps")
    space: dict[str, Param] = field(default_factory=dict)
    config: TrainConfig = field(default_factory=TrainConfig)  # every trial's starting recipe
    objective: Objective = field(default_factory=lambda: Objective("val_accuracy"))
    trials: int = 20  # finished trials the study should hold
    timeout: float | None = None  # seconds for this command
    workers: int = 1
    pruner: str = "median"
    seed: int | None = None  # the sampler's (worker i uses seed + i)
    heartbeat: int = 10  # seconds between a running trial's signs of life (RDB storages)
    device: str = "auto"
    data_dir: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.sweep_dir) / self.study

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.folder / 'study.db'}"


def open_storage(url: str, *, heartbeat: int):
    """An Optuna storage for `url`: `journal:PATH` is a journal file (for shared file
    systems; no heartbeat), anything else an RDB URL with a heartbeat, so a trial whose
    worker died is failed after 3 missed beats and run again."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    # The heartbeat and its retry callback are marked experimental (since Optuna 2.8); the
    # warning would be printed by every worker of every sweep.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Trials say what became of them in our own words (a failed trial's traceback is not news).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                          grace_period=3 * heartbeat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as error:  # SQLAlchemy raises many types for a bad URL or server
        text = str(error).strip().splitlines()
        raise SweepError(f"--storage {redact(url)}: cannot open ({text[0] if text else type(error).__name__})") from None


def redact(url: str) -> str:
    """The URL without its password, for messages and summary.json."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def load_study(options: SweepOptions, *, create: bool):
    """The study (created when `create`), with its objective checked against the command's."""
    import optuna

    if options.storage is None:
        if not create and not (options.folder / "study.db").is_file():
            raise SweepError(f"no study {options.study!r} in {options.folder} (no study.db there)")
        options.folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(options.storage_url, heartbeat=options.heartbeat)
    try:
        study = optuna.load_study(study_name=options.study, storage=storage)
    except KeyError:
        if not create:
            raise SweepError(f"no study {options.study!r} in {redact(options.storage_url)}") from None
        study = optuna.create_study(study_name=options.study, storage=storage, load_if_exists=True,
                                    direction=options.objective.direction)
        study.set_user_attr("objective", options.objective.name)
    saved = study.user_attrs.get("objective")
    if create and saved and saved != options.objective.name:
        raise SweepError(f"study {options.study!r} optimises {saved}, not {options.objective.name}; "
                         "choose another --study")
    return study


def sampler_seed(seed: int | None, *, worker: int, trials_so_far: int) -> int | None:
    """Worker i of a study holding n trials draws from its own stream, so workers and a
    continued study do not repeat each other's first proposals; the same command on the same
    study still proposes the same recipes."""
    return None if seed is None else seed * 1_000_003 + trials_so_far * 1009 + worker


def make_sampler(seed: int | None):
    import optuna

    # constant_liar: workers sharing a study see each other's running trials as bad, so
    # they do not all propose the same recipe.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str):
    import optuna

    if name == "median":  # after 2 finished trials, stop one worse than their median at that epoch
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- trials


def worker_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def trial_config(options: SweepOptions, trial) -> TrainConfig:
    values = {name: param.suggest(trial) for name, param in options.space.items()}
    return replace(options.config, **values)


def make_objective(options: SweepOptions, *, log: Log):
    """Optuna's objective: train one run folder, report each epoch's validation figure to
    the pruner, return the objective (read from the validation records only)."""
    import optuna

    from mnist_cnn.train import TrainingDiverged, train

    def objective(trial) -> float:
        config = trial_config(options, trial)
        run_dir = options.folder / TRIALS_DIR / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("interrupted", False)

        def report(record: dict[str, Any]) -> None:
            trial.report(options.objective.intermediate(record), record["epoch"])
            if record["epoch"] < config.epochs and trial.should_prune():
                log(f"trial {trial.number}: pruned after epoch {record['epoch']}")
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

        log(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in trial.params.items()))
        try:
            result = train(config, run_dir=run_dir, device=options.device, data_dir=options.data_dir,
                           progress=False, log=lambda message: log(f"trial {trial.number}: {message}"),
                           on_epoch=report)
        except TrainingDiverged as error:
            log(f"trial {trial.number}: failed: {error}")
            raise
        if not result.completed:  # Ctrl-C: the trial is failed, and retried when the sweep is run again
            trial.set_user_attr("interrupted", True)
            log(f"trial {trial.number}: interrupted; it runs again when this command is run again")
            raise KeyboardInterrupt
        trial.set_user_attr("train_seconds", sum(record["train_seconds"] for record in result.metrics))
        value = options.objective.value(result.metrics)
        if value is None:  # never a number: recorded as pruned, marked as not reached
            trial.set_user_attr("not_reached", options.objective.threshold)
            log(f"trial {trial.number}: validation accuracy never reached {options.objective.threshold}")
            raise optuna.TrialPruned(f"validation accuracy never reached {options.objective.threshold}")
        return value

    return objective


def retried_numbers(trials) -> set[int]:
    return {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}


def counts_as_finished(trial, retried: set[int]) -> bool:
    """Complete, pruned, or failed for a reason of its own (e.g. a diverged loss); a trial
    cut short by Ctrl-C or a dead worker is not: it is run again."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return (trial.state == TrialState.FAIL and trial.number not in retried
            and not trial.user_attrs.get("interrupted"))


def finished_count(study) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(counts_as_finished(trial, retried) for trial in trials)


def waiting(study) -> bool:
    """Trials queued to run again (interrupted ones): run even once the count is reached."""
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study, *, log: Log) -> int:
    """Queue again the trials cut short by Ctrl-C, and those left running by a worker of this
    machine that is gone (killed): a killed worker loses only its current trial. Trials of
    other machines are left to the heartbeat. Returns how many were queued."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(study._storage):  # other machines' trials silent for 3 beats
        fail_stale_trials(study)  # (the storage's callback queues them again)
    host, queued = socket.gethostname(), 0
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for trial in trials:
        worker = trial.user_attrs.get("worker") or {}
        dead = (trial.state == TrialState.RUNNING and worker.get("host") == host
                and not alive(int(worker.get("pid", 0))))
        if dead:
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            trial = study._storage.get_trial(trial._trial_id)
        if (dead or trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")) \
                and trial.number not in retried:
            RetryHeartbeatStaleTrialCallback()(study, trial)
            log(f"trial {trial.number} was interrupted: queued again")
            queued += 1
    return queued


def run_worker(options: SweepOptions, index: int = 0, *, log: Log = print,
               started: Callable[[], None] = lambda: None) -> None:
    """Run trials until the study holds `options.trials` finished ones and no queued retry
    (or the timeout); `started` is called once ready to run them, before the first."""
    from mnist_cnn.train import TrainingDiverged

    study = load_study(options, create=True)
    study.sampler = make_sampler(sampler_seed(options.seed, worker=index, trials_so_far=len(study.trials)))
    study.pruner = make_pruner(options.pruner)
    objective = make_objective(options, log=log)
    started()
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    while finished_count(study) < options.trials or waiting(study):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            log(f"--timeout {options.timeout:g}s reached")
            break
        # Diverged trials are failed and the search goes on; any other error stops it.
        study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))


def worker_process(options: SweepOptions, index: int, threads: int, ready) -> None:
    """The body of one of --workers K processes."""
    import torch

    torch.set_num_threads(threads)
    try:
        run_worker(options, index, log=lambda message: print(f"[worker {index}] {message}", flush=True),
                   started=ready.set)
    except KeyboardInterrupt:
        raise SystemExit(130)
    except MnistCnnError as error:
        print(f"[worker {index}] error: {error}", flush=True)
        raise SystemExit(2)


def run_workers(options: SweepOptions, *, log: Log) -> None:
    """--workers K: this process and K - 1 others on this machine share the study (the CPU
    cores split between them)."""
    import torch

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    ready = [context.Event() for _ in range(1, options.workers)]
    processes = [context.Process(target=worker_process, args=(options, index, threads, ready[index - 1]))
                 for index in range(1, options.workers)]
    for process in processes:
        process.start()
    torch.set_num_threads(threads)
    try:
        # Start together: this process (torch already imported) would otherwise take every
        # trial of a short sweep before the others have imported theirs.
        while not all(event.is_set() or not process.is_alive() for event, process in zip(ready, processes)):
            time.sleep(0.05)
        run_worker(options, 0, log=lambda message: log(f"[worker 0] {message}"))
    finally:  # on Ctrl-C too: the workers got it as well, and save and stop
        for process in processes:
            process.join()
    codes = [process.exitcode for process in processes]
    if any(code == 130 for code in codes):
        raise KeyboardInterrupt
    if any(codes):
        raise SweepError(f"{sum(map(bool, codes))} of {len(codes) + 1} workers failed (exit {max(codes)})")


def run_sweep(options: SweepOptions, *, log: Log = print) -> dict[str, Any]:
    """The whole command: continue (or create) the study, run the trials, write the summary."""
    study = load_study(options, create=True)
    if not study.trials and (options.folder / TRIALS_DIR).is_dir() and any((options.folder / TRIALS_DIR).iterdir()):
        raise SweepError(f"{options.folder / TRIALS_DIR} holds trials of another study; "
                         "choose another --study or --sweep-dir")
    recover_interrupted(study, log=log)
    done = finished_count(study)
    if done >= options.trials and not waiting(study):
        log(f"study {options.study!r} holds {done} finished trials (--trials {options.trials}): "
            "nothing to run; raise --trials to search further")
    elif done:
        log(f"study {options.study!r}: {done} finished trial(s) kept, continuing to {options.trials}")
    try:
        if options.workers > 1:
            run_workers(options, log=log)
        else:
            run_worker(options, log=log)
    except KeyboardInterrupt:  # what is finished is summarised; the same command continues
        write_summary(options)
        log(f"interrupted: run the same command again to continue study {options.study!r}")
        raise
    return write_summary(options)


# ---------------------------------------------------------------- the summary


def trial_value_text(trial, objective: Objective) -> str:
    from optuna.trial import TrialState

    if "not_reached" in trial.user_attrs:
        return f"not reached {trial.user_attrs['not_reached']}"
    if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted"):
        return "interrupted"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        epoch = max(trial.intermediate_values)
        return f"(epoch {epoch}: {trial.intermediate_values[epoch]:.4f})"
    if trial.state == TrialState.COMPLETE:
        return f"{trial.value:.4f}" if objective.threshold is None else f"{trial.value:.2f} s"
    return ""


def trials_table(study, objective: Objective) -> str:
    """A Markdown table: one row per trial, its state, objective, parameters and run folder."""
    names = sorted({name for trial in study.trials for name in trial.params})
    header = ["trial", "state", objective.name, *names, "train s", "run"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in study.trials:
        seconds = trial.user_attrs.get("train_seconds")
        cells = [str(trial.number), trial.state.name.lower(), trial_value_text(trial, objective),
                 *(f"{trial.params[name]:.4g}" if isinstance(trial.params.get(name), float)
                   else str(trial.params.get(name, "")) for name in names),
                 "" if seconds is None else f"{seconds:.1f}", trial.user_attrs.get("run_dir", "")]
        rows.append("| " + " | ".join(cells) + " |")
    return f"# Study {study.study_name}: {objective.name} ({study.direction.name.lower()})\n\n" + "\n".join(rows) + "\n"


def summary_document(study, options: SweepOptions, objective: Objective) -> dict[str, Any]:
    from optuna.trial import TrialState

    def count(state) -> int:
        return sum(trial.state == state for trial in study.trials)

    complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return {
        "study": study.study_name, "storage": redact(options.storage_url), "objective": objective.name,
        "direction": study.direction.name.lower(),
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": best.params if best else {}, "best_run": best.user_attrs.get("run_dir") if best else None,
        "n_complete": len(complete), "n_pruned": count(TrialState.PRUNED), "n_failed": count(TrialState.FAIL),
        "n_running": count(TrialState.RUNNING), "n_waiting": count(TrialState.WAITING),
        "n_not_reached": sum("not_reached" in trial.user_attrs for trial in study.trials),
    }


def plot_history(study, objective: Objective, path: Path) -> Path:
    """Each finished trial's objective and the best so far."""
    from optuna.trial import TrialState

    from mnist_cnn.plots import _pyplot

    plt = _pyplot()
    complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    better = max if objective.threshold is None else min
    figure, axes = plt.subplots(figsize=(7, 4))
    numbers, values = [t.number for t in complete], [t.value for t in complete]
    axes.plot(numbers, values, "o", color="tab:blue", label="trial")
    best = [better(values[:i + 1]) for i in range(len(values))]
    axes.step(numbers, best, where="post", color="tab:red", label="best so far")
    pruned = [t.number for t in study.trials if t.state == TrialState.PRUNED]
    if pruned and values:  # drawn at the worst complete value: they have none of their own
        worst = min(values) if better is max else max(values)
        axes.plot(pruned, [worst] * len(pruned), "x", color="gray", label="pruned / not reached")
    axes.set(xlabel="trial", ylabel=objective.name, title=f"Study {study.study_name}: {len(complete)} "
             f"complete, {len(pruned)} pruned")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def importances(study) -> tuple[dict[str, float], str | None]:
    """(importance per parameter, why none) from Optuna's fANOVA evaluator; with one
    parameter it is all of it; with fewer than 2 complete trials there is nothing to compare."""
    import optuna
    from optuna.trial import TrialState

    complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    names = sorted({name for trial in complete for name in trial.params})
    if len(complete) < 2 or not names:
        return {}, f"importance needs 2 complete trials (have {len(complete)})"
    if len(names) == 1:
        return {names[0]: 1.0}, None
    try:
        return dict(optuna.importance.get_param_importances(study)), None
    except (ValueError, RuntimeError) as error:
        return {}, f"importance could not be computed ({str(error).splitlines()[0][:80]})"


def plot_importance(study, path: Path) -> Path:
    from mnist_cnn.plots import _pyplot

    plt = _pyplot()
    values, why = importances(study)
    figure, axes = plt.subplots(figsize=(7, 1.5 + 0.4 * max(1, len(values))))
    if values:
        names = list(values)[::-1]
        axes.barh(names, [values[name] for name in names], color="tab:blue")
        axes.set(xlabel="importance (fANOVA, share of the objective's variance)", xlim=(0, 1))
    else:
        axes.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
        axes.set_axis_off()
    axes.set_title(f"Study {study.study_name}: parameter importance")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_summary(options: SweepOptions) -> dict[str, Any]:
    """summary.json, trials.md, history.png and importance.png in the sweep folder."""
    study = load_study(options, create=False)
    objective = parse_objective(study.user_attrs.get("objective", options.objective.name))
    folder = options.folder
    folder.mkdir(parents=True, exist_ok=True)
    document = summary_document(study, options, objective)
    atomic_write_text(folder / SUMMARY_FILE, json.dumps(document, indent=2) + "\n")
    atomic_write_text(folder / TABLE_FILE, trials_table(study, objective))
    plot_history(study, objective, folder / HISTORY_FILE)
    plot_importance(study, folder / IMPORTANCE_FILE)
    return document
