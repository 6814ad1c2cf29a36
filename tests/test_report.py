"""Plots, grids, the HTML report, the layer table and explanations: files that decode."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli, on_paper


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


@pytest.fixture(scope="module")
def reported_run(mnist_model, tmp_path_factory):
    """A copy of the shared model's run folder after `mnist-cnn report`."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(mnist_model, run)
    result = cli("report", str(run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {run / 'report.html'}"
    return run


def test_report_writes_plots_galleries_and_look_inside(reported_run):
    for name in ("learning_curves.png", "confusion_matrix.png", "per_class_accuracy.png",
                 "misclassified.png", "explain.png"):
        image = decode_png((reported_run / name).read_bytes())
        assert image.width > 300 and image.height > 200, name
        assert len(np.unique(np.asarray(image.convert("L")))) > 10, name  # not a blank canvas
    assert "conv1" in (reported_run / "summary.txt").read_text()
    info = json.loads((reported_run / "model.json").read_text())
    matrix = info["evaluation"]["confusion_matrix"]
    assert sum(map(sum, matrix)) == 10000
    assert info["evaluation"]["correct"] == info["metrics"]["test_correct"]


def test_training_itself_draws_nothing(mnist_model):
    assert not list(mnist_model.glob("*.png")) and not (mnist_model / "report.html").exists()


def test_no_report_skips_the_pictures(tmp_path, small_data):
    run = tmp_path / "run"
    result = cli("train", "--epochs", "1", "--dataset", "custom", "--data-dir", str(small_data),
                     "--run-dir", str(run), "--no-progress", "--no-report")
    assert result.returncode == 0, result.stderr
    assert (run / "model.safetensors").is_file()
    assert not list(run.glob("*.png")) and not (run / "report.html").exists()


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_report_is_self_contained_html_with_decodable_images(reported_run):
    text = (reported_run / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    info = json.loads((reported_run / "model.json").read_text())
    accuracy = info["evaluation"]
    assert f"{100 * accuracy['accuracy']:.2f}% ({accuracy['correct']}/10000)" in text
    parser = _Images()
    parser.feed(text)
    assert len(parser.sources) == 4
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")  # nothing fetched from elsewhere
        decode_png(base64.b64decode(source.split(",", 1)[1]))
    assert not re.search(r"""(src|href)=["'](https?:|/)""", text)


def test_plot_command_redraws(reported_run):
    target = reported_run / "learning_curves.png"
    target.unlink()
    result = cli("plot", str(reported_run))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote") == 3
    decode_png(target.read_bytes())


def test_show_grid_and_misclassified(mnist_model, tmp_path):
    result = cli("show", "--model", str(mnist_model), "--count", "12", "--output", str(tmp_path / "s.png"))
    assert result.returncode == 0, result.stderr
    assert "(12 images)" in result.stdout
    grid = decode_png((tmp_path / "s.png").read_bytes())
    wrong = cli("show", "--model", str(mnist_model), "--misclassified", "--count", "5",
                    "--output", str(tmp_path / "m.png"))
    assert wrong.returncode == 0 and "(5 images)" in wrong.stdout
    mistakes = decode_png((tmp_path / "m.png").read_bytes()).convert("RGB")
    pixels = np.asarray(mistakes).reshape(-1, 3).astype(int)
    red = int(((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).sum())
    assert red > 5 * 4 * 84  # every drawn image is framed in red
    assert grid.width > 0


def test_summary_table_matches_the_tutorial(mnist_model):
    result = cli("summary")
    assert result.returncode == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[3:]}
    assert "5x5" in rows["conv1"] and "1->6" in rows["conv1"] and "(b, 6, 24, 24)" in rows["conv1"]
    assert "(b, 6, 12, 12)" in rows["pool1"]
    assert "6->16" in rows["conv2"] and "(b, 16, 8, 8)" in rows["conv2"]
    assert "(b, 16, 4, 4)" in rows["pool2"] and "(b, 256)" in rows["flatten"]
    assert "256->96" in rows["lin1"] and "96->10" in rows["lin2"]
    assert rows["total"].split()[-1] == "28,214"
    from_run = cli("summary", "--model", str(mnist_model))
    assert from_run.returncode == 0 and "28,214" in from_run.stdout
    assert_one_line_error(cli("summary", "--model", "nonesuch"), "nonesuch: no such file or folder")


def test_explain_a_user_image_and_a_test_image(mnist_model, mnist, tmp_path):
    image = tmp_path / "seven.png"
    on_paper(mnist["test"][0][0]).save(image)
    result = cli("explain", "--model", str(mnist_model), str(image), "--output", str(tmp_path / "e.png"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("predicted 7 (")
    picture = decode_png((tmp_path / "e.png").read_bytes())
    assert picture.width > 600
    indexed = cli("explain", "--model", str(mnist_model), "--test-index", "1", cwd=tmp_path)
    assert indexed.returncode == 0 and (tmp_path / "test-1-explain.png").is_file()
    assert_one_line_error(cli("explain", "--model", str(mnist_model), str(tmp_path / "none.png")),
                          "file not found")
    assert_one_line_error(cli("explain", "--model", str(mnist_model), "--test-index", "10000"),
                          "--test-index must be in 0..9999")


@pytest.mark.parametrize("command", ["plot", "report"])
def test_plot_and_report_of_a_non_run_are_errors(command, tmp_path):
    assert_one_line_error(cli(command, str(tmp_path / "nothing")), "no such run folder")
