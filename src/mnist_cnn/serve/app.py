"""The web page and the HTTP API of `mnist-cnn serve`, as one FastAPI app made by `create_app`.

Every image goes through `mnist_cnn.preprocess`, the path the CLI uses, so the page and the
API see exactly what `mnist-cnn predict` sees. Nothing a client sends can make the app answer
5xx or name a file on the server: bodies over the limit are refused while they stream in,
content types are checked before anything is read, and any failure to decode an image is a
422 with a one-line `{"error": ...}`.

The pieces (FastAPI's "Bigger Applications" layout): `settings` (the limits), `models` (loaded
once, given to routes as a dependency), `images` (bytes → digit → JSON), `errors` (the
handlers), `metrics` (Prometheus and the body-limit middleware), and `routers/` (one per
concern). Nothing is created at import: each `create_app` call makes its own state.
"""

from __future__ import annotations

from fastapi import FastAPI

from mnist_cnn import __version__
from mnist_cnn.serve.errors import add_error_handlers
from mnist_cnn.serve.metrics import LimitAndMeasure, Metrics
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
    # Added last, so it runs first: it counts every request and refuses oversized bodies.
    app.add_middleware(LimitAndMeasure, max_body_bytes=settings.max_body_bytes, metrics=metrics)


def create_app(settings: ServeSettings, *, models: list[ServedModel] | None = None) -> FastAPI:
    """The app: page at /, API under /api, metrics at /metrics, docs at /docs. `models`
    (from `load_models`) lets callers load once and build several apps; by default the
    models in `settings` are loaded now."""
    app = FastAPI(title="mnist-cnn", version=__version__, docs_url=None, redoc_url=None,
                  description="Handwritten digits (or the classes of another MNIST-format data "
                              "set) from images, through MNIST's own normalisation.")
    app.state.settings = settings
    app.state.models = list(models) if models is not None else load_models(settings)
    app.state.metrics = Metrics()
    app.state.limiter = None  # made on first use, inside the server's event loop
    add_error_handlers(app)
    add_middleware(app, settings, app.state.metrics)
    app.include_router(predict.router)
    app.include_router(read.router)
    app.include_router(service.router)
    app.include_router(metrics_routes.router)
    page.mount_page(app)
    return app
