"""Open-loop load benchmark of `mnist-cnn serve`: what the page sends (one drawn digit as a
PNG of about 100x100 pixels, a raw image/png body to POST /api/predict?preprocessed=1), at
fixed arrival rates.

    .venv/bin/python benchmarks/serve_load.py [--rates 200,300,400,500,600] [--seconds 5]
                                              [--backends onnxruntime,torch] [--workers N]
                                              [--whole-page]

Open loop: request i is due at start + i / rate whether or not earlier answers have arrived,
and its latency is counted from that scheduled time, so a slow answer cannot hide the requests
queued behind it (a closed loop of N clients measures saturation instead). The load generator
is one asyncio process on the same machine, sharing its CPUs with the server; each request
goes out on an idle keep-alive connection (idle for at most 4 s), or a new one when all are
busy. Also printed: the server's CPU time per request at each rate, and where a request's CPU
time goes (decode, preprocess, forward, preview, JSON; timed in this process on the same
images). Writes a Markdown table and the JSON, with the machine and the date, to
benchmarks/results/<date>-serve-open-loop.md (and .json).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from tables import table  # noqa: E402

from mnist_cnn.data import load_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("torch", "onnxruntime")
DISTINCT_IMAGES = 200


EXPORT_SIZE = 280  # app.js: the drawing's page, in pixels
SEND_SIZE, SEND_MARGIN = 100, 4  # app.js: a digit is sent at most SEND_SIZE a side, margins included


def page_png(digit: np.ndarray, *, whole_page: bool = False) -> bytes:
    """A digit as the page sends it (app.js, `digitPage`), drawn about 200 px tall on the
    280x280 page: the ink's box cropped, scaled so its longer side fits SEND_SIZE less the
    margins (never up), with SEND_MARGIN white pixels around it; an RGBA PNG (canvas.toBlob's),
    about 100x100. The page draws its strokes again at that scale, and the canvas' antialiasing
    averages each pixel's coverage, so here the 280-px drawing is area-averaged (BOX) over
    exactly the region the page's transform maps onto the small canvas. The ink's box is every
    pixel that is not white (the page's: the strokes plus half the brush). `whole_page`: the
    whole 280x280 page, as the page sent it until 2026-12-01."""
    ink = Image.fromarray(255 - digit).resize((200, 200), Image.Resampling.BILINEAR)
    page = Image.new("L", (EXPORT_SIZE, EXPORT_SIZE), 255)
    page.paste(ink, (40, 40))
    if not whole_page:
        x0, y0, x1, y1 = ImageOps.invert(page).getbbox()
        scale = min(1.0, (SEND_SIZE - 2 * SEND_MARGIN) / max(x1 - x0, y1 - y0))
        width, height = (min(SEND_SIZE - 2 * SEND_MARGIN, math.ceil(extent * scale)) for extent in (x1 - x0, y1 - y0))
        small = page.resize((width, height), Image.Resampling.BOX,
                            box=(x0, y0, x0 + width / scale, y0 + height / scale))
        page = Image.new("L", (width + 2 * SEND_MARGIN, height + 2 * SEND_MARGIN), 255)
        page.paste(small, (SEND_MARGIN, SEND_MARGIN))
    buffer = io.BytesIO()
    page.convert("RGBA").save(buffer, format="PNG")  # canvas.toBlob gives RGBA PNGs
    return buffer.getvalue()


def start_server(model: Path, backend: str, workers: int | None = None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_cnn", "serve", "--model", str(model), "--port", "0",
         "--backend", backend, "--device", "cpu", *(["--workers", str(workers)] if workers else []), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        match = re.search(r"serving on http://([\d.]+):(\d+)/", line)
        if match:
            return process, match.group(1), int(match.group(2))
    raise SystemExit(f"serve did not start:\n{process.stderr.read()}")


PATH = b"/api/predict?preprocessed=1"
# Idle keep-alive connections are reused for at most this long, below serve's keep-alive
# timeout (5 s): one the server is closing would fail the request sent on it, which browsers
# and HTTP libraries avoid by expiring (or retrying) such connections.
IDLE_SECONDS = 4.0


async def open_loop(host: str, port: int, bodies: list[bytes], labels: list[int], *, rate: float,
                    seconds: float) -> dict:
    """rate x seconds requests, request i due at start + i / rate; latency from that time
    (time.perf_counter: uvloop's own clock counts whole milliseconds)."""
    clock = time.perf_counter
    count = max(1, int(rate * seconds))
    latencies = np.zeros(count)
    outcome: list = [None] * count  # True correct, False wrong label, or an error string
    lag = np.zeros(count)  # how late the generator sent each request
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # and when it went idle
    opened = retried = 0

    async def send(index: int, due: float) -> None:
        nonlocal opened, retried
        lag[index] = clock() - due
        body = bodies[index % len(bodies)]
        request = (b"POST " + PATH + b" HTTP/1.1\r\nHost: %s\r\nContent-Type: image/png\r\n"
                   b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body)) + body)
        connection = None
        try:
            head = None
            while idle and clock() - idle[-1][2] > IDLE_SECONDS:
                idle.pop()[1].close()  # the server may be closing it: a new one, as clients do
            if idle:  # a kept-alive connection; the server may still have closed it meanwhile
                connection = idle.pop()[:2]
                reader, writer = connection
                try:
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                except (OSError, asyncio.IncompleteReadError):
                    # closed before any answer: send it again on a new connection, as HTTP
                    # clients (urllib3, browsers) do for a stale keep-alive connection
                    writer.close()
                    connection = None
                    retried += 1
            if head is None:
                connection = await asyncio.open_connection(host, port)
                opened += 1
                reader, writer = connection
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head.split(b" ", 2)[1])
            length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
            payload = await asyncio.wait_for(reader.readexactly(length), 30)
            latencies[index] = clock() - due
            outcome[index] = (json.loads(payload)["label"] == labels[index % len(labels)] if status == 200
                              else f"HTTP {status}")
            if re.search(rb"(?i)\r\nconnection:\s*close", head):
                writer.close()
            else:
                idle.append((*connection, clock()))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError, AttributeError, KeyError) as error:
            latencies[index] = clock() - due
            outcome[index] = type(error).__name__
            if connection is not None:
                connection[1].close()

    tasks = []
    start = clock() + 0.05
    for index in range(count):
        due = start + index / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(index, due)))
    await asyncio.gather(*tasks)
    wall = clock() - start
    for _, writer, _ in idle:
        writer.close()
    errors = [o for o in outcome if not isinstance(o, bool)]
    milliseconds = latencies * 1e3
    return {
        "rate": rate, "requests": count, "seconds": wall, "throughput": count / wall,
        "p50_ms": float(np.percentile(milliseconds, 50)), "p90_ms": float(np.percentile(milliseconds, 90)),
        "p99_ms": float(np.percentile(milliseconds, 99)), "max_ms": float(milliseconds.max()),
        "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
        "accuracy": sum(o is True for o in outcome) / max(1, count - len(errors)),
        "connections": opened, "stale_connection_retries": retried, "generator_lag_p99_ms": float(np.percentile(lag * 1e3, 99)),
    }


def run_open_loop(*args, **kwargs) -> dict:
    # This process holds torch and the test set (~10^5 objects): a full garbage collection over
    # them paused the generator for ~160 ms (lag p99 161 ms, then a burst of late requests and
    # 503s at 500/s), which is the generator's doing, not the server's. Frozen, as serve does.
    gc.collect()
    gc.freeze()
    try:
        import uvloop  # the server's own event loop (uvicorn[standard]): a cheaper client too

        return uvloop.run(open_loop(*args, **kwargs))
    except ImportError:
        return asyncio.run(open_loop(*args, **kwargs))


def stage_costs(model: Path, backend: str, bodies: list[bytes]) -> dict[str, float]:
    """Milliseconds of CPU per request in each stage of what the server does for one
    /api/predict?preprocessed=1 (timed here, one thread, on the same images)."""
    from mnist_cnn.predict import OnnxPredictor, make_predictor
    from mnist_cnn.preprocess import preprocess_file
    from mnist_cnn.serve.images import png_base64, prediction, refuse_unsupported

    if backend == "torch":
        import torch

        torch.set_num_threads(1)
    # as the server makes them: one intra-op thread (idle ONNX Runtime threads spin, and that
    # CPU time would count here)
    predictor = (OnnxPredictor(model, threads=1) if backend == "onnxruntime"
                 else make_predictor(model, backend=backend, device="cpu"))
    stages = {"decode (PIL)": 0.0, "preprocess (the rest of read_digit)": 0.0, "forward": 0.0,
              "preview PNG + base64": 0.0, "answer dict + JSON": 0.0}
    for data in bodies[:5]:  # warm-up
        predictor.probabilities(preprocess_file(data)[None])
    for data in bodies:
        t0 = time.process_time()
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
        t1 = time.process_time()
        refuse_unsupported(data)
        digit = preprocess_file(data)  # decodes again: its decode share is subtracted below
        t2 = time.process_time()
        row = predictor.probabilities(digit[None])[0]
        t3 = time.process_time()
        preview = png_base64(digit)
        t4 = time.process_time()
        answer = prediction(row, predictor.classes, "model")
        answer["preprocessed"] = preview
        json.dumps(answer)
        t5 = time.process_time()
        stages["decode (PIL)"] += t1 - t0
        stages["preprocess (the rest of read_digit)"] += (t2 - t1) - (t1 - t0)
        stages["forward"] += t3 - t2
        stages["preview PNG + base64"] += t4 - t3
        stages["answer dict + JSON"] += t5 - t4
    return {name: 1e3 * total / len(bodies) for name, total in stages.items()}


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of a process and its descendants (serve --workers forks), Linux /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        seconds = cpu_seconds(current)
        if seconds is None:
            if current == pid:
                return None
            continue
        total += seconds
        todo += children.get(current, [])
    return total


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
    parser.add_argument("--rates", default="200,300,400,500,600", help="requests/s (default: 200,300,400,500,600)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds at each rate (default: 5)")
    parser.add_argument("--backends", default="onnxruntime,torch", help="(default: onnxruntime,torch)")
    parser.add_argument("--workers", type=int, help="serve --workers N (default: the server's default)")
    parser.add_argument("--whole-page", action="store_true",
                        help="send the whole 280x280 page, as the page did until 2026-12-01 (default: off)")
    parser.add_argument("--output", help="results file stem (default: benchmarks/results/<date>-serve-open-loop)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]

    if args.model is None:
        from mnist_cnn.checkpoints import model_or_default

        args.model = str(model_or_default(None))
    test = load_dataset("mnist", splits=("test",))["test"]
    digits, truth = test.images[:DISTINCT_IMAGES, 0].numpy(), test.labels[:DISTINCT_IMAGES].tolist()
    bodies = [page_png(d, whole_page=args.whole_page) for d in digits]
    size = sum(map(len, bodies)) / len(bodies)
    rows, figures, stage_rows = [], {}, []
    with tempfile.TemporaryDirectory() as workdir:
        model = Path(workdir) / Path(args.model).resolve().name
        shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("*.png", "*.html", "checkpoint.pt"))
        for backend in args.backends.split(","):
            if backend == "onnxruntime" and not (model / "model.onnx").is_file():
                from mnist_cnn.export import export_model

                export_model(model, format="onnx")
            costs = stage_costs(model, backend, bodies)
            stage_rows.append([backend, *(f"{ms:.3f}" for ms in costs.values()), f"{sum(costs.values()):.3f}"])
            figures[backend] = {"stages_ms": costs, "rates": []}
            print(f"{backend}: CPU ms per request by stage: "
                  + ", ".join(f"{name} {ms:.3f}" for name, ms in costs.items()), flush=True)
            process, host, port = start_server(model, backend, args.workers)
            try:
                run_open_loop(host, port, bodies, truth, rate=50, seconds=2)  # warm-up
                for rate in rates:
                    before = tree_cpu_seconds(process.pid)
                    result = run_open_loop(host, port, bodies, truth, rate=rate, seconds=args.seconds)
                    after = tree_cpu_seconds(process.pid)
                    result["server_cpu_ms_per_request"] = (None if before is None or after is None
                                                           else 1e3 * (after - before) / result["requests"])
                    result["load_average"] = os.getloadavg()[0]
                    figures[backend]["rates"].append(result)
                    cpu = result["server_cpu_ms_per_request"]
                    rows.append([backend, f"{rate:.0f}", f"{result['throughput']:.0f}", f"{result['p50_ms']:.1f}",
                                 f"{result['p90_ms']:.1f}", f"{result['p99_ms']:.1f}", f"{result['max_ms']:.0f}",
                                 str(result["errors"]), f"{100 * result['accuracy']:.1f} %",
                                 "–" if cpu is None else f"{cpu:.2f}", f"{result['generator_lag_p99_ms']:.1f}",
                                 f"{result['load_average']:.1f}"])
                    print(f"{backend} at {rate:.0f}/s: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                          f"max {result['max_ms']:.0f} ms, {result['errors']} errors {result['error_kinds']}, "
                          f"server CPU {cpu if cpu is None else round(cpu, 2)} ms/request, "
                          f"generator lag p99 {result['generator_lag_p99_ms']:.1f} ms, "
                          f"load average {result['load_average']:.1f}", flush=True)
            finally:
                process.send_signal(signal.SIGINT)
                process.communicate(timeout=30)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    machine = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
               f"server and load generator on the same machine")
    markdown = "\n".join([
        f"# mnist-cnn serve, open-loop load, {date}", "",
        f"Machine: {machine}. Server: `mnist-cnn serve`"
        + (f" --workers {args.workers}" if args.workers else "") + ".", "",
        f"POST /api/predict?preprocessed=1 with what the page sends: a drawn digit as a raw image/png body "
        + ("(the whole 280x280 white page with black ink, as the page sent it until 2026-12-01, "
           if args.whole_page else
           f"(the ink's box of a 280x280 page, scaled to fit {SEND_SIZE}x{SEND_SIZE} with margins: app.js, "
           f"{'x'.join(map(str, Image.open(io.BytesIO(bodies[0])).size))} for the first digit, ")
        + f"{size / 1024:.1f} KB on average; {DISTINCT_IMAGES} MNIST test "
        f"digits in turn), at fixed arrival rates for {args.seconds:g} s each; latency from each "
        "request's scheduled time.", "",
        table(["backend", "rate /s", "answered /s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
               "labels correct", "server CPU ms / request", "generator lag p99 ms", "load average"], rows),
        "",
        "Server CPU ms / request: the server's processes' CPU time during the rate's run over its "
        "requests. Generator lag: how late the load generator itself sent requests (it shares the "
        "CPUs). Load average: the machine's 1-minute load after the run (other jobs included).", "",
        "Where a request's CPU time goes (ms, one thread, timed in the benchmark's process on the "
        "same images; the server adds HTTP parsing, routing and thread hand-offs):", "",
        table(["backend", *next(iter(figures.values()))["stages_ms"], "total"], stage_rows),
        ""])
    print(markdown)
    stem = Path(args.output) if args.output else RESULTS / f"{date}-serve-open-loop"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "machine": machine,
                                                     "model": Path(args.model).resolve().name,
                                                     "workers": args.workers, "body_bytes_mean": size,
                                                     "whole_page": args.whole_page,
                                                     "results": figures}, indent=2) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
