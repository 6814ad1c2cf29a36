"""Prometheus metrics, and the ASGI middleware that counts every request and refuses bodies
over the limit while they stream in."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from mnist_cnn.serve.errors import BodyTooLarge, too_large


class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mnist_cnn_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("mnist_cnn_http_request_duration_seconds",
                                 "time from request to the end of the response", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                 registry=self.registry)
        self.inference = Histogram("mnist_cnn_inference_seconds",
                                   "model forward pass per request (after preprocessing)", ["model"],
                                   buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1),
                                   registry=self.registry)
        self.images = Counter("mnist_cnn_images", "images received, by model and outcome",
                              ["model", "outcome"], registry=self.registry)


def route_label(scope: dict) -> str:
    """The route's template, not the raw path, so that random URLs cannot grow the metrics."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


async def send_json(send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class LimitAndMeasure:
    """Pure ASGI middleware: refuse bodies over the limit (at once when Content-Length says
    so, else as soon as the streamed bytes pass it), and count every request."""

    def __init__(self, app, *, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, received = time.perf_counter(), [500], [0]

        async def measured_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await send_json(measured_send, 413, {"error": too_large(self.max_body_bytes)})
            else:
                await self.app(scope, limited_receive, measured_send)
        finally:
            route = route_label(scope)
            self.metrics.requests.labels(route, scope.get("method", ""), str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
