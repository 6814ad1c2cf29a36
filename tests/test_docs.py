"""The documentation: the README's commands are the ones CI runs, the site builds with --strict and
offline, its generated pages say what the code and the data say, and every code block a page marks
as runnable runs as written."""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCS = REPO / "docs"
BIN = Path(sys.executable).parent


def load_hook():
    spec = importlib.util.spec_from_file_location("docs_generated", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generated = load_hook()


# ---------------------------------------------------------------- the READMEs


def test_ci_runs_the_readme_install_test_and_main_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -e .",
                    ".venv/bin/python -m pytest",
                    ".venv/bin/mnist-cnn train"):
        assert f"\n{command}\n" in readme, command
        assert f"\n{command}\n" in ci, command


@pytest.mark.parametrize("name", ["README.md", "README.ko.md"])
def test_readmes_are_short_and_their_links_resolve(name):
    text = (REPO / name).read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links to the documentation"
    for target in local:
        assert (REPO / target).exists(), f"{name} links to {target}, which does not exist"


def code_without_comments(code: str) -> list[str]:
    return [line.split("#", 1)[0].rstrip() for line in code.splitlines() if line.split("#", 1)[0].strip()]


def test_the_korean_guide_shows_the_same_python_example():
    english = runnable_blocks(DOCS / "python-api.md")[0].code
    korean = (DOCS / "ko.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert code_without_comments(korean) == code_without_comments(english)


# ---------------------------------------------------------------- the site


def build(config: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # not -q: it drops the warnings that --strict counts, and a broken link would pass
    return subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-f", str(config), "-d", str(out)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(REPO / "mkdocs.yml", out)
    assert result.returncode == 0, result.stderr
    return out


def text_of(html: str) -> str:
    """A page's text: tags dropped, entities decoded, white space collapsed."""
    import html as html_module

    return re.sub(r"\s+", " ", html_module.unescape(re.sub(r"<[^>]+>", "", html)))


def plain(markdown: str) -> str:
    """Inline Markdown as the page shows it: no code or emphasis marks, no escapes."""
    return re.sub(r"\s+", " ", markdown.replace("`", "").replace("**", "").replace("\\|", "|")).strip()


def test_every_page_in_the_nav_is_built(site):
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def pages(nav):
        for entry in nav:
            for value in entry.values():
                yield from pages(value) if isinstance(value, list) else [value]

    names = list(pages(config["nav"]))
    assert {"cli.md", "python-api.md", "performance.md", "model-card.md", "ko.md"} <= set(names)
    for name in names:
        assert (site / name.replace(".md", ".html")).is_file(), name
    for image in DOCS.glob("*.png"):  # the README's pictures stay usable
        assert (site / image.name).read_bytes() == image.read_bytes()


def test_the_site_fetches_nothing_from_another_host(site):
    external = re.compile(r"""<(?:script|img|iframe|source)\b[^>]*\bsrc=["']?(?:https?:)?//"""
                          r"""|<link\b[^>]*\brel=["']?(?:stylesheet|preload|modulepreload)[^>]*\bhref=["']?(?:https?:)?//"""
                          r"""|<link\b[^>]*\bhref=["']?(?:https?:)?//[^>]*\brel=["']?(?:stylesheet|preload)""", re.I)
    for page in site.rglob("*.html"):
        assert not external.search(page.read_text()), page
    for page in site.glob("*.html"):  # what the pages load is in the site
        for source in re.findall(r"""<script\b[^>]*\bsrc=["']?([^"' >]+)""", page.read_text()):
            assert (site / source.lstrip("/")).is_file(), (page.name, source)
    for sheet in site.rglob("*.css"):
        assert not re.search(r"@import|url\(\s*[\"']?(?:https?:)?//", sheet.read_text()), sheet
    assert "fonts.googleapis" not in (site / "index.html").read_text()
    # search runs from the site's own index, also when opened from the disk (file://)
    assert (site / "search" / "search_index.json").is_file() or (site / "search" / "search_index.js").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs, ignore=shutil.ignore_patterns("hooks", "*.png"))
    for image in DOCS.glob("*.png"):
        (docs / image.name).write_bytes(b"")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config = copy.deepcopy(config)
    config["docs_dir"] = str(docs)
    config["hooks"] = [str(DOCS / "hooks" / "generated.py")]
    config.pop("watch", None)  # paths relative to the real mkdocs.yml
    config["plugins"] = [p for p in config["plugins"] if not isinstance(p, dict)]  # no API pages: faster
    (docs / "python-api.md").write_text("# Python API\n")
    page = docs / "errors.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "'no-such-page.md'" in result.stderr and "Aborted with 1 warnings in strict mode" in result.stdout + result.stderr


def parser_flags() -> dict[str, list[str]]:
    from mnist_cnn.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [s for action in p._actions for s in action.option_strings if s not in ("-h", "--help")]
            for name, p in sub.choices.items()}


def test_the_cli_reference_lists_every_command_flag_and_default(site):
    from mnist_cnn.cli import build_parser

    reference = generated.cli_reference()
    html = text_of((site / "cli.html").read_text())
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = parser_flags()
    assert {"train", "evaluate", "predict", "serve", "export"} <= set(flags)
    for name, parser in sub.choices.items():
        section = reference.split(f"## `mnist-cnn {name}`\n", 1)[1].split("\n## `", 1)[0]
        assert f"mnist-cnn {name}" in html
        for flag in flags[name]:
            assert f"`{flag}`" in section, (name, flag)
            assert flag in html, (name, flag)
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                row = next(line for line in section.splitlines() if f"`{action.option_strings[0]}`" in line)
                number = isinstance(action.default, (int, float)) and not isinstance(action.default, bool)
                shown = {f"default: {action.default}", f"default: {action.default:,}" if number else "",
                         f"default: {action.default:g}" if number else ""}
                assert any(s and s in row for s in shown), (name, action.option_strings[0], row)


def test_the_python_api_reference_covers_every_module(site):
    html = (site / "python-api.html").read_text()
    modules = generated.package_modules()
    assert {"mnist_cnn", "mnist_cnn.api", "mnist_cnn.cli"} <= set(modules)
    for module in modules:
        assert f'id="{module}"' in html, module
    assert 'id="mnist_cnn.api.predict_images"' in html
    # its docstring, rendered
    assert "Class probabilities, float32 (N, classes)" in text_of(html)


def test_the_performance_tables_come_from_the_results_files(site):
    page = generated.render((DOCS / "performance.md").read_text())
    results = sorted(p.name for p in generated.RESULTS.iterdir() if p.suffix in (".md", ".txt"))
    assert results
    for name in results:  # shown on the page, each named
        assert f"benchmarks/results/{name}`" in page, name
    html = text_of((site / "performance.html").read_text())
    for name in results:
        if name.endswith(".md"):  # every table row of every file is on the page
            for row in (generated.RESULTS / name).read_text().splitlines():
                if row.startswith("| ") and not row.startswith("|---"):
                    for cell in row.strip("| ").split(" | "):
                        assert plain(cell) in html, (name, row, cell)


def test_a_new_results_file_reaches_the_performance_page(tmp_path, monkeypatch):
    for path in generated.RESULTS.iterdir():
        if path.is_file():  # a study's raw files live in folders beside the reports
            (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "2099-01-01-cpu.md").write_text("## Benchmarks, 2099-01-01\n\n| a | b |\n|---|---|\n| 1.23 | 4.56 |\n")
    monkeypatch.setattr(generated, "RESULTS", tmp_path)
    page = generated.render((DOCS / "performance.md").read_text())
    assert "#### Benchmarks, 2099-01-01" in page and "| 1.23 | 4.56 |" in page
    assert page.index("2099-01-01-cpu.md") < page.index("2026-11-30-results.md")  # newest first


# ---------------------------------------------------------------- the model card


def test_the_model_card_says_what_model_json_says(site):
    info = json.loads(generated.MODEL_JSON.read_text())
    card = generated.model_card(info)
    evaluation, assessment = info["evaluation"], info["assessment"]
    html = text_of((site / "model-card.html").read_text())
    figures = [f"{100 * evaluation['accuracy']:.2f} %", f"({evaluation['correct']}/{evaluation['total']})",
               f"{100 * assessment['user_style_accuracy']:.2f} %", f"{100 * assessment['test_ece']:.2f} %",
               f"{100 * assessment['correct_kept']:.2f} %", f"{assessment['letters_unsure']}/26",
               f"{info['parameters']:,} parameters", info["command"], f"`lr` {info['config']['lr']}"]
    for figure in figures:
        assert figure in card, figure
        assert plain(figure) in html, figure
    for per_class in evaluation["per_class"]:
        assert f"| {per_class['name']} | {per_class['support']} | {per_class['correct']} |" in card
    changed = copy.deepcopy(info)
    changed["evaluation"]["accuracy"], changed["assessment"]["test_ece"] = 0.5, 0.25
    assert "50.00 %" in generated.model_card(changed) and "25.00 %" in generated.model_card(changed)


def test_the_model_cards_calibration_figures_hold_for_the_shipped_model():
    from mnist_cnn import predict_images
    from mnist_cnn.calibrate import expected_calibration_error
    from mnist_cnn.data import load_dataset

    assessment = json.loads(generated.MODEL_JSON.read_text())["assessment"]
    test = load_dataset("mnist", splits=("test",))["test"]
    probabilities = predict_images(test.images[:, 0].numpy(), model=generated.MODEL_JSON.parent)
    labels = test.labels.numpy()
    correct = probabilities.argmax(axis=1) == labels
    confidence = probabilities.max(axis=1)
    assert correct.mean() == json.loads(generated.MODEL_JSON.read_text())["evaluation"]["accuracy"]
    assert expected_calibration_error(probabilities, labels) == pytest.approx(assessment["test_ece"], abs=1e-4)
    assert (confidence[correct] >= assessment["min_confidence"]).mean() == pytest.approx(
        assessment["correct_kept"], abs=1e-4)


# ---------------------------------------------------------------- runnable code blocks

RUNNABLE = re.compile(r"^<!-- runnable(?:: (?P<id>[\w-]+))? -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```\n"
                      r"(?:\n<!-- expected-output -->\n```\w*\n(?P<expected>.*?)^```\n)?", re.S | re.M)


class Block:
    def __init__(self, page: Path, match: re.Match):
        self.page, self.id, self.lang = page.name, match["id"], match["lang"]
        self.code, self.expected = match["code"], match["expected"]


def runnable_blocks(page: Path) -> list[Block]:
    return [Block(page, m) for m in RUNNABLE.finditer(page.read_text())]


PAGES_WITH_RUNNABLE = sorted(p.name for p in DOCS.glob("*.md") if runnable_blocks(p))


def test_runnable_blocks_are_found_and_only_in_languages_the_test_runs():
    marked = sum(len(re.findall(r"^<!-- runnable", page.read_text(), re.M)) for page in DOCS.glob("*.md"))
    found = [block for page in DOCS.glob("*.md") for block in runnable_blocks(page)]
    assert marked == len(found) >= 3  # a marker the pattern misses would be a block never run
    assert {block.lang for block in found} <= {"python", "sh"}
    assert "python-api.md" in PAGES_WITH_RUNNABLE


def check_python_api_example(printed: list[str], folder: Path) -> None:
    assert printed[0].startswith("epoch 1/1  train_loss")  # train_model logs each epoch
    assert 0.5 < float(printed[1]) <= 1  # one epoch of the tutorial's recipe: ~86 %
    assert printed[2].endswith("/10000)")
    assert len(eval(printed[3])) == 8  # the predicted class names of 8 test digits
    assert printed[-1] == "runs/no-such-run: no such file or folder"
    assert (folder / "runs" / "notebook" / "model.safetensors").is_file()


CHECKS = {"python-api": check_python_api_example}


@pytest.mark.parametrize("page", PAGES_WITH_RUNNABLE)
def test_the_runnable_blocks_of_a_page_run_as_written(page, tmp_path, monkeypatch):
    """A page's runnable blocks run in order in one fresh folder: Python in this process, shell
    with bash -e and this environment's mnist-cnn first on the PATH."""
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for block in runnable_blocks(DOCS / page):
        if block.lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, f"docs/{page} ({block.id or 'runnable'})", "exec"), {})
            printed = out.getvalue()
        else:
            result = subprocess.run(["bash", "-e", "-c", block.code], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"docs/{page}: {block.code}\n{result.stderr}"
            printed = result.stdout
        if block.id in CHECKS:
            CHECKS[block.id](printed.splitlines(), tmp_path)
        if block.expected:
            for line in block.expected.splitlines():
                assert line.rstrip() in printed, (page, line)


# ---------------------------------------------------------------- the site in a browser

CHROMIUM = Path("/usr/bin/chromium")


def test_the_built_site_searches_from_the_disk_and_asks_no_other_host(site):
    """Opened from file:// in headless Chromium (as tests/test_serve_browser.py: skipped without
    Debian's chromium, except in CI), the search answers from the site's own index."""
    if not CHROMIUM.exists():
        message = "needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((site / "index.html").as_uri())
            page.click("input.md-search__input")
            page.keyboard.type("calibration")
            page.wait_for_selector(".md-search-result__item", timeout=30_000)
            titles = page.locator(".md-search-result__item").all_inner_texts()
        finally:
            browser.close()
    assert any("Calibrated confidence" in title for title in titles), titles
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    assert any(u.endswith("search/search_index.js") for u in requests)


def test_every_test_the_claims_page_names_exists():
    """docs/claims.md maps claims to tests: a renamed or deleted test must not leave it pointing nowhere."""
    named = re.findall(r"`(test_\w+\.py)::(\w+)", (DOCS / "claims.md").read_text())
    assert len(named) >= 20
    tests = Path(__file__).parent
    for module, name in named:
        assert re.search(rf"^(async )?def {name}\b", (tests / module).read_text(), re.M), f"{module}::{name}"
