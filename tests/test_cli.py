"""The command line: exit codes, one-line errors, help that answers at once."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, cli
from mnist_cnn.cli import main


def test_help_and_version():
    result = cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout
    assert cli("--version").stdout.startswith("mnist-cnn ")
    train_help = " ".join(cli("train", "--help").stdout.split())
    for flag in ("--model", "--epochs", "--batch-size", "--lr", "--loss", "--seed", "--device",
                 "--data-dir", "--run-dir", "--resume", "--preset"):
        assert flag in train_help
    assert "(default: 0.0001)" in train_help and "(default: 128)" in train_help


def test_the_installed_console_script(tmp_path):
    """`mnist-cnn` as pip installed it (pyproject's [project.scripts]), in a real process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mnist_cnn import __version__

    script = Path(sys.executable).with_name("mnist-cnn")
    if not script.exists():
        assert os.environ.get("CI") != "true", f"no {script}: the README's install puts it there"
        pytest.skip(f"no {script} (pip install -e .)")
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f"mnist-cnn {__version__}"
    refused = subprocess.run([str(script), "train", "--epochs", "many"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert_one_line_error(refused, "'many' is not a valid positive integer")
    assert not (tmp_path / "runs").exists()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from mnist_cnn.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("args, fragment", [
    (["train", "--epochs", "-3"], "argument --epochs: '-3' is not a valid positive integer"),
    (["train", "--epochs", "many"], "'many' is not a valid positive integer"),
    (["train", "--lr", "0"], "'0' is not a valid positive number"),
    (["train", "--loss", "mse"], "invalid choice: 'mse'"),
    (["train", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["train", "--preset", "turbo"], "invalid choice: 'turbo'"),
    (["train", "--warmup", "1.5"], "not a valid fraction"),
    (["fly"], "invalid choice: 'fly'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_invalid_flags_are_one_line_usage_errors(capsys, args, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


@pytest.mark.parametrize("args, fragment", [
    (["train", "--model", "resnet", "--epochs", "1"], "unknown model 'resnet'"),
    (["train", "--dataset", "emnist"], "unknown dataset 'emnist'"),
    (["train", "--data-dir", "/no/such/folder"], "data directory /no/such/folder does not exist"),
    (["train", "--label-smoothing", "0.1"], "--label-smoothing needs --loss ce"),
    (["train", "--resume", "/no/such/run"], "no such run folder"),
    (["train", "--resume", "/tmp", "--epochs", "3"], "--resume continues the saved recipe; drop --epochs"),
])
def test_bad_values_are_one_line_errors(tmp_path, args, fragment):
    assert_one_line_error(cli(*args, "--no-progress", cwd=tmp_path), fragment)


def test_missing_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(cli("train", "--device", "cuda", "--run-dir", str(tmp_path / "r")),
                          "CUDA is not available")


def test_train_in_a_fresh_folder_uses_runs_timestamp(tmp_path, small_data):
    result = cli("train", "--epochs", "1", "--dataset", "custom", "--data-dir", str(small_data),
                 "--no-progress", "--no-report", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "model.safetensors").is_file()
    assert "done: test accuracy" in result.stdout


def test_a_run_that_cannot_start_leaves_no_folder(tmp_path):
    for args in (["--data-dir", str(tmp_path / "missing")], ["--model", "resnet"]):
        result = cli("train", *args, "--no-progress", cwd=tmp_path)
        assert result.returncode == 2
        assert not (tmp_path / "runs").exists(), args


def test_an_unwritable_output_is_one_line_not_a_traceback(tmp_path, small_data):
    import os

    if os.geteuid() == 0:
        target = "/proc/mnist-cnn-run"  # not creatable even by root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    result = cli("train", "--epochs", "1", "--dataset", "custom", "--data-dir", str(small_data),
                     "--run-dir", target, "--no-progress")
    assert result.returncode in (1, 2) and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and target in result.stderr
