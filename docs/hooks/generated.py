"""MkDocs hook: the pages (or parts of pages) that are written from the code and the data at
build time, so they cannot drift from what they describe.

A page asks for generated content with an HTML comment on a line of its own:

    <!-- generated: cli -->                    every subcommand, flag and default (cli.build_parser())
    <!-- generated: presets -->                each preset's values beside the tutorial's recipe
    <!-- generated: api -->                    the Python API reference (mkdocstrings, from docstrings)
    <!-- generated: results FILE -->           benchmarks/results/FILE, its headings moved under the page's
    <!-- generated: results-all -->            every other file of benchmarks/results/, newest first
    <!-- generated: gpu-check FILE -->         a GPU check log of benchmarks/gpu_check.sh, as a table
    <!-- generated: model-card -->             the shipped model's card, from its model.json
    <!-- generated: include PATH -->           a Markdown file of the repository (CHANGELOG.md)

Nothing here reaches the network, and nothing imports torch: the CLI's parser is built without it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "mnist_cnn"
RESULTS = ROOT / "benchmarks" / "results"
MODEL_JSON = PACKAGE / "pretrained" / "model.json"
MARKER = re.compile(r"^<!-- generated: ([\w-]+)(?: (\S+))? -->$", re.MULTILINE)

# The Python API reference: these modules first, in this order (the ones a user calls), then
# every other module of the package, found on disk. A name here that no longer exists (a module
# renamed or split) is skipped, and the module under its new name is still found and listed.
API_FIRST = ["mnist_cnn", "mnist_cnn.api", "mnist_cnn.config", "mnist_cnn.train", "mnist_cnn.evaluate",
             "mnist_cnn.predict", "mnist_cnn.preprocess", "mnist_cnn.export", "mnist_cnn.data",
             "mnist_cnn.idx", "mnist_cnn.catalog", "mnist_cnn.runs", "mnist_cnn.checkpoints", "mnist_cnn.exits"]


# ---------------------------------------------------------------- the CLI reference


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _action_row(action) -> list[str]:
    import argparse

    if action.option_strings:
        names = ", ".join(f"`{name}`" for name in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (
                "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
            names += f" `{metavar}`"
    else:
        names = f"`{action.metavar or action.dest}`" + (" …" if action.nargs in ("*", "+") else "")
    help_text = (action.help or "") % {"default": action.default, "prog": ""} if action.help else ""
    if action.default not in (None, argparse.SUPPRESS, False, []) and "default" not in help_text:
        help_text += f" (default: {action.default})"
    if action.choices and action.option_strings and action.metavar:
        help_text += " — one of " + ", ".join(f"`{choice}`" for choice in action.choices)
    return [names, _cell(help_text.strip())]


def _command_section(name: str, parser, level: int) -> list[str]:
    import argparse

    lines = [f"{'#' * level} `{parser.prog}`" if name else f"{'#' * level} `{parser.prog}`", ""]
    if parser.description:
        lines += [parser.description, ""]
    usage = [line.removeprefix("usage: ").removeprefix(" " * len("usage: "))
             for line in parser.format_usage().strip().splitlines()]
    lines += ["```text", *usage, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        title = {"positional arguments": "arguments", "options": "options"}.get(group.title, group.title)
        lines += [f"**{title}**", "", "| flag | what it does |", "|---|---|"]
        lines += ["| " + " | ".join(_action_row(action)) + " |" for action in actions]
        lines.append("")
    return lines


def cli_reference(_: str | None = None) -> str:
    """Markdown for every subcommand of `mnist-cnn`, its flags, choices and defaults."""
    import argparse

    from mnist_cnn.cli import build_parser

    parser = build_parser()
    lines = _command_section("", parser, 2)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#mnist-cnn-{name}) | {_cell(helps.get(name) or '')} |" for name in subparsers.choices]
    lines.append("")
    for name, sub in subparsers.choices.items():
        lines += _command_section(name, sub, 2)
    return "\n".join(lines)


def presets(_: str | None = None) -> str:
    """Each preset's values against the tutorial's recipe (config.PRESETS and TrainConfig's defaults)."""
    from mnist_cnn.config import PRESETS, TrainConfig

    defaults = TrainConfig().to_dict()
    fields = [name for name in defaults if name not in ("preset", "seed")
              and any(name in values for values in PRESETS.values())]
    names = list(PRESETS)
    lines = ["| flag | the tutorial's (no preset) | " + " | ".join(f"`--preset {n}`" for n in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    for name in fields:
        cells = [f"`{PRESETS[n][name]}`" if name in PRESETS[n] else "" for n in names]
        lines.append(f"| `--{name.replace('_', '-')}` | `{defaults[name]}` | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "*Generated from `mnist_cnn.config` (PRESETS and TrainConfig's defaults) "
                                   "when this site was built; an empty cell keeps the tutorial's value.*"])


# ---------------------------------------------------------------- the Python API


def package_modules() -> list[str]:
    """Every public module of the package, as found on disk (no import)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        found.append(".".join(parts))
    return found


def api_reference(_: str | None = None) -> str:
    modules = package_modules()
    ordered = [name for name in API_FIRST if name in modules] + [name for name in modules if name not in API_FIRST]
    return "\n\n".join(f"::: {name}" for name in ordered)


# ---------------------------------------------------------------- benchmark results


def shift_headings(markdown: str, to_level: int) -> str:
    """Move a document's headings so its highest one becomes `to_level` (outside code blocks)."""
    lines, fenced = markdown.splitlines(), False
    levels = []
    for line in lines:
        fenced ^= line.startswith("```")
        if not fenced and (m := re.match(r"(#+) ", line)):
            levels.append(len(m.group(1)))
    if not levels:
        return markdown
    shift, out, fenced = to_level - min(levels), [], False
    for line in lines:
        fenced ^= line.startswith("```")
        if not fenced and (m := re.match(r"(#+) ", line)):
            line = "#" * min(6, len(m.group(1)) + shift) + line[len(m.group(1)):]
        out.append(line)
    return "\n".join(out)


def result_file(name: str | None, level: int = 3) -> str:
    """One file of benchmarks/results/ as Markdown (a .txt file as a text block), with its source."""
    if not name:
        raise ValueError("<!-- generated: results FILE -->: name a file of benchmarks/results/")
    path = RESULTS / name
    text = path.read_text(encoding="utf-8").strip()
    source = f"*Generated from `benchmarks/results/{name}` when this site was built.*"
    if path.suffix != ".md":
        return f"{source}\n\n```text\n{text}\n```"
    body = shift_headings(text, level)
    if not body.lstrip().startswith("#"):
        return f"{source}\n\n{body}"
    return f"{body}\n\n{source}"


CHECK_LINE = re.compile(r"^== (?P<name>[\w-]+): exit (?P<exit>\d+), (?P<wall>\d+) s: (?P<tail>.*)$")
DONE = re.compile(r"done: test accuracy (?P<acc>[\d.]+%) \((?P<counts>\d+/\d+)\) after (?P<epochs>\d+) epochs?, "
                  r"(?P<seconds>[\d.]+)s of training")


def gpu_check(name: str | None) -> str:
    """A GPU check log (benchmarks/gpu_check.sh: one `== run: exit N, S s: last lines` per run) as a table."""
    if not name:
        raise ValueError("<!-- generated: gpu-check FILE -->: name a file of benchmarks/results/")
    lines = (RESULTS / name).read_text(encoding="utf-8").splitlines()
    rows, notes = [], []
    for line in lines[1:]:
        if m := CHECK_LINE.match(line):
            done = DONE.search(m["tail"])
            result = (f"{done['acc']} ({done['counts']}) after {done['epochs']} epochs, {done['seconds']} s of training"
                      if done else "ran" if m["exit"] == "0" else "failed")
            rows.append(f"| `{m['name']}` | {m['exit']} | {m['wall']} | {result} |")
        elif line.strip() and not line.startswith("== done"):
            notes.append(line.strip())
    return "\n".join([f"{lines[0]}; {'; '.join(notes)}", "", "| run | exit status | wall s | result |",
                      "|---|---|---|---|", *rows, "",
                      f"*Generated from `benchmarks/results/{name}` when this site was built.*"])


def all_results(_: str | None = None, *, skip: frozenset[str] = frozenset()) -> str:
    """Every report in benchmarks/results/ (Markdown and text) not in `skip`, newest first, each under
    its own heading."""
    parts = []
    files = [p for p in RESULTS.iterdir() if p.suffix in (".md", ".txt") and p.name not in skip]
    for path in sorted(files, key=lambda p: (p.name[:10], p.name), reverse=True):
        parts += [f"### {path.name}", "", result_file(path.name, level=4), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- the model card


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def model_card(info: dict[str, Any] | None = None) -> str:
    """The shipped model's card, every figure read from its model.json."""
    info = info if info is not None else json.loads(MODEL_JSON.read_text())
    config, evaluation, environment = info["config"], info["evaluation"], info["environment"]
    assessment = info.get("assessment", {})
    recipe = ", ".join(f"`{key}` {value}" for key, value in config.items() if key not in ("dataset",))
    worst = min(evaluation["per_class"], key=lambda c: c["accuracy"])
    best = max(evaluation["per_class"], key=lambda c: c["accuracy"])
    lines = [
        "## What it is",
        "",
        f"The model that `mnist-cnn` uses when no `--model` is given and `./runs` holds no finished run "
        f"(`src/mnist_cnn/pretrained/`): the `{config['model']}` network ({info['parameters']:,} parameters; "
        f"the tutorial's CNN), trained with `{info['command']}` by `{info['made_by']}`.",
        "",
        "## Data",
        "",
        f"- Trained on the {config['dataset'].upper()} training set (the copy shipped in the package, checked by "
        "SHA-256); " + (f"{config['val_size']:,} of its images were held out for validation (temperature and "
                        "threshold)." if config.get("val_size") else "no validation split was held out."),
        f"- Tested on the {evaluation['total']:,} images of the {config['dataset'].upper()} test set, never used "
        "to choose the recipe.",
        "",
        "## Recipe",
        "",
        recipe,
        "",
        f"Trained on {environment['cpu']} ({environment['cpu_count']} CPUs, {environment['torch_threads']} "
        f"torch threads, device {environment['device']}), Python {environment['python']}, torch "
        f"{environment['torch']}, mnist-cnn {environment['mnist_cnn']}; "
        f"{info['train_seconds_total']:.0f} s of training on that shared machine.",
        "",
        "## Accuracy",
        "",
        "| measure | value |",
        "|---|---|",
        f"| test accuracy | **{_pct(evaluation['accuracy'])}** ({evaluation['correct']}/{evaluation['total']}) |",
        f"| test loss (cross-entropy, per image) | {evaluation['loss']:.4f} |",
        f"| weakest class | {worst['name']}: {_pct(worst['accuracy'])} ({worst['correct']}/{worst['support']}) |",
        f"| strongest class | {best['name']}: {_pct(best['accuracy'])} ({best['correct']}/{best['support']}) |",
    ]
    if "user_style_accuracy" in assessment:
        renderings = assessment.get("user_style", {})
        detail = "; ".join(f"{name} {_pct(value)}" for name, value in renderings.items())
        lines.append(f"| user-style accuracy (first {assessment['user_style_images']:,} test digits, "
                     f"rendered as users' files) | **{_pct(assessment['user_style_accuracy'])}** ({detail}) |")
    lines += ["", "Per class (test set):", "", "| class | support | correct | accuracy | precision | recall |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['support']} | {c['correct']} | {_pct(c['accuracy'])} | {_pct(c['precision'])} | "
              f"{_pct(c['recall'])} |" for c in evaluation["per_class"]]
    lines += ["", "## Calibration", ""]
    if "calibration" in info:
        calibration = info["calibration"]
        lines.append(f"Temperature {calibration['temperature']:.3f}, fitted on {calibration['validation_images']} "
                     f"validation images; test ECE {_pct(calibration['test_ece_before'])} → "
                     f"{_pct(calibration['test_ece_after'])}.")
    else:
        lines.append("No temperature: the model was trained without a validation split, so its probabilities are "
                     "the plain softmax, and `predict` answers \"unsure\" below the default threshold.")
    if "test_ece" in assessment:
        lines += ["", "| measure | value |", "|---|---|",
                  f"| expected calibration error on the test set ({assessment['ece_bins']} bins) | "
                  f"{_pct(assessment['test_ece'])} |",
                  f"| default \"unsure\" threshold (`predict --min-confidence`) | {assessment['min_confidence']} |",
                  f"| correct test answers at or above it | {_pct(assessment['correct_kept'])} |",
                  f"| wrong test answers below it (answered \"unsure\") | {_pct(assessment['wrong_caught'])} |",
                  f"| letters A–Z answered \"unsure\" | {assessment['letters_unsure']}/26 |"]
    lines += [
        "",
        "## What it is not for",
        "",
        "- **Not a detector of \"not a digit\".** It always answers one of the ten digits; a letter, a face or "
        "an empty-looking scribble gets a digit, often a confident one (the letters row above). The \"unsure\" "
        "threshold catches some doubtful digits, not everything else.",
        "- **Not for other scripts or symbols** (letters, other numerals, several digits in one image): one "
        "centred handwritten digit per image, as MNIST's are, after `mnist-cnn predict`'s preprocessing.",
        "- **Not for decisions that matter about people** (identity, handwriting forensics, grading): MNIST was "
        "written by American Census Bureau employees and high-school students in the early 1990s, and the "
        "test figures above say nothing about other writers, pens or scanners beyond the user-style renderings.",
        "- **Not the best this project trains**: `--preset best` reaches 99.73 % mean (with about four times this "
        "model's arithmetic); this one is small "
        "and fast so that the tests and a first `serve` work without training.",
        "",
        f"*Generated from `src/mnist_cnn/pretrained/model.json` when this site was built"
        + (f"; the user-style and calibration figures were measured on {assessment['measured']} by "
           f"`{assessment['measured_by']}`." if assessment else ".") + "*",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- include


def include(name: str | None) -> str:
    """A Markdown file of the repository as it is (its own title becomes the page's)."""
    if not name:
        raise ValueError("<!-- generated: include PATH -->: name a file of the repository")
    return (ROOT / name).read_text(encoding="utf-8")


GENERATORS: dict[str, Callable[[str | None], str]] = {
    "cli": cli_reference,
    "presets": presets,
    "api": api_reference,
    "results": result_file,
    "results-all": all_results,
    "gpu-check": gpu_check,
    "model-card": lambda _: model_card(),
    "include": include,
}


def render(markdown: str) -> str:
    """The page with every `<!-- generated: ... -->` marker replaced by what it asks for."""
    # the files a page shows on their own are left out of its `results-all`
    shown = frozenset(m.group(2) for m in MARKER.finditer(markdown) if m.group(1) in ("results", "gpu-check"))

    def replace(match: re.Match) -> str:
        kind, argument = match.group(1), match.group(2)
        if kind not in GENERATORS:
            raise ValueError(f"unknown generated content {kind!r}: one of {', '.join(GENERATORS)}")
        if kind == "results-all":
            return all_results(argument, skip=shown)
        return GENERATORS[kind](argument)

    return MARKER.sub(replace, markdown)


def on_config(config, **_):
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))  # the package, also where it is not installed
    return config


def on_page_markdown(markdown: str, **_) -> str:
    return render(markdown)
