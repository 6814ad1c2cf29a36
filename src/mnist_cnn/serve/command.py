"""The `mnist-cnn serve` command: flags here; FastAPI, uvicorn and torch load when it runs."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
from pathlib import Path

from mnist_cnn import MnistCnnError
from mnist_cnn.config import BACKENDS, DEVICES
from mnist_cnn.serve import settings as limits
from mnist_cnn.serve.settings import DEFAULT_MAX_BODY_BYTES, ServeSettings

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid port (0-65535)")
    return int(text)


def _byte_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid positive byte count")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid number of seconds (> 0)")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid positive integer")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid count (an integer >= 0)")
    return int(text)


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """The server's limits against hostile or broken clients (docs/security.md)."""
    g = p.add_argument_group("limits", "what one client may cost the server (see docs/security.md)")
    g.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="answer only requests whose Host header names HOST (e.g. localhost), "
                        "others get 400; repeatable (default: any host)")
    g.add_argument("--max-buffered-bytes", type=_byte_count, default=limits.DEFAULT_MAX_BUFFERED_BYTES,
                   metavar="N", help="request bodies held in memory at once, all clients together; "
                                     f"past it: 503 (default: {limits.DEFAULT_MAX_BUFFERED_BYTES:,})")
    g.add_argument("--max-request-pixels", type=_positive, default=limits.DEFAULT_MAX_REQUEST_PIXELS,
                   metavar="N", help="image pixels one request may make the server decode "
                                     f"(default: {limits.DEFAULT_MAX_REQUEST_PIXELS:,})")
    g.add_argument("--client-pixels-per-second", type=_count, default=limits.DEFAULT_CLIENT_PIXELS_PER_SECOND,
                   metavar="N", help="decoded pixels per second one client address may use, in bursts "
                                     "of two requests' worth; over it: 429 (default: "
                                     f"{limits.DEFAULT_CLIENT_PIXELS_PER_SECOND:,}; 0: no limit)")
    g.add_argument("--max-queue", type=_count, default=limits.DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests waiting for a worker; more get 503 (default: {limits.DEFAULT_MAX_QUEUE})")
    g.add_argument("--queue-timeout", type=_seconds, default=limits.DEFAULT_QUEUE_TIMEOUT, metavar="SECONDS",
                   help="longest wait for a worker, then 503 (default: "
                        f"{limits.DEFAULT_QUEUE_TIMEOUT:g})")
    g.add_argument("--max-header-bytes", type=_byte_count, default=limits.DEFAULT_MAX_HEADER_BYTES,
                   metavar="N", help=f"request line and headers; larger: 431 (default: "
                                     f"{limits.DEFAULT_MAX_HEADER_BYTES:,})")
    g.add_argument("--header-timeout", type=_seconds, default=limits.DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                   help="time to send the headers, then 408 (default: "
                        f"{limits.DEFAULT_HEADER_TIMEOUT:g})")
    g.add_argument("--body-timeout", type=_seconds, default=limits.DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                   help=f"time to send the body, then 408 (default: {limits.DEFAULT_BODY_TIMEOUT:g})")
    g.add_argument("--keep-alive-timeout", type=_positive, default=limits.DEFAULT_KEEP_ALIVE_TIMEOUT,
                   metavar="SECONDS", help="idle keep-alive connections are closed after this "
                                           f"(default: {limits.DEFAULT_KEEP_ALIVE_TIMEOUT})")
    g.add_argument("--max-connections", type=_positive, default=limits.DEFAULT_MAX_CONNECTIONS,
                   metavar="N", help="open connections; more get 503 (default: "
                                     f"{limits.DEFAULT_MAX_CONNECTIONS})")


def limit_settings(args: argparse.Namespace) -> dict:
    """The ServeSettings fields add_limit_flags' flags set."""
    return dict(allowed_hosts=tuple(host.lower() for host in args.allowed_host),
                max_buffered_bytes=args.max_buffered_bytes, max_request_pixels=args.max_request_pixels,
                client_pixels_per_second=args.client_pixels_per_second, max_queue=args.max_queue,
                queue_timeout=args.queue_timeout, max_header_bytes=args.max_header_bytes,
                header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections)


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid number of workers (1-64)")
    return int(text)


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="a web page to draw digits on, and an HTTP API",
        description="Serve a page (at /) to draw or upload a digit and see what the model reads, "
                    "and a JSON API (POST /api/predict, /api/predict/batch; GET /api/health, "
                    "/api/models, /metrics; documented at /docs). Ctrl-C stops it.")
    p.add_argument("--model", action="append", metavar="RUN_DIR_OR_MODEL",
                   help="a run folder or model file; repeat to serve several (the page offers a "
                        "choice). Default: the newest finished run under ./runs, else the model "
                        "shipped with mnist-cnn")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"(default: {DEFAULT_PORT}; 0 picks a free port)")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="(default: torch; onnxruntime needs mnist-cnn export first)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    p.add_argument("--max-body-bytes", type=_byte_count, default=DEFAULT_MAX_BODY_BYTES,
                   metavar="N", help=f"larger requests get 413 (default: {DEFAULT_MAX_BODY_BYTES:,})")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (e.g. https://example.org) to call the "
                        "API; repeatable (default: CORS off, and POSTs from other sites' pages refused)")
    add_limit_flags(p)
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="server processes sharing the port, each with its own copy of the models "
                        "(and its own /metrics counts and limits); one per core uses them all (default: 1)")
    p.set_defaults(handler=cmd_serve)


def resolve_models(values: list[str] | None) -> list[Path]:
    """Each --model as given; none given: the newest finished run, else the shipped model."""
    from mnist_cnn.checkpoints import model_or_default

    return [Path(model_or_default(value)) for value in (values or [None])]


def listen(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a busy port is a one-line error and --port 0 works."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise MnistCnnError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    return f"http://{f'[{shown}]' if ':' in shown and not shown.startswith('[') else shown}:{port}/"


def freeze_heap() -> None:
    """Take what is loaded before serving (torch, the models, FastAPI: ~200,000 objects) out of
    the garbage collector's full collections, which walked them all: 49 ms each on a quiet
    2-core machine, long enough at 600 requests/s to fill a process's queue for the workers
    (16) and answer 503s. Requests' own objects are still collected."""
    gc.collect()
    gc.freeze()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    from mnist_cnn.serve.app import create_app, load_models
    from mnist_cnn.serve.protocol import make_server

    settings = ServeSettings(model_paths=tuple(resolve_models(args.model)), backend=args.backend,
                             device=args.device, max_body_bytes=args.max_body_bytes,
                             cors_origins=tuple(origin.rstrip("/") for origin in args.cors_origin),
                             **limit_settings(args))
    if settings.backend == "torch":
        import torch

        # Each request is one image: one thread per forward pass, requests in parallel. Two
        # intra-op threads per tiny forward made it ten times slower on a busy 2-core machine.
        torch.set_num_threads(1)
    models = load_models(settings)
    for model in models:
        info = model.info
        accuracy = (f", test accuracy {100 * info['test_accuracy']:.2f}%"
                    if info.get("test_accuracy") is not None else "")
        print(f"model {model.name}: {info.get('architecture') or '?'} on "
              f"{info.get('dataset') or '?'}{accuracy} ({settings.backend})")
    app = create_app(settings, models=models)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    server = make_server(app, settings)
    freeze_heap()
    children = [_fork_worker(sock, settings) for _ in range(args.workers - 1)]
    print(f"serving on {url_of(args.host, port)} (API docs at /docs)"
          + (f", {args.workers} processes" if children else "") + "; Ctrl-C stops", flush=True)
    # uvicorn shuts down cleanly on SIGINT and SIGTERM, then re-raises the signal it caught;
    # both end here as KeyboardInterrupt, so a service manager's stop is exit status 0 too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_workers(children)
        sock.close()
    print("stopped", flush=True)
    return 0


def _fork_worker(sock: socket.socket, settings: ServeSettings) -> int:
    """Another process serving the same listening socket (the kernel hands each connection to
    one of them). It loads its own models after the fork: a runtime's threads (ONNX Runtime's
    pool) do not survive a fork. It ends on SIGINT or SIGTERM, as the first process does."""
    pid = os.fork()
    if pid:
        return pid
    status = 0
    try:
        from mnist_cnn.serve.app import create_app, load_models
        from mnist_cnn.serve.protocol import make_server

        signal.signal(signal.SIGTERM, _interrupt)
        app = create_app(settings, models=load_models(settings))
        server = make_server(app, settings)
        freeze_heap()
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    except BaseException as error:  # noqa: BLE001 - one line, then this process ends
        print(f"mnist-cnn serve: worker {os.getpid()}: {type(error).__name__}: {error}", flush=True)
        status = 1
    finally:
        os._exit(status)  # never return into the parent's code (or run its atexit handlers)


def _stop_workers(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
