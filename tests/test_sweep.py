"""Sweeps: the space syntax, a tiny study end to end (SQLite and journal file), continuing it,
pruning, interrupted trials run again, --workers 2, the summary files, and an objective that
never reads the test split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli, write_dataset
from mnist_cnn.sweep import Objective, Param, base_config, build_space, parse_param, read_space_file, redact

TRAIN, TEST = 500, 100


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, mnist) -> Path:
    """500 training images (100 of them held out for validation) and 100 test images."""
    return write_dataset(tmp_path_factory.mktemp("tiny"), {
        "train": (mnist["train"][0][:TRAIN], mnist["train"][1][:TRAIN]),
        "test": (mnist["test"][0][:TEST], mnist["test"][1][:TEST])})


@pytest.fixture(scope="module")
def poisoned_data(tmp_path_factory, mnist) -> Path:
    """The same training split; a test split of noise with wrong labels."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (TEST, 28, 28), dtype=np.uint8)
    wrong = ((mnist["test"][1][:TEST].astype(int) + 1) % 10).astype(np.uint8)
    return write_dataset(tmp_path_factory.mktemp("poisoned"), {
        "train": (mnist["train"][0][:TRAIN], mnist["train"][1][:TRAIN]), "test": (noise, wrong)})


def recipe(data: Path, *, epochs: int = 2) -> list[str]:
    return ["--dataset", "custom", "--data-dir", str(data), "--val-size", "100", "--epochs", str(epochs),
            "--batch-size", "20", "--loss", "ce"]


# A bad learning rate next to a good one: the median pruner must stop the bad trials.
SEARCH = ["--space", "lr=choice:5e-3,1e-7", "--space", "shift=int:0..2", "--seed", "3"]


def sweep(folder: Path, data: Path, *extra: str, trials: int = 4):
    result = cli("sweep", *recipe(data), *SEARCH, "--trials", str(trials), "--sweep-dir", str(folder), *extra)
    assert result.returncode == 0, result.stderr
    return result


def summary(folder: Path, study: str = "default") -> dict:
    return json.loads((folder / study / "summary.json").read_text())


def load(folder: Path, study: str = "default"):
    import optuna

    return optuna.load_study(study_name=study, storage=f"sqlite:///{folder / study / 'study.db'}")


@pytest.fixture(scope="module")
def clean_sweep(tmp_path_factory, tiny_data) -> Path:
    folder = tmp_path_factory.mktemp("sweeps")
    sweep(folder, tiny_data)
    return folder


# ---------------------------------------------------------------- the space


@pytest.mark.parametrize("name, spec, expected", [
    ("lr", "log:1e-4..1e-2", Param("lr", "log", 1e-4, 1e-2)),
    ("batch_size", "choice:128,256,512", Param("batch_size", "choice", choices=(128, 256, 512))),
    ("rotate", "0..15", Param("rotate", "uniform", 0.0, 15.0)),
    ("epochs", "int:4..12", Param("epochs", "int", 4, 12)),
    ("shift", "0..3", Param("shift", "uniform", 0, 3)),  # an integer field stays integer
    ("loss", "choice:ce,kl", Param("loss", "choice", choices=("ce", "kl"))),
    ("weight_decay", "log:1e-5..1e-3", Param("weight_decay", "log", 1e-5, 1e-3)),
])
def test_space_specs_parse(name, spec, expected):
    param = parse_param(name, spec)
    assert param == expected
    assert all(type(value) is type(expected.corners()[0]) for value in param.corners())


@pytest.mark.parametrize("args, fragment", [
    (["--space", "dropout=0..0.5"], "no such training field"),
    (["--space", "lr=log:0..1e-2"], "LOW > 0"),
    (["--space", "lr=1e-2..1e-3"], "range is empty"),
    (["--space", "lr=normal:1..2"], "unknown kind"),
    (["--space", "lr=1e-3"], "LOW..HIGH"),
    (["--space", "lr"], "FIELD=SPEC"),
    (["--space", "epochs=int:2..x"], "'x' is not an integer"),
    (["--space", "rotate=0..200"], "angle of 0 to 180"),
    (["--space", "batch_size=choice:64,64"], "distinct choices"),
    (["--space", "loss=choice:ce,hinge"], "hinge"),
    (["--space", "model=1..2"], "choice:"),
    (["--space", "label_smoothing=0..0.2", "--loss", "kl"], "--label-smoothing needs --loss ce"),
    (["--space", "lr=log:1e-3..1e-2", "--lr", "0.1"], "--lr is fixed and also searched"),
    (["--space", "lr=log:1e-3..1e-2", "--space", "lr=log:1e-4..1e-2"], "given twice"),
    (["--space", "lr=log:1e-3..1e-2", "--val-size", "0"], "needs a validation split"),
    (["--space", "lr=log:1e-3..1e-2", "--objective", "time_to:1.5"], "--objective"),
    (["--space", "lr=log:1e-3..1e-2", "--objective", "test_accuracy"], "--objective"),
    ([], "nothing to search"),
])
def test_bad_spaces_are_one_line_errors_before_anything_runs(tmp_path, args, fragment):
    result = cli("sweep", "--sweep-dir", str(tmp_path / "sweeps"), *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "sweeps").exists()


def test_space_files_toml_and_yaml(tmp_path):
    toml = tmp_path / "space.toml"
    toml.write_text('[space]\nlr = "log:1e-4..1e-2"\nbatch_size = [128, 256]\nrotate = "0..15"\n')
    yaml = tmp_path / "space.yaml"
    yaml.write_text('lr: "log:1e-4..1e-2"\nbatch_size: [128, 256]\nrotate: "0..15"\n')
    assert read_space_file(toml) == read_space_file(yaml) == [
        Param("lr", "log", 1e-4, 1e-2), Param("batch_size", "choice", choices=(128, 256)),
        Param("rotate", "uniform", 0.0, 15.0)]
    assert list(build_space(["epochs=int:2..4"], str(toml))) == ["lr", "batch_size", "rotate", "epochs"]
    (tmp_path / "bad.toml").write_text("lr = log:1e-4\n")
    result = cli("sweep", "--space-file", str(tmp_path / "bad.toml"))
    assert_one_line_error(result, "not valid toml")


def test_a_sweep_holds_out_a_validation_split_by_default_and_keeps_fixed_flags():
    space = build_space(["lr=log:1e-3..1e-2"], None)
    config = base_config("fast", {"epochs": 2}, space)
    assert config.val_size == 5000 and config.epochs == 2 and config.schedule == "onecycle"
    assert base_config("best", {}, space).val_size == 5000  # the preset's own


def test_storage_urls_are_shown_without_their_password():
    assert redact("postgresql://sweeper:s3cret@db:5432/sweeps") == "postgresql://sweeper:***@db:5432/sweeps"
    assert redact("postgresql://sweeper@db/sweeps") == "postgresql://sweeper@db/sweeps"
    assert redact("sqlite:///sweeps/default/study.db") == "sqlite:///sweeps/default/study.db"


def test_objectives_read_validation_records_only():
    records = [{"epoch": 1, "val_accuracy": 0.97, "train_seconds": 2.0, "test_accuracy": 0.999},
               {"epoch": 2, "val_accuracy": 0.991, "train_seconds": 2.5, "test_accuracy": 0.1}]
    assert Objective("val_accuracy").value(records) == 0.991
    assert Objective("time_to:0.99", 0.99).value(records) == 4.5
    assert Objective("time_to:0.995", 0.995).value(records) is None  # never a number


# ---------------------------------------------------------------- a study end to end


def test_sweep_writes_runs_and_summary(clean_sweep, tiny_data):
    document = summary(clean_sweep)
    assert {"best_trial", "best_value", "best_params", "best_run", "n_complete", "n_pruned",
            "n_failed"} <= document.keys()
    assert document["n_complete"] + document["n_pruned"] == 4 and document["n_failed"] == 0
    best = Path(document["best_run"])
    assert best == clean_sweep / "default" / "trials" / str(document["best_trial"])
    last = [json.loads(line) for line in (best / "metrics.jsonl").read_text().splitlines()][-1]
    assert document["best_value"] == last["val_accuracy"] and last["epoch"] == 2
    assert document["best_params"]["lr"] == 5e-3
    table = (clean_sweep / "default" / "trials.md").read_text().splitlines()
    assert table[2].startswith("| trial | state | val_accuracy | lr | shift |")
    assert len([line for line in table if line.startswith("| ") and line[2].isdigit()]) == 4
    for name in ("history.png", "importance.png"):
        with Image.open(clean_sweep / "default" / name) as image:
            image.load()
            assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 0  # drawn, not blank
    evaluated = cli("evaluate", str(best), "--json")  # an ordinary run folder
    assert evaluated.returncode == 0, evaluated.stderr
    info = json.loads((best / "model.json").read_text())
    assert json.loads(evaluated.stdout)["accuracy"] == info["evaluation"]["accuracy"]


def test_pruned_trials_are_recorded(clean_sweep):
    from optuna.trial import TrialState

    trials = load(clean_sweep).trials
    pruned = [trial for trial in trials if trial.state == TrialState.PRUNED]
    assert pruned and summary(clean_sweep)["n_pruned"] == len(pruned)
    for trial in pruned:  # the hopeless rate, stopped after its first epoch's report
        assert trial.params["lr"] == 1e-7 and list(trial.intermediate_values) == [1]
        lines = (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1
        assert trial.intermediate_values[1] == json.loads(lines[0])["val_accuracy"]


def test_rerunning_continues_the_study(clean_sweep, tiny_data, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(clean_sweep, folder)
    before = {trial.number: trial.value for trial in load(folder).trials}
    result = sweep(folder, tiny_data, trials=5)
    assert "4 finished trial(s) kept, continuing to 5" in result.stdout
    after = {trial.number: trial.value for trial in load(folder).trials}
    assert len(after) == 5 and {n: after[n] for n in before} == before
    assert (folder / "default" / "trials" / "4" / "config.json").is_file()
    again = sweep(folder, tiny_data, trials=5)  # the target is reached: nothing more runs
    assert len(load(folder).trials) == 5 and "trial 5" not in again.stdout
    assert "holds 5 finished trials (--trials 5): nothing to run" in again.stdout
    for name in ("summary.json", "trials.md", "history.png", "importance.png"):
        (folder / "default" / name).unlink()
    rewritten = cli("sweep", "--summary", "--sweep-dir", str(folder))
    assert rewritten.returncode == 0, rewritten.stderr
    assert summary(folder)["n_complete"] + summary(folder)["n_pruned"] == 5
    assert all((folder / "default" / name).is_file() for name in ("trials.md", "history.png", "importance.png"))
    missing = cli("sweep", "--summary", "--study", "nope", "--sweep-dir", str(folder))
    assert_one_line_error(missing, "no study 'nope'")
    assert not (folder / "nope").exists()


def test_objective_never_reads_the_test_split(clean_sweep, poisoned_data, tmp_path):
    """The same sweep with a test split of noise and wrong labels: the runs' test figures
    collapse, the objective and every choice the search made stay the same."""
    sweep(tmp_path, poisoned_data)
    clean, poisoned = load(clean_sweep).trials, load(tmp_path).trials
    assert [(t.params, t.state, t.value, t.intermediate_values) for t in clean] == \
           [(t.params, t.state, t.value, t.intermediate_values) for t in poisoned]
    best = summary(tmp_path)["best_run"]
    test_accuracy = json.loads((Path(best) / "model.json").read_text())["evaluation"]["accuracy"]
    assert test_accuracy < 0.5 < json.loads((Path(summary(clean_sweep)["best_run"]) / "model.json")
                                            .read_text())["evaluation"]["accuracy"]


def test_time_to_unreached_is_not_a_number(tmp_path, tiny_data):
    result = cli("sweep", *recipe(tiny_data, epochs=1), "--space", "lr=log:1e-4..1e-3", "--trials", "1",
                 "--objective", "time_to:0.999", "--pruner", "hyperband", "--sweep-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    document = summary(tmp_path)
    assert document["n_pruned"] == document["n_not_reached"] == 1 and document["n_complete"] == 0
    assert document["best_value"] is None and document["direction"] == "minimize"
    assert "no complete trial yet" in result.stdout
    assert "not reached 0.999" in (tmp_path / "default" / "trials.md").read_text()
    with Image.open(tmp_path / "default" / "importance.png") as image:  # says why there is none
        image.load()


def test_timeout_starts_no_new_trial(tmp_path, tiny_data):
    result = cli("sweep", *recipe(tiny_data, epochs=1), "--space", "lr=log:1e-4..1e-3", "--trials", "50",
                 "--timeout", "0.001", "--sweep-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "--timeout 0.001s reached" in result.stdout and len(load(tmp_path).trials) <= 1


def test_journal_file_storage_continues(tmp_path, tiny_data):
    journal = tmp_path / "shared" / "study.log"
    for trials in (1, 2):
        result = cli("sweep", *recipe(tiny_data, epochs=1), "--space", "lr=log:1e-3..1e-2", "--pruner", "none",
                     "--trials", str(trials), "--storage", f"journal:{journal}", "--study", "j",
                     "--sweep-dir", str(tmp_path / "sweeps"))
        assert result.returncode == 0, result.stderr
    assert journal.stat().st_size > 0 and summary(tmp_path / "sweeps", "j")["n_complete"] == 2
    assert sorted(p.name for p in (tmp_path / "sweeps" / "j" / "trials").iterdir()) == ["0", "1"]


def test_interrupted_and_killed_trials_are_run_again(tmp_path, tiny_data):
    """A trial Ctrl-C cut short (failed, marked interrupted) and one whose worker was killed
    (left running by a process that is gone) are queued again with their parameters; the
    finished trial is kept."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "sweeps"
    (folder / "default").mkdir(parents=True)
    study = optuna.create_study(study_name="default", storage=f"sqlite:///{folder / 'default' / 'study.db'}",
                                direction="maximize")
    study.set_user_attr("objective", "val_accuracy")
    lr = FloatDistribution(1e-3, 1e-2, log=True)
    study.add_trial(optuna.create_trial(params={"lr": 2e-3}, distributions={"lr": lr}, value=0.5))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"lr": 3e-3}, distributions={"lr": lr},
                                        user_attrs={"interrupted": True}))
    killed = study.ask({"lr": lr})
    study._storage.set_trial_user_attr(killed._trial_id, "worker",
                                       {"host": __import__("socket").gethostname(), "pid": gone.pid})
    result = cli("sweep", *recipe(tiny_data, epochs=1), "--space", "lr=log:1e-3..1e-2", "--pruner", "none",
                 "--trials", "3", "--sweep-dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert "trial 1 was interrupted: queued again" in result.stdout
    assert "trial 2 was interrupted: queued again" in result.stdout
    trials = load(folder).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[0].value == 0.5
    retries = {t.system_attrs["failed_trial"]: t.params["lr"] for t in trials[3:]}
    assert retries == {1: 3e-3, 2: killed.params["lr"]}


def test_two_workers_share_the_study(tmp_path, tiny_data):
    result = cli("sweep", *recipe(tiny_data, epochs=1), "--space", "lr=log:1e-3..1e-2", "--pruner", "none",
                 "--trials", "4", "--workers", "2", "--seed", "0", "--sweep-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    trials = load(tmp_path).trials
    assert 4 <= len(trials) <= 5 and all(t.value is not None for t in trials)  # at most K-1 over
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    assert len({t.params["lr"] for t in trials}) == len(trials)  # no recipe proposed twice
    assert summary(tmp_path)["n_complete"] == len(trials)
