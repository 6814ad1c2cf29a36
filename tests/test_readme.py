"""The README's commands are the ones CI runs."""

from __future__ import annotations

from conftest import REPO


def test_ci_runs_the_readme_install_test_and_main_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e .",
                    ".venv/bin/python -m pytest",
                    ".venv/bin/mnist-cnn train"):
        assert f"\n{command}\n" in readme, command
        assert f"\n{command}\n" in ci, command
