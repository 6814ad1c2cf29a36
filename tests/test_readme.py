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


def test_the_readme_python_api_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md (Python API)", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("epoch 1/1  train_loss")  # train_model logs each epoch
    assert 0.5 < float(printed[1]) <= 1  # one epoch of the tutorial's recipe: ~86 %
    assert printed[2].endswith("/10000)")
    assert len(eval(printed[3])) == 8  # the predicted class names of 8 test digits
    assert printed[-1] == "runs/no-such-run: no such file or folder"
    assert (tmp_path / "runs" / "notebook" / "model.safetensors").is_file()
