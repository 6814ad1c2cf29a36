"""The `mnist-cnn` command: thin argparse front ends over the library's functions.

Heavy imports (torch) happen inside the handlers so that `mnist-cnn --help` answers at once.
Errors a user can fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from mnist_cnn import MnistCnnError, __version__
from mnist_cnn.config import DEVICES, LOSSES, PRECISIONS, PRESETS, SCHEDULES, TrainConfig

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to read more)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: Callable[[str], Any], name: str, check: Callable[[Any], bool]):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {name}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {name}")
        return value

    parse.__name__ = name
    return parse


positive_int = _number(int, "positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "positive number", lambda v: v > 0 and v != float("inf"))
non_negative_float = _number(float, "non-negative number", lambda v: 0 <= v < float("inf"))
fraction = _number(float, "fraction in [0, 1)", lambda v: 0 <= v < 1)

DEFAULTS = TrainConfig()


def _default(name: str) -> str:
    return f" (default: {getattr(DEFAULTS, name)})"


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (the tutorial's recipe by default)",
        description="Train a CNN on MNIST (or another MNIST-format data set). Defaults are the "
                    "tutorial's recipe; --preset fast reaches >= 99%% in seconds.")
    config = p.add_argument_group("recipe (defaults: the tutorial's; a --preset replaces them, "
                                  "explicit flags win)")
    config.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe: seed (the "
                        "defaults) or fast (>= 99%% test accuracy as quickly as we can)")
    config.add_argument("--model", help="model name from the registry" + _default("model"))
    config.add_argument("--dataset", help="mnist, fashion-mnist or custom" + _default("dataset"))
    config.add_argument("--epochs", type=positive_int, help="passes over the training set" + _default("epochs"))
    config.add_argument("--batch-size", type=positive_int, help="images per step" + _default("batch_size"))
    config.add_argument("--lr", type=positive_float, help="Adam learning rate (the peak with onecycle)" + _default("lr"))
    config.add_argument("--loss", choices=LOSSES, help="kl: KL(one-hot||prediction) summed over the "
                        "batch, as the tutorial; ce: mean cross-entropy" + _default("loss"))
    config.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule" + _default("schedule"))
    config.add_argument("--warmup", type=fraction, help="onecycle: fraction of steps warming up" + _default("warmup"))
    config.add_argument("--weight-decay", type=non_negative_float, help="decoupled weight decay" + _default("weight_decay"))
    config.add_argument("--label-smoothing", type=fraction, help="ce only" + _default("label_smoothing"))
    config.add_argument("--shift", type=non_negative_int, help="augment: random shifts of up to N pixels" + _default("shift"))
    config.add_argument("--seed", type=non_negative_int, help="seeds init, shuffling, dropout" + _default("seed"))
    config.add_argument("--eval-batch-size", type=positive_int, help="images per evaluation pass" + _default("eval_batch_size"))
    config.add_argument("--precision", choices=PRECISIONS, help="autocast precision; fp16 needs CUDA" + _default("precision"))
    where = p.add_argument_group("where")
    where.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto = cuda, mps, then cpu)")
    where.add_argument("--data-dir", help="folder with the four IDX files (raw or .gz, also "
                       "DIR/MNIST/raw/); default: $MNIST_CNN_DATA, the shipped copy, the cache, download")
    where.add_argument("--run-dir", help="run folder to create (default: runs/<timestamp>)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true",
                   help="skip the plots, galleries and report.html written at the end")
    p.set_defaults(handler=cmd_train)


RECIPE_FLAGS = ("preset", "model", "dataset", "epochs", "batch_size", "lr", "loss", "schedule",
                "warmup", "weight_decay", "label_smoothing", "shift", "seed", "eval_batch_size",
                "precision")


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_cnn.config import resolve_train_config
    from mnist_cnn.train import EXIT_INTERRUPTED, train

    given = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name) is not None}
    if args.resume:
        if given or args.run_dir:
            flags = ", ".join("--" + name.replace("_", "-") for name in [*given, *(["run_dir"] if args.run_dir else [])])
            raise MnistCnnError(f"--resume continues the saved recipe; drop {flags}")
        result = train(resume=args.resume, device=args.device, data_dir=args.data_dir,
                       progress=not args.no_progress, artifacts=not args.no_report)
    else:
        preset = given.pop("preset", None)
        config = resolve_train_config(preset, given)
        result = train(config, run_dir=args.run_dir, device=args.device, data_dir=args.data_dir,
                       progress=not args.no_progress, artifacts=not args.no_report)
    if not result.completed:
        return EXIT_INTERRUPTED
    if result.metrics:
        last = result.metrics[-1]
        total = sum(record["seconds"] for record in result.metrics)
        print(f"done: test accuracy {100 * last['test_accuracy']:.2f}% "
              f"({last['test_correct']}/{last['test_total']}) after {last['epoch']} "
              f"epoch{'s' if last['epoch'] != 1 else ''}, "
              f"{total:.1f}s of training; model in {result.run_dir}/model.safetensors")
        if not args.no_report:
            print(f"report: {result.run_dir}/report.html")
    return 0


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="exact accuracy, per-class figures, confusion matrix",
                              description="Evaluate a trained model on its data set's test split.")
    p.add_argument("model", metavar="RUN_DIR_OR_MODEL", help="a run folder, model.safetensors or checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
    p.add_argument("--dataset", help="evaluate on another data set (default: the model's)")
    p.add_argument("--data-dir", help="folder with the IDX files (default: as for train)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    p.add_argument("--batch-size", type=positive_int, default=1000, help="(default: 1000)")
    p.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_cnn.data import get_spec
    from mnist_cnn.evaluate import evaluate_model, format_report

    report = evaluate_model(args.model, data_dir=args.data_dir, dataset=args.dataset,
                            split=args.split, device=args.device, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(report))
    else:
        title = f"{args.model} on {get_spec(report['dataset']).title} {report['split']} split"
        print(format_report(report, title=title))
    return 0


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="predict the digit in your own images",
        description="Predict the digit in each image (PNG, JPEG, BMP, GIF, WebP, TIFF; folders are "
                    "expanded). Images are normalised as MNIST's digits were: inverted if dark on "
                    "light, cropped, fitted into 20x20, centred by centre of mass in 28x28. "
                    "Exit status: 0 all predicted, 1 some image failed, 2 usage error.")
    p.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL",
                   help="a run folder, model.safetensors, checkpoint.pt (or .onnx with --backend onnxruntime)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--top", type=positive_int, default=1, metavar="K", help="show the K most likely classes (default: 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--save-preprocessed", metavar="DIR", help="write the 28x28 image the model saw to DIR")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch", help="(default: torch)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from mnist_cnn.predict import make_predictor, predict_files

    predictor = make_predictor(args.model, backend=args.backend, device=args.device)
    results = predict_files(predictor, args.images, save_preprocessed=args.save_preprocessed)
    for result in results:
        if args.json:
            print(json.dumps(result.to_json(max(args.top, 3))), flush=True)
        else:
            print(result.to_text(args.top), file=sys.stderr if result.error else sys.stdout, flush=True)
    return 1 if any(result.error for result in results) else 0


def _data_flags(p) -> None:
    p.add_argument("--dataset", help="use another data set's test split (default: the model's)")
    p.add_argument("--data-dir", help="folder with the IDX files (default: as for train)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")


def add_show_parser(subparsers) -> None:
    p = subparsers.add_parser("show", help="a grid of test images with true and predicted labels",
                              description="Draw test images with their true and predicted labels; "
                                          "mistakes are framed in red.")
    p.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL")
    p.add_argument("--misclassified", action="store_true", help="only the mistakes, most confident first")
    p.add_argument("--count", type=positive_int, default=36, metavar="N", help="images to draw (default: 36)")
    p.add_argument("--output", metavar="FILE.png",
                   help="(default: samples.png or misclassified.png beside the model)")
    _data_flags(p)
    p.set_defaults(handler=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    from mnist_cnn.report import show

    path, count = show(args.model, misclassified=args.misclassified, count=args.count,
                       output=args.output, device=args.device, data_dir=args.data_dir,
                       dataset=args.dataset)
    print(f"wrote {path} ({count} images)")
    return 0


def _run_flags(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", help="folder with the IDX files (default: the run's)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")


def add_plot_parser(subparsers) -> None:
    p = subparsers.add_parser("plot", help="learning curves, confusion matrix, per-class accuracy (PNG)",
                              description="(Re)draw a run's plots into its folder.")
    _run_flags(p)
    p.set_defaults(handler=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from mnist_cnn.report import plot_run

    for path in plot_run(args.run_dir, device=args.device, data_dir=args.data_dir):
        print(f"wrote {path}")
    return 0


def add_report_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="one self-contained HTML report of a run",
                              description="Write RUN_DIR/report.html: config, final metrics, plots "
                                          "and the misclassified gallery, images embedded.")
    _run_flags(p)
    p.add_argument("--output", metavar="FILE.html", help="(default: RUN_DIR/report.html)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from mnist_cnn.report import report_run

    print(f"wrote {report_run(args.run_dir, output=args.output, device=args.device, data_dir=args.data_dir)}")
    return 0


def add_summary_parser(subparsers) -> None:
    p = subparsers.add_parser("summary", help="the layer table: kernels, channels, output shapes, parameters",
                              description="Print each layer's kernel, channels, stride, padding, output "
                                          "shape and parameters, measured on the model itself.")
    p.add_argument("--model", default="seed", metavar="NAME_OR_RUN",
                   help="a registered model name or a trained model (default: seed)")
    p.set_defaults(handler=cmd_summary)


def cmd_summary(args: argparse.Namespace) -> int:
    from mnist_cnn.explain import summary

    print(summary(args.model))
    return 0


def add_explain_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="input, feature maps and saliency for one image",
                              description="Draw what the model sees: the preprocessed input, the "
                                          "feature maps after each convolution, and a saliency map "
                                          "for the predicted class.")
    p.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("image", nargs="?", metavar="IMAGE")
    source.add_argument("--test-index", type=non_negative_int, metavar="N", help="explain test image N instead")
    p.add_argument("--output", metavar="FILE.png", help="(default: IMAGE-explain.png in the current folder)")
    p.add_argument("--data-dir", help="folder with the IDX files (for --test-index)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    p.set_defaults(handler=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from mnist_cnn.explain import explain

    path, explanation = explain(args.model, image=args.image, test_index=args.test_index,
                                output=args.output, device=args.device, data_dir=args.data_dir)
    print(f"predicted {explanation.predicted} "
          f"({100 * explanation.probabilities[explanation.predicted]:.2f}%); wrote {path}")
    return 0


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export to ONNX or TorchScript for serving",
        description="Export a trained model. The exported model takes float32 images (N, 1, 28, 28) "
                    "in [0, 1] (MNIST-normalised, white on black) with a dynamic batch size N and "
                    "returns (N, 10) probabilities.")
    p.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: onnx)")
    p.add_argument("--output", metavar="PATH",
                   help="(default: model.onnx or model.torchscript.pt beside the model)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from mnist_cnn.export import export_model

    path = export_model(args.model, format=args.format, output=args.output)
    print(f"wrote {path}")
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
    add_plot_parser(subparsers)
    add_report_parser(subparsers)
    add_summary_parser(subparsers)
    add_explain_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except MnistCnnError as error:
        print(f"mnist-cnn {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mnist-cnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as error:  # disk full, permissions: the machine's problem, said in one line
        detail = f"{error.strerror}: {error.filename}" if error.filename else str(error)
        print(f"mnist-cnn {args.command}: error: {detail}", file=sys.stderr)
        return 1
