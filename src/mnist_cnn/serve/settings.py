"""What `mnist-cnn serve` was asked for: the server's limits are defined here, once.

Import-free on purpose (no FastAPI, no torch), so that the CLI's flags can use these values
without slowing `mnist-cnn --help`. docs/security.md explains each limit and its default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 10_000_000  # a phone photo fits; a 200 MB upload does not
DEFAULT_MAX_BUFFERED_BYTES = 256_000_000  # request bodies held in memory at once, all requests together
MAX_BATCH_FILES = 64
TOP_K = 3  # classes listed in a prediction's "top"

# Decoding: what one request, and one client over time, may make the server decode.
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000  # decoded pixels per request (~1 s of one core at worst)
DEFAULT_CLIENT_PIXELS_PER_SECOND = 32_000_000  # sustained, per client address; bursts: 2 requests' worth
# Waiting for a worker thread.
DEFAULT_MAX_QUEUE = 16  # requests waiting for a worker; more get 503 at once
DEFAULT_QUEUE_TIMEOUT = 10.0  # seconds a request may wait for a worker before 503
# Connections (enforced by the HTTP protocol in serve.protocol, so only under `mnist-cnn serve`).
DEFAULT_MAX_HEADER_BYTES = 32_768  # request line and headers; larger → 431
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send the request line and headers → 408 (silent: closed)
DEFAULT_BODY_TIMEOUT = 60.0  # seconds to send the whole body → 408 (10 MB at 170 kB/s)
DEFAULT_KEEP_ALIVE_TIMEOUT = 5  # seconds an idle keep-alive connection stays open
DEFAULT_MAX_CONNECTIONS = 256  # open connections; more get 503 and are closed
# After refusing a body (413) or a head (431), this much more is read and thrown away so that
# the client, still sending, reads the answer instead of "connection reset".
MAX_DRAIN_BYTES = 64_000_000


@dataclass(frozen=True)
class ServeSettings:
    """The models to serve and the server's limits."""

    model_paths: tuple[Path, ...] = ()
    backend: str = "torch"  # torch | onnxruntime
    device: str = "auto"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies → 413, refused while streaming
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES  # past it, the request that adds more → 503
    max_batch_files: int = MAX_BATCH_FILES  # files per /api/predict/batch request
    cors_origins: tuple[str, ...] = ()  # empty: CORS off, and POSTs from other origins refused
    allowed_hosts: tuple[str, ...] = ()  # empty: any Host header; else others → 400
    worker_threads: int = max(1, os.cpu_count() or 1)  # threads decoding and predicting at once
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    client_pixels_per_second: int = DEFAULT_CLIENT_PIXELS_PER_SECOND  # 0: no per-client budget
    max_queue: int = DEFAULT_MAX_QUEUE
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @property
    def client_pixel_burst(self) -> int:
        """A client's bucket holds two requests' worth of pixels, refilled at the rate above."""
        return 2 * self.max_request_pixels
