"""Several machines: two sweep workers, separate processes with their own sweep folders,
share one study on a real PostgreSQL server; one is killed with SIGKILL in mid-trial.

Needs Debian's `postgresql` (initdb, pg_ctl): skipped without it, failed in CI (CI=true).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import cli, uid_mapped, write_dataset

TRIALS, EPOCHS = 4, 2


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server in a temporary folder on 127.0.0.1 and a free port, run by a
    non-root user (the server refuses root), stopped afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL not installed (apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if os.geteuid() == 0 and not uid_mapped(pwd.getpwnam("postgres").pw_uid):
        pytest.skip("root here cannot become postgres (a user namespace that maps only root)")
    folder = Path(tempfile.mkdtemp(prefix="mnist-cnn-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    try:
        run(str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "sweeper", "--auth=trust", "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w",
            "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F", "start")
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "sweeper", "sweeps")
        yield f"postgresql://sweeper@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def worker_args(url: str, sweep_dir: Path, data: Path) -> list[str]:
    """One machine's `mnist-cnn sweep` on the shared study; its own folder for run folders."""
    return ["sweep", "--storage", url, "--study", "shared", "--sweep-dir", str(sweep_dir),
            "--trials", str(TRIALS), "--heartbeat", "1", "--pruner", "none", "--space", "lr=log:1e-3..1e-2",
            "--dataset", "custom", "--data-dir", str(data), "--val-size", "100", "--epochs", str(EPOCHS),
            "--batch-size", "20", "--loss", "ce"]


def start_worker(url: str, sweep_dir: Path, data: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnist_cnn", *worker_args(url, sweep_dir, data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def running_trial_of(study, pid: int):
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker", {}).get("pid") == pid:
            return trial
    return None


def test_two_machines_share_a_postgres_study_and_survive_a_kill(postgres_url, mnist, tmp_path):
    import optuna
    from optuna.trial import TrialState

    data = write_dataset(tmp_path / "data", {"train": (mnist["train"][0][:500], mnist["train"][1][:500]),
                                             "test": (mnist["test"][0][:100], mnist["test"][1][:100])})
    victim = start_worker(postgres_url, tmp_path / "machine-a", data)
    survivor = start_worker(postgres_url, tmp_path / "machine-b", data)
    try:
        deadline, killed = time.monotonic() + 120, None
        while killed is None and victim.poll() is None and time.monotonic() < deadline:
            try:
                study = optuna.load_study(study_name="shared", storage=postgres_url)
                killed = running_trial_of(study, victim.pid)
            except KeyError:  # not created yet
                pass
            time.sleep(0.05)
        assert killed is not None, victim.communicate()[0]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(timeout=30)
        output = survivor.communicate(timeout=240)[0]
        assert survivor.returncode == 0, output
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()

    # Machine A comes back (in this process): the trial its worker lost, silent for more than
    # 3 heartbeats, is failed and run again if machine B has not already done so.
    time.sleep(max(0.0, killed_at + 3.5 - time.monotonic()))
    again = cli(*worker_args(postgres_url, tmp_path / "machine-a", data))
    assert again.returncode == 0, again.stderr

    trials = optuna.load_study(study_name="shared", storage=postgres_url).trials
    lost = trials[killed.number]
    assert lost.state == TrialState.FAIL  # never counted as finished
    assert not (tmp_path / "machine-a" / "shared" / "trials" / str(killed.number) / "model.json").exists()
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    assert len(complete) >= TRIALS  # the study reached its trial count
    assert [trial for trial in trials if trial.state != TrialState.COMPLETE] == [lost]
    for trial in complete:  # each finished trial kept, trained exactly once, in its own folder
        run = Path(trial.user_attrs["run_dir"])
        assert run.parent.name == "trials" and run.name == str(trial.number)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [record["epoch"] for record in records] == list(range(1, EPOCHS + 1))
        assert records[-1]["val_accuracy"] == trial.value
    assert len({trial.user_attrs["run_dir"] for trial in complete}) == len(complete)
    retries = [trial for trial in trials if trial.system_attrs.get("failed_trial") is not None]
    assert [(t.system_attrs["failed_trial"], t.params, t.state) for t in retries] == \
           [(killed.number, lost.params, TrialState.COMPLETE)]  # run again exactly once
    assert {victim.pid, survivor.pid} <= {trial.user_attrs["worker"]["pid"] for trial in trials}
    summary = json.loads((tmp_path / "machine-a" / "shared" / "summary.json").read_text())
    assert summary["n_complete"] == len(complete) and summary["storage"] == postgres_url
