"""Prometheus metrics, in each app's own registry (counted by `serve.middleware.Guard`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mnist_cnn_http_requests", "HTTP requests by route, method and status "
                                "(499: the client closed the connection before the answer)",
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
