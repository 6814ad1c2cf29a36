"""The web page and the HTTP API of `mnist-cnn serve`, as one FastAPI app made by `create_app`.

Every image goes through `mnist_cnn.preprocess`, the path the CLI uses, so the page and the
API see exactly what `mnist-cnn predict` sees. Nothing a client sends can make the app answer
500 or name a file on the server: bodies over the limit are refused while they stream in,
content types are checked before anything is read, any failure to decode an image is a 422
with a one-line `{"error": ...}`, and a server at its limits says 503 with Retry-After.

The pieces (FastAPI's "Bigger Applications" layout): `settings` (the limits), `models` (loaded
once), `deps` (what routes receive as dependencies), `uploads` (a request's images),
`images` (bytes → digit → JSON), `limits` (pixel budgets, the worker queue), `middleware`
(Host, origin, body limits, security headers, counting), `protocol` (the HTTP server's own
limits: headers, timeouts, connections), `errors` (the handlers), `metrics` (Prometheus), and
`routers/` (one per concern). Nothing is created at import: each `create_app` call makes its
own state. docs/security.md says what the limits defend against.
"""

from __future__ import annotations

from fastapi import FastAPI

from mnist_cnn import __version__
from mnist_cnn.serve.deps import ServeState
from mnist_cnn.serve.errors import add_error_handlers
from mnist_cnn.serve.metrics import Metrics
from mnist_cnn.serve.middleware import Guard
from mnist_cnn.serve.models import ServedModel, describe_model, load_models, model_name
from mnist_cnn.serve.routers import metrics as metrics_routes
from mnist_cnn.serve.routers import page, predict, read, service
from mnist_cnn.serve.settings import ServeSettings

__all__ = ["ServeSettings", "ServedModel", "create_app", "describe_model", "load_models", "model_name"]


def add_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    # Added last, so it runs first: it refuses what it must, adds the security headers to
    # every answer and counts every request.
    app.add_middleware(Guard, settings=settings, metrics=metrics)


def create_app(settings: ServeSettings, *, models: list[ServedModel] | None = None) -> FastAPI:
    """The app: page at /, API under /api, metrics at /metrics, docs at /docs. `models`
    (from `load_models`) lets callers load once and build several apps; by default the
    models in `settings` are loaded now."""
    app = FastAPI(title="mnist-cnn", version=__version__, docs_url=None, redoc_url=None,
                  description="Handwritten digits (or the classes of another MNIST-format data "
                              "set) from images, through MNIST's own normalisation.")
    state = ServeState.create(settings, list(models) if models is not None else load_models(settings))
    app.state.serve = state  # read by serve.deps only
    add_error_handlers(app)
    add_middleware(app, settings, state.metrics)
    app.include_router(predict.router)
    app.include_router(read.router)
    app.include_router(service.router)
    app.include_router(metrics_routes.router)
    page.mount_page(app)
    return app
