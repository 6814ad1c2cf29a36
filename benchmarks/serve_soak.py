"""Soak test of `mnist-cnn serve`: a steady open-loop rate of what the page sends, for minutes,
with the server's memory (resident set of all its processes) and latency recorded minute by
minute, so a leak or a slow drift shows as a slope.

    .venv/bin/python benchmarks/serve_soak.py [--rate 300] [--minutes 10] [--backend onnxruntime]
                                              [--workers 2]

Writes benchmarks/results/<date>-serve-soak.md (and .json) with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import (DISTINCT_IMAGES, RESULTS, cpu_name, page_png, run_open_loop,  # noqa: E402
                        start_server)
from tables import table  # noqa: E402

from mnist_cnn.data import load_dataset  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (serve --workers forks), in MB."""
    pids = [pid] + [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                    if _parent(p) == pid]
    total = 0
    for current in pids:
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _parent(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s (default: 300)")
    parser.add_argument("--minutes", type=int, default=10, help="(default: 10)")
    parser.add_argument("--backend", default="onnxruntime", help="(default: onnxruntime)")
    parser.add_argument("--workers", type=int, default=2, help="serve --workers N (default: 2)")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `mnist-cnn serve` (repeatable), e.g. --serve-arg=--max-queue=64")
    parser.add_argument("--output", help="results file stem (default: benchmarks/results/<date>-serve-soak)")
    args = parser.parse_args(argv)

    from mnist_cnn.checkpoints import model_or_default

    test = load_dataset("mnist", splits=("test",))["test"]
    digits, truth = test.images[:DISTINCT_IMAGES, 0].numpy(), test.labels[:DISTINCT_IMAGES].tolist()
    bodies = [page_png(d) for d in digits]
    rows, minutes = [], []
    with tempfile.TemporaryDirectory() as workdir:
        source = Path(model_or_default(None))
        model = Path(workdir) / source.resolve().name
        shutil.copytree(source, model, ignore=shutil.ignore_patterns("*.png", "*.html", "checkpoint.pt"))
        if args.backend == "onnxruntime":
            from mnist_cnn.export import export_model

            export_model(model, format="onnx")
        process, host, port = start_server(model, args.backend, args.workers, tuple(args.serve_arg))
        try:
            run_open_loop(host, port, bodies, truth, rate=50, seconds=2)  # warm-up
            start_rss = tree_rss_mb(process.pid)
            for minute in range(1, args.minutes + 1):
                result = run_open_loop(host, port, bodies, truth, rate=args.rate, seconds=60)
                result["rss_mb"] = tree_rss_mb(process.pid)
                result["minute"] = minute
                minutes.append(result)
                rows.append([str(minute), f"{result['throughput']:.0f}", f"{result['p50_ms']:.1f}",
                             f"{result['p99_ms']:.1f}", f"{result['max_ms']:.0f}", str(result["errors"]),
                             f"{result['rss_mb']:.0f}"])
                print(f"minute {minute}: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                      f"{result['errors']} errors {result['error_kinds']}, "
                      f"{result['stale_connection_retries']} stale connections retried, "
                      f"server RSS {result['rss_mb']:.0f} MB", flush=True)
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=30)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
               "server and load generator on the same machine")
    first, last = minutes[0]["rss_mb"], minutes[-1]["rss_mb"]
    errors = sum(m["errors"] for m in minutes)
    markdown = "\n".join([
        f"# mnist-cnn serve, soak, {date}", "",
        f"Machine: {machine}. Server: `mnist-cnn serve --backend {args.backend} --workers {args.workers}"
        f"{''.join(' ' + a for a in args.serve_arg)}`, "
        f"the shipped model. Open loop at {args.rate:g} requests/s of what the page sends "
        f"(POST /api/predict?preprocessed=1, a drawn digit as a PNG) for {args.minutes} minutes.", "",
        table(["minute", "answered /s", "p50 ms", "p99 ms", "max ms", "errors", "server RSS MB"], rows), "",
        f"Server RSS after warm-up {start_rss:.0f} MB, after minute 1 {first:.0f} MB, after minute "
        f"{args.minutes} {last:.0f} MB ({last - first:+.0f} MB); {errors} errors in "
        f"{sum(m['requests'] for m in minutes):,} requests.", ""])
    print(markdown)
    stem = Path(args.output) if args.output else RESULTS / f"{date}-serve-soak"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "machine": machine, "rate": args.rate,
                                                     "backend": args.backend, "workers": args.workers,
                                                     "rss_after_warmup_mb": start_rss, "minutes": minutes},
                                                    indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
