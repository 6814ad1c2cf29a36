"""Load benchmark of `mnist-cnn serve`: 16 concurrent clients send 2,000 user-style PNGs to
POST /api/predict on 127.0.0.1, once per backend (torch, onnxruntime).

    .venv/bin/python benchmarks/serve_load.py [--model RUN_DIR] [--requests 2000] [--clients 16]

Each client keeps one HTTP/1.1 connection open and sends the next request when the previous
answer has arrived (a closed loop, as the page does). The images are MNIST test digits drawn
as the page sends them: black ink on a 280x280 white PNG. The clients run on the same machine
as the server and share its CPUs. Prints a Markdown table and writes it, with the machine and
the date, to benchmarks/results/<date>-serve-load.md (and .json).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from tables import table  # noqa: E402

from mnist_cnn.data import load_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("torch", "onnxruntime")
DISTINCT_IMAGES = 200


def page_png(digit: np.ndarray) -> bytes:
    """A digit as the page sends it: black ink on a 280x280 white page, drawn about 200 px tall."""
    ink = Image.fromarray(255 - digit).resize((200, 200), Image.Resampling.BILINEAR)
    page = Image.new("L", (280, 280), 255)
    page.paste(ink, (40, 40))
    buffer = io.BytesIO()
    page.convert("RGBA").save(buffer, format="PNG")  # canvas.toBlob gives RGBA PNGs
    return buffer.getvalue()


def start_server(model: Path, backend: str) -> tuple[subprocess.Popen, str, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", "--model", str(model), "--port", "0",
         "--backend", backend, "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        match = re.search(r"serving on http://([\d.]+):(\d+)/", line)
        if match:
            return process, match.group(1), int(match.group(2))
    raise SystemExit(f"serve did not start:\n{process.stderr.read()}")


def load(host: str, port: int, images: list[bytes], labels: list[int], *, requests: int,
         clients: int) -> dict:
    """`clients` threads, each one keep-alive connection, `requests` in all."""
    latencies = np.zeros(requests)
    outcome = [None] * requests  # True correct, False wrong label, or an error string
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                break
            image = index % len(images)
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/predict", body=images[image],
                                   headers={"content-type": "image/png"})
                response = connection.getresponse()
                body = response.read()
                latencies[index] = time.perf_counter() - started
                outcome[index] = (json.loads(body)["label"] == labels[image] if response.status == 200
                                  else f"HTTP {response.status}")
            except (OSError, http.client.HTTPException, ValueError) as error:
                latencies[index] = time.perf_counter() - started
                outcome[index] = type(error).__name__
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    errors = [o for o in outcome if not isinstance(o, bool)]
    milliseconds = latencies * 1e3
    return {
        "requests": requests, "clients": clients, "seconds": wall,
        "throughput": requests / wall,
        "p50_ms": float(np.percentile(milliseconds, 50)), "p95_ms": float(np.percentile(milliseconds, 95)),
        "p99_ms": float(np.percentile(milliseconds, 99)), "max_ms": float(milliseconds.max()),
        "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
        "accuracy": sum(o is True for o in outcome) / max(1, requests - len(errors)),
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", text).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="run folder (default: the newest finished run, else the shipped model)")
    parser.add_argument("--requests", type=int, default=2000, help="(default: 2000)")
    parser.add_argument("--clients", type=int, default=16, help="(default: 16)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="(default: torch,onnxruntime)")
    parser.add_argument("--output", help="results file stem (default: benchmarks/results/<date>-serve-load)")
    args = parser.parse_args(argv)

    if args.model is None:
        from mnist_cnn.checkpoints import model_or_default

        args.model = str(model_or_default(None))
    test = load_dataset("mnist", splits=("test",))["test"]
    digits, truth = test.images[:DISTINCT_IMAGES, 0].numpy(), test.labels[:DISTINCT_IMAGES].tolist()
    images = [page_png(d) for d in digits]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        model = Path(workdir) / Path(args.model).resolve().name
        shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("*.png", "*.html", "checkpoint.pt"))
        for backend in args.backends.split(","):
            if backend == "onnxruntime" and not (model / "model.onnx").is_file():
                from mnist_cnn.export import export_model

                export_model(model, format="onnx")
            process, host, port = start_server(model, backend)
            try:
                load(host, port, images, truth, requests=100, clients=args.clients)  # warm-up
                before, clients_before = cpu_seconds(process.pid), time.process_time()
                result = load(host, port, images, truth, requests=args.requests, clients=args.clients)
                after, clients_after = cpu_seconds(process.pid), time.process_time()
                result["server_cpu_ms_per_request"] = (None if before is None or after is None
                                                       else 1e3 * (after - before) / args.requests)
                # The clients are this process' threads: their CPU competes with the server's.
                result["client_cpu_ms_per_request"] = 1e3 * (clients_after - clients_before) / args.requests
                result["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            finally:
                process.send_signal(signal.SIGINT)
                process.communicate(timeout=30)
            figures[backend] = result
            rows.append([backend, f"{result['throughput']:.0f}", f"{result['p50_ms']:.1f}",
                         f"{result['p95_ms']:.1f}", f"{result['p99_ms']:.1f}", f"{result['max_ms']:.1f}",
                         f"{result['errors']}", f"{100 * result['accuracy']:.1f} %",
                         "–" if result["server_cpu_ms_per_request"] is None
                         else f"{result['server_cpu_ms_per_request']:.2f}",
                         f"{result['client_cpu_ms_per_request']:.2f}",
                         "–" if result["load_average"] is None else f"{result['load_average']:.1f}"])
            print(f"{backend}: {result['throughput']:.0f} requests/s, p50 {result['p50_ms']:.1f} ms, "
                  f"p95 {result['p95_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, {result['errors']} errors, "
                  f"server CPU {result['server_cpu_ms_per_request']} ms/request, "
                  f"client CPU {result['client_cpu_ms_per_request']:.2f} ms/request, "
                  f"load average {result['load_average']}",
                  flush=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
               f"server and clients on the same machine")
    markdown = "\n".join([
        f"# mnist-cnn serve under load, {date}", "",
        f"Machine: {machine}.", "",
        f"{args.requests:,} POST /api/predict requests (raw image/png bodies: MNIST test digits as "
        f"black ink on a 280x280 white page, as the page sends them) from {args.clients} concurrent "
        f"keep-alive clients, after {100} warm-up requests.", "",
        table(["backend", "requests/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors", "labels correct",
               "server CPU ms / request", "client CPU ms / request", "load average"], rows),
        "",
        "CPU ms / request: the server process' and the client threads' CPU time during the run, "
        "divided by the requests; load average: the machine's 1-minute load after the run "
        "(other jobs included).",
        ""])
    print(markdown)
    stem = Path(args.output) if args.output else RESULTS / f"{date}-serve-load"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "machine": machine,
                                                     "model": Path(args.model).resolve().name,
                                                     "results": figures}, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
