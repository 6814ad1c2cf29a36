"""The `mnist-cnn` command: thin argparse front ends over the library's functions.

Heavy imports (torch) happen inside the handlers so that `mnist-cnn --help` answers at once.
Errors a user can fix print one line on stderr and exit with status 2 (the statuses are
defined in mnist_cnn.exits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING
from typing import Any, Callable, Sequence

from mnist_cnn import MnistCnnError, __version__, config, exits
from mnist_cnn.config import (
    BACKENDS,
    DEVICES,
    FINITE,
    PRESETS,
    Check,
    flag_name,
    recipe_fields,
)

MODEL_HELP = ("a run folder, model.safetensors, checkpoint.pt, or a state_dict saved from the "
              "tutorial's CNN_MNIST (default: the newest finished run under ./runs, else the "
              "model shipped with mnist-cnn)")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to read more)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exits.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def value_parser(kind: Callable[[str], Any], check: Check | None) -> Callable[[str], Any]:
    """An argparse `type` that converts with `kind` and applies the config field's check."""
    description = check.description if check else kind.__name__

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {description}") from None
        if kind is float and not -FINITE < value < FINITE or check is not None and not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {description}")
        return value

    parse.__name__ = description
    return parse


POSITIVE_INT = value_parser(int, config.POSITIVE_INT)
NON_NEGATIVE_INT = value_parser(int, config.NON_NEGATIVE_INT)


def add_recipe_flags(group, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field, with its help, check and choices from the field.
    Flags default to None ("not given") so a preset can fill what the user left out."""
    for spec in (spec for spec in recipe_fields() if spec.name not in skip):
        kind = {"int": int, "float": float}.get(str(spec.type), str)
        choices = spec.metadata.get("choices")
        default = "" if spec.default is MISSING else f" (default: {spec.default})"
        group.add_argument(flag_name(spec.name), dest=spec.name,
                           type=value_parser(kind, spec.metadata.get("check")) if kind is not str else None,
                           choices=choices if isinstance(choices, tuple) else None,
                           help=spec.metadata["help"].replace("%", "%%") + default)


def add_where_flags(p, *, dataset: bool = True, data_dir: bool = True, device: bool = True,
                    dataset_help: str = "evaluate on another data set's test split (default: the model's)") -> None:
    """--dataset / --data-dir / --device, the same on every command."""
    if dataset:
        p.add_argument("--dataset", help=dataset_help)
    if data_dir:
        p.add_argument("--data-dir", help="folder with the IDX files (raw or .gz, also DIR/<Name>/raw/); "
                       "default: the model's own, $MNIST_CNN_DATA, the shipped copy, the cache, download")
    if device:
        p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto = cuda, mps, then cpu)")


def add_model_flag(p, *, several: bool = False) -> None:
    p.add_argument("--model", metavar="RUN_DIR_OR_MODEL", action="append" if several else "store",
                   help=MODEL_HELP + ("; give several to use them as an ensemble" if several else ""))


# Where a command starts, its handler turns --device and --model into a device and a model
# path, once (these two helpers), and passes them down; nothing below re-resolves them.


def chosen_device(name: str):
    """--device as a torch.device (auto: cuda, mps, then cpu); an unavailable one is an error."""
    from mnist_cnn.runtime import resolve_device

    return resolve_device(name)


def chosen_model(value: str | None) -> str:
    """--model, or the default: the newest finished run under ./runs, else the shipped model."""
    from mnist_cnn.checkpoints import model_or_default

    return str(model_or_default(value))


def chosen_models(values: list[str] | None) -> list[str]:
    """Each --model given, or the default one."""
    return [chosen_model(value) for value in values] if values else [chosen_model(None)]


# ---------------------------------------------------------------- train


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (the tutorial's recipe by default)",
        description="Train a CNN on MNIST (or another MNIST-format data set). Defaults are the "
                    "tutorial's recipe; --preset fast reaches >= 99% in seconds.")
    recipe = p.add_argument_group("recipe (defaults: the tutorial's; a --preset replaces them, "
                                  "explicit flags win)")
    recipe.add_argument("--preset", choices=sorted(PRESETS),
                        help="a named recipe: " + ", ".join(sorted(PRESETS)))
    add_recipe_flags(recipe)
    where = p.add_argument_group("where")
    add_where_flags(where, dataset=False)
    where.add_argument("--run-dir", help="run folder to create (default: runs/<timestamp>)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    where.add_argument("--nproc", type=POSITIVE_INT, metavar="P",
                       help="train with P processes on this machine (data-parallel, launched with "
                            "torchrun --standalone); --batch-size stays the global batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true",
                   help="skip the plots, galleries and report.html written after training")
    p.set_defaults(handler=cmd_train)


def recipe_values(args: argparse.Namespace) -> dict[str, Any]:
    names = ["preset", *(spec.name for spec in recipe_fields())]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The `train` command line each process of `--nproc` runs: the same flags, less --nproc."""
    argv = ["train"]
    for name, value in recipe_values(args).items():
        argv += [flag_name(name), str(value)]
    for name in ("device", "data_dir", "run_dir", "resume"):
        if getattr(args, name) is not None:
            argv += [flag_name(name), str(getattr(args, name))]
    return argv + [flag for flag, on in (("--no-progress", args.no_progress),
                                         ("--no-report", args.no_report)) if on]


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_cnn.config import resolve_train_config
    from mnist_cnn.train import resume, train

    given = recipe_values(args)
    if args.nproc:
        from mnist_cnn.distributed import launch

        return launch(args.nproc, worker_argv(args))
    options = dict(device=args.device, data_dir=args.data_dir, progress=not args.no_progress)
    if args.resume:
        if given or args.run_dir:
            flags = ", ".join(flag_name(name) for name in [*given, *(["run_dir"] if args.run_dir else [])])
            raise MnistCnnError(f"--resume continues the saved recipe; drop {flags}")
        result = resume(args.resume, **options)
    else:
        preset = given.pop("preset", None)
        result = train(resolve_train_config(preset, given), run_dir=args.run_dir, **options)
    if not result.completed:
        return exits.INTERRUPTED
    if not result.main:  # under torchrun rank 0 alone prints and reports
        return exits.OK
    if result.metrics:
        last = result.metrics[-1]
        total = sum(record["seconds"] for record in result.metrics)
        print(f"done: test accuracy {100 * last['test_accuracy']:.2f}% "
              f"({last['test_correct']}/{last['test_total']}) after {last['epoch']} "
              f"epoch{'s' if last['epoch'] != 1 else ''}, "
              f"{total:.1f}s of training; model in {result.run_dir}/model.safetensors", flush=True)
    if not args.no_report:
        from mnist_cnn.report import report_run

        print(f"report: {report_run(result.run_dir, device=result.device, data_dir=args.data_dir)}")
    return exits.OK


# ---------------------------------------------------------------- evaluate, predict, show


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="exact accuracy, per-class figures, confusion matrix",
                              description="Evaluate a trained model (or an ensemble of several) on "
                                          "its data set's test split.")
    p.add_argument("source", nargs="?", metavar="RUN_DIR_OR_MODEL", help=MODEL_HELP)
    add_model_flag(p, several=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
    add_where_flags(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1000, help="(default: 1000)")
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_cnn.catalog import get_spec
    from mnist_cnn.evaluate import evaluate_saved, format_report

    sources = chosen_models(([args.source] if args.source else []) + (args.model or []) or None)
    options = dict(data_dir=args.data_dir, dataset=args.dataset, split=args.split,
                   device=chosen_device(args.device), batch_size=args.batch_size)
    if len(sources) > 1:
        from mnist_cnn.evaluate import evaluate_ensemble, format_ensemble

        report = evaluate_ensemble(sources, **options)
        print(json.dumps(report) if args.json else format_ensemble(report))
        return exits.OK
    report = evaluate_saved(sources[0], **options)
    if args.json:
        print(json.dumps(report))
    else:
        title = f"{sources[0]} on {get_spec(report['dataset']).title} {report['split']} split"
        print(format_report(report, title=title))
    return exits.OK


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="predict the digit in your own images",
        description="Predict the digit in each image (PNG, JPEG, BMP, GIF, WebP, TIFF; folders are "
                    "expanded; - reads one image from standard input). Images are normalised as "
                    "MNIST's digits were: inverted if dark on light, cropped, fitted into 20x20, "
                    "centred by centre of mass in 28x28. "
                    f"Exit status: {exits.OK} all predicted, {exits.FAILED} some image failed, "
                    f"{exits.USAGE} usage error.")
    add_model_flag(p, several=True)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--top", type=POSITIVE_INT, default=1, metavar="K", help="show the K most likely classes (default: 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--save-preprocessed", metavar="DIR", help="write the 28x28 image the model saw to DIR")
    p.add_argument("--number", action="store_true",
                   help="read every digit in each image, left to right, as one number "
                        "(docs/reading-numbers.md); --json adds text and digits with their boxes")
    p.add_argument("--min-confidence", type=value_parser(float, Check("probability in [0, 1]", lambda v: 0 <= v <= 1)),
                   metavar="P", help="answer 'unsure' when the top probability is below P (default: the "
                   "model's own threshold, fitted on its validation split so that 99%% of correct answers "
                   "pass; 0.5 for models trained without --val-size; 0 turns it off)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch, or onnxruntime on the model.onnx made by mnist-cnn export "
                        "(no torch import at all) (default: torch)")
    add_where_flags(p, dataset=False, data_dir=False)
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from mnist_cnn.predict import make_predictor, predict_files

    device = chosen_device(args.device) if args.backend == "torch" else "cpu"  # onnxruntime: no torch
    predictor = make_predictor(chosen_models(args.model), backend=args.backend, device=device)
    if args.number:
        return print_numbers(predictor, args)
    results = predict_files(predictor, args.images, save_preprocessed=args.save_preprocessed,
                            min_confidence=args.min_confidence)
    for result in results:
        if args.json:
            print(json.dumps(result.to_json(max(args.top, 3))), flush=True)
        else:
            print(result.to_text(args.top), file=sys.stderr if result.error else sys.stdout, flush=True)
    return exits.FAILED if any(result.error for result in results) else exits.OK


def print_numbers(predictor, args: argparse.Namespace) -> int:
    """predict --number: one line (or JSON object) per image."""
    from mnist_cnn.number import read_number_files

    if args.save_preprocessed or args.top != 1:
        raise MnistCnnError("--number cannot be combined with --save-preprocessed or --top")
    readings = read_number_files(predictor, args.images, min_confidence=args.min_confidence)
    for reading in readings:
        if args.json:
            print(json.dumps(reading.to_json()), flush=True)
        else:
            print(reading.to_text(), file=sys.stderr if reading.error else sys.stdout, flush=True)
    return exits.FAILED if any(reading.error for reading in readings) else exits.OK


def add_show_parser(subparsers) -> None:
    p = subparsers.add_parser("show", help="a grid of test images with true and predicted labels",
                              description="Draw test images with their true and predicted labels; "
                                          "mistakes are framed in red.")
    add_model_flag(p)
    p.add_argument("--misclassified", action="store_true", help="only the mistakes, most confident first")
    p.add_argument("--count", type=POSITIVE_INT, default=36, metavar="N", help="images to draw (default: 36)")
    p.add_argument("--output", metavar="FILE.png",
                   help="(default: samples.png or misclassified.png beside the model)")
    add_where_flags(p)
    p.set_defaults(handler=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from mnist_cnn.report import show

    path, count = show(chosen_model(args.model), misclassified=args.misclassified, count=args.count,
                       output=args.output, device=chosen_device(args.device), data_dir=args.data_dir,
                       dataset=args.dataset)
    print(f"wrote {path} ({count} images)")
    return exits.OK


# ---------------------------------------------------------------- pictures of a run


def add_run_parser(subparsers, name: str, *, help: str, description: str, handler) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("run_dir", metavar="RUN_DIR")
    add_where_flags(p, dataset=False)
    p.set_defaults(handler=handler)
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    from mnist_cnn.report import plot_run

    for path in plot_run(args.run_dir, device=chosen_device(args.device), data_dir=args.data_dir):
        print(f"wrote {path}")
    return exits.OK


def cmd_report(args: argparse.Namespace) -> int:
    from mnist_cnn.report import report_run

    path = report_run(args.run_dir, output=args.output, device=chosen_device(args.device), data_dir=args.data_dir)
    print(f"wrote {path}")
    return exits.OK


def add_summary_parser(subparsers) -> None:
    p = subparsers.add_parser("summary", help="the layer table: kernels, channels, output shapes, parameters",
                              description="Print each layer's kernel, channels, stride, padding, output "
                                          "shape and parameters, measured on the model itself.")
    p.add_argument("--model", default="seed", metavar="NAME_OR_RUN",
                   help="a registered model name or a trained model (default: seed)")
    p.add_argument("--list", action="store_true", help="list the registered model names")
    p.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    if args.list:
        from mnist_cnn.model import MODELS

        print("\n".join(MODELS))
        return exits.OK
    from mnist_cnn.explain import summary

    print(summary(args.model))
    return exits.OK


def add_explain_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="input, feature maps and saliency for one image",
                              description="Draw what the model sees: the preprocessed input, the "
                                          "feature maps after each convolution, and a saliency map "
                                          "for the predicted class.")
    add_model_flag(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("image", nargs="?", metavar="IMAGE")
    source.add_argument("--test-index", type=NON_NEGATIVE_INT, metavar="N", help="explain test image N instead")
    p.add_argument("--output", metavar="FILE.png", help="(default: IMAGE-explain.png in the current folder)")
    add_where_flags(p, dataset=False)
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from mnist_cnn.explain import explain

    path, explanation = explain(chosen_model(args.model), image=args.image, test_index=args.test_index,
                                output=args.output, device=chosen_device(args.device), data_dir=args.data_dir)
    print(f"predicted {explanation.predicted} "
          f"({100 * explanation.probabilities[explanation.predicted]:.2f}%); wrote {path}")
    return exits.OK


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export to ONNX or TorchScript for serving",
        description="Export a trained model. The exported model takes float32 images (N, 1, 28, 28) "
                    "in [0, 1] (MNIST-normalised, white on black) with a dynamic batch size N and "
                    "returns (N, 10) probabilities.")
    add_model_flag(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: onnx)")
    p.add_argument("--output", metavar="PATH",
                   help="(default: model.onnx or model.torchscript.pt beside the model)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from mnist_cnn.export import export_model

    print(f"wrote {export_model(chosen_model(args.model), format=args.format, output=args.output)}")
    return exits.OK


# ---------------------------------------------------------------- sweep


def add_sweep_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="search recipes on the validation split with Optuna (one machine or many)",
        description="Search training recipes with Optuna: each trial is a run folder "
                    "<sweep-dir>/<study>/trials/<number>/, scored on the validation split only. "
                    "Running the same command again continues the study. See docs/sweeps.md.")
    search = p.add_argument_group("search")
    search.add_argument("--space", action="append", default=[], metavar="FIELD=SPEC",
                        help="a searched train field: log:A..B (log-uniform), A..B (uniform), "
                             "int:A..B, choice:A,B,C; repeat for several fields")
    search.add_argument("--space-file", metavar="FILE.toml",
                        help='FIELD = "SPEC" lines (TOML, or YAML for .yaml/.yml), at the top or under [space]')
    search.add_argument("--objective", default="val_accuracy",
                        help="val_accuracy (the last epoch's, maximised) or time_to:ACC (seconds of "
                             "training until the validation accuracy first reaches ACC, minimised) "
                             "(default: val_accuracy)")
    search.add_argument("--trials", type=POSITIVE_INT, default=20, metavar="N",
                        help="finished trials the study should hold; trials already done count (default: 20)")
    search.add_argument("--timeout", type=value_parser(float, config.POSITIVE_NUMBER), metavar="SECONDS",
                        help="start no new trial after this long (default: none)")
    search.add_argument("--workers", type=POSITIVE_INT, default=1, metavar="K",
                        help="K processes on this machine sharing the study (default: 1)")
    search.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                        help="stop poor trials early from their per-epoch validation figures (default: median)")
    search.add_argument("--seed", type=NON_NEGATIVE_INT,
                        help="the sampler's seed, from which each worker and each continuation draws its "
                             "own stream (default: random); trials train with the recipe's own seed")
    study = p.add_argument_group("study")
    study.add_argument("--study", default="default", metavar="NAME", help="(default: default)")
    study.add_argument("--storage", metavar="URL",
                       help="an SQLAlchemy URL Optuna accepts (postgresql://user:pass@host/db for several "
                            "machines), or journal:PATH for a journal file on a shared file system "
                            "(default: sqlite:///<sweep-dir>/<study>/study.db)")
    study.add_argument("--sweep-dir", default="sweeps", metavar="DIR",
                       help="where the trials' run folders and the summary go (default: sweeps)")
    study.add_argument("--heartbeat", type=POSITIVE_INT, default=10, metavar="SECONDS",
                       help="a running trial's sign of life (database storages): one silent for 3 "
                            "beats is failed and run again (default: 10)")
    study.add_argument("--summary", action="store_true",
                       help="only rewrite summary.json, trials.md, history.png and importance.png")
    recipe = p.add_argument_group("fixed recipe (as for train: every trial uses these values; "
                                  "--val-size is 5000 when the recipe holds out none)")
    recipe.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe to start from")
    add_recipe_flags(recipe, skip=("seed",))
    add_where_flags(p, dataset=False)
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnist_cnn import sweep

    options = sweep.SweepOptions(study=args.study, storage=args.storage, sweep_dir=Path(args.sweep_dir),
                                 heartbeat=args.heartbeat, device=args.device, data_dir=args.data_dir)
    if args.summary:
        document = sweep.write_summary(options)
    else:
        given = recipe_values(args)
        preset = given.pop("preset", None)
        given.pop("seed", None)  # the sampler's here, not the recipe's
        space = sweep.build_space(args.space, args.space_file)
        options.space, options.config = space, sweep.base_config(preset, given, space)
        options.objective = sweep.parse_objective(args.objective)
        options.trials, options.timeout, options.workers = args.trials, args.timeout, args.workers
        options.pruner, options.seed = args.pruner, args.seed
        document = sweep.run_sweep(options)
    best = ("no complete trial yet" if document["best_trial"] is None else
            f"best trial {document['best_trial']} ({document['objective']} {document['best_value']:.6g}) "
            f"in {document['best_run']}")
    print(f"study {document['study']}: {document['n_complete']} complete, {document['n_pruned']} pruned, "
          f"{document['n_failed']} failed; {best}; summary in {options.folder}")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="mnist-cnn", description="Train, evaluate and use the classic MNIST CNN.")
    parser.add_argument("--version", action="version", version=f"mnist-cnn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_predict_parser(subparsers)
    add_show_parser(subparsers)
    add_run_parser(subparsers, "plot", help="learning curves, confusion matrix, per-class accuracy (PNG)",
                   description="(Re)draw a run's plots into its folder.", handler=cmd_plot)
    add_run_parser(subparsers, "report", help="one self-contained HTML report of a run (and its pictures)",
                   description="Write RUN_DIR/report.html (config, final metrics, plots, the "
                               "misclassified gallery, images embedded) with the plots, summary.txt "
                               "and explain.png.", handler=cmd_report,
                   ).add_argument("--output", metavar="FILE.html", help="(default: RUN_DIR/report.html)")
    add_summary_parser(subparsers)
    add_explain_parser(subparsers)
    add_export_parser(subparsers)
    add_sweep_parser(subparsers)
    from mnist_cnn.serve.command import add_serve_parser  # flags only: nothing heavy imported

    add_serve_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # torch's C++ logging writes warnings and errors of its own to stderr (c10d's socket
    # retries with stack traces, "hostname cannot be retrieved" where the host name does not
    # resolve), before our one-line error that already says what failed. Read when torch is
    # imported, so set here, before any handler imports it; a value the user set wins.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MnistCnnError as error:
        print(f"mnist-cnn {args.command}: error: {error}", file=sys.stderr)
        return exits.USAGE
    except KeyboardInterrupt:
        print(f"mnist-cnn {args.command}: interrupted", file=sys.stderr)
        return exits.INTERRUPTED
    except BrokenPipeError:
        return exits.OK
    except OSError as error:  # disk full, permissions: the machine's problem, said in one line
        detail = f"{error.strerror}: {error.filename}" if error.filename else str(error)
        print(f"mnist-cnn {args.command}: error: {detail}", file=sys.stderr)
        return exits.FAILED
