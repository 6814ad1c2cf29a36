"""The web page and the HTTP API of `mnist-cnn serve`, as one FastAPI app made by `create_app`.

Every image goes through `mnist_cnn.preprocess`, the path the CLI uses, so the page and the
API see exactly what `mnist-cnn predict` sees. Nothing a client sends can make the app answer
5xx or name a file on the server: bodies over the limit are refused while they stream in,
content types are checked before anything is read, and any failure to decode an image is a
422 with a one-line `{"error": ...}`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnist_cnn import MnistCnnError, __version__
from mnist_cnn.preprocess import ImageError, preprocess_file, to_image

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 10_000_000  # a phone photo fits; a 200 MB upload does not
MAX_BATCH_FILES = 64
TOP_K = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
BACKENDS = ("torch", "onnxruntime")
# The page's own policy: scripts, styles and images from this server (and the canvas' blobs).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class ServeSettings:
    """What `mnist-cnn serve` was asked for; the server's limits are defined here only."""

    model_paths: tuple[Path, ...] = ()
    backend: str = "torch"  # torch | onnxruntime
    device: str = "auto"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies → 413, refused while streaming
    max_batch_files: int = MAX_BATCH_FILES  # files per /api/predict/batch request
    cors_origins: tuple[str, ...] = ()  # empty: CORS off
    worker_threads: int = max(1, os.cpu_count() or 1)  # threads decoding and predicting at once


@dataclass
class ServedModel:
    """A loaded predictor, its public name (never its path) and what /api/models says of it."""

    name: str
    predictor: Any
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.predictor.classes)


class ApiError(Exception):
    """A request the API refuses: answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(Exception):
    """Raised from the receive channel as soon as a body passes the limit."""


# ---- the JSON contract (these models are the OpenAPI schema) --------------------------------

class TopClass(BaseModel):
    label: int
    name: str
    probability: float


class PredictResponse(BaseModel):
    label: int = Field(description="index of the most likely class")
    name: str = Field(description="its name (the digit for MNIST)")
    probability: float = Field(description="its probability")
    probabilities: list[float] = Field(description="one probability per class, in class order")
    top: list[TopClass] = Field(description=f"the {TOP_K} most likely classes")
    model: str = Field(description="name of the model that answered")
    preprocessed: str | None = Field(None, description="with ?preprocessed=1: the 28x28 image the "
                                     "model saw, a base64-encoded PNG")


class BatchItem(BaseModel):
    filename: str | None = None
    error: str | None = Field(None, description="why this file was not predicted")
    label: int | None = None
    name: str | None = None
    probability: float | None = None
    probabilities: list[float] | None = None
    top: list[TopClass] | None = None
    model: str | None = None
    preprocessed: str | None = None


class BatchResponse(BaseModel):
    model: str
    results: list[BatchItem] = Field(description="one per file, in the order sent")


class HealthResponse(BaseModel):
    status: str
    version: str
    models: list[str]


class ModelInfo(BaseModel):
    name: str
    backend: str
    architecture: str | None = Field(description="name in the model registry, e.g. seed")
    parameters: int | None
    dataset: str | None
    classes: list[str]
    recipe: dict[str, Any] | None = Field(description="the training config it was trained with")
    test_accuracy: float | None = Field(description="fraction in [0, 1] on the data set's test split")


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    error: str


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    404: "unknown model", 413: "body over the size limit", 415: "unsupported content type",
    422: "not a usable image, or a bad parameter"}.items()}

IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "an image file"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}


# ---- models -----------------------------------------------------------------------------

def model_name(path: Path) -> str:
    """A run folder's name; for a file, its folder's name when it is a run's standard file."""
    path = Path(path).resolve()
    if path.is_dir():
        return path.name
    if path.name in ("model.safetensors", "checkpoint.pt", "model.onnx", "model.torchscript.pt"):
        return path.parent.name
    return path.name.split(".")[0] or path.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def describe_model(path: Path, predictor: Any, *, backend: str) -> dict[str, Any]:
    """What /api/models reports, taken from the predictor where it knows, else model.json
    beside the model, else the ONNX file's metadata."""
    keys = ("architecture", "parameters", "dataset", "classes", "recipe", "test_accuracy")
    if callable(getattr(predictor, "describe", None)):
        try:
            described = predictor.describe()
            return {"backend": backend, **{key: described.get(key) for key in keys}}
        except Exception:  # noqa: BLE001 - an older predictor: fall back to reading the files
            pass
    path = Path(path)
    document = _read_json((path if path.is_dir() else path.parent) / "model.json")
    config: dict[str, Any] | None = None
    if getattr(predictor, "config", None) is not None:
        config = predictor.config.to_dict()
    elif isinstance(document.get("config"), dict):
        config = document["config"]
    elif getattr(predictor, "session", None) is not None:
        try:
            config = json.loads(predictor.session.get_modelmeta().custom_metadata_map["config"])
        except (KeyError, ValueError, AttributeError):
            config = None
    parameters = document.get("parameters")
    if getattr(predictor, "model", None) is not None:
        parameters = sum(p.numel() for p in predictor.model.parameters())
    accuracy = (document.get("metrics") or {}).get("test_accuracy")
    return {
        "backend": backend,
        "architecture": (config or {}).get("model"),
        "parameters": parameters if isinstance(parameters, int) else None,
        "dataset": (config or {}).get("dataset"),
        "classes": list(predictor.classes),
        "recipe": config,
        "test_accuracy": float(accuracy) if isinstance(accuracy, (int, float)) else None,
    }


def _predictor(path: Path, settings: ServeSettings):
    from mnist_cnn.predict import make_predictor

    if settings.backend == "onnxruntime":
        try:  # one intra-op thread: requests run in parallel, and idle ORT threads spin
            from mnist_cnn.predict import OnnxPredictor

            return OnnxPredictor(path, threads=1)
        except (ImportError, TypeError):
            pass
    return make_predictor(path, backend=settings.backend, device=settings.device)


def load_models(settings: ServeSettings) -> list[ServedModel]:
    """Load every model once; names are made unique by a suffix (-2, -3, ...)."""
    if not settings.model_paths:
        raise MnistCnnError("no model to serve; give --model RUN_DIR_OR_MODEL")
    models: list[ServedModel] = []
    used: set[str] = set()
    for path in settings.model_paths:
        predictor = _predictor(path, settings)
        name, counter = model_name(path), 1
        while name in used:
            counter += 1
            name = f"{model_name(path)}-{counter}"
        used.add(name)
        models.append(ServedModel(name=name, predictor=predictor,
                                  info=describe_model(path, predictor, backend=settings.backend)))
    return models


# ---- images -----------------------------------------------------------------------------

def refuse_unsupported(data: bytes) -> None:
    """The formats the API refuses although Pillow could read them: animations (which frame
    did the user mean?), 16-bit and floating-point images, and CMYK (print files)."""
    if data[:8] == PNG_SIGNATURE and len(data) > 24 and data[12:16] == b"IHDR" and data[24] == 16:
        raise ImageError("16-bit PNG is not supported; save it with 8 bits per channel")
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Exception:  # noqa: BLE001 - whatever it is, preprocess_file names it
        return
    with image:
        if image.mode in HIGH_DEPTH_MODES:
            raise ImageError(f"{image.mode} images (16-bit or floating point) are not supported; "
                             "save it with 8 bits per channel")
        if image.mode == "CMYK":
            raise ImageError("CMYK images are not supported; save it as RGB or grayscale")
        try:
            animated = bool(getattr(image, "is_animated", False))
        except Exception:  # noqa: BLE001
            return
        if animated:
            raise ImageError("animated images are not supported; send a single frame")


def read_digit(data: bytes) -> np.ndarray:
    """Bytes from a client → the uint8 (28, 28) digit, or ImageError with a one-line reason."""
    if not data:
        raise ImageError("empty body: no image")
    refuse_unsupported(data)
    try:
        return preprocess_file(data)
    except ImageError as error:
        raise ImageError(str(error).removeprefix("image: ")) from None
    except Exception as error:  # noqa: BLE001 - a Pillow plugin failing on hostile bytes
        raise ImageError(f"cannot decode the image ({type(error).__name__})") from None


def png_base64(digit: np.ndarray) -> str:
    buffer = io.BytesIO()
    to_image(digit).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def prediction(row: np.ndarray, served: ServedModel, *, top: int = TOP_K) -> dict[str, Any]:
    classes = served.classes
    label = int(np.argmax(row))
    order = np.argsort(row)[::-1][:top]
    return {"label": label, "name": classes[label], "probability": float(row[label]),
            "probabilities": [float(p) for p in row],
            "top": [{"label": int(i), "name": classes[i], "probability": float(row[i])} for i in order],
            "model": served.name}


# ---- metrics ----------------------------------------------------------------------------

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
        start, status = time.perf_counter(), [500]

        async def measured_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
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


def too_many_files(limit: int) -> str:
    return f"too many files; at most {limit} per request"


def too_large(limit: int) -> str:
    return f"request body over the limit of {limit:,} bytes"


# ---- the app ----------------------------------------------------------------------------

def _swagger_assets() -> Path | None:
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def create_app(settings: ServeSettings, *, models: list[ServedModel] | None = None) -> FastAPI:
    """The app: page at /, API under /api, metrics at /metrics, docs at /docs. `models`
    (from `load_models`) lets callers load once and build several apps; by default the
    models in `settings` are loaded now."""
    served = models if models is not None else load_models(settings)
    by_name = {model.name: model for model in served}
    metrics = Metrics()
    app = FastAPI(title="mnist-cnn", version=__version__, docs_url=None, redoc_url=None,
                  description="Handwritten digits (or the classes of another MNIST-format data "
                              "set) from images, through MNIST's own normalisation.")
    app.state.settings, app.state.models, app.state.metrics = settings, by_name, metrics

    # -- errors: always {"error": "..."}, never a traceback
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, error: BodyTooLarge):
        return JSONResponse({"error": too_large(settings.max_body_bytes)}, status_code=413,
                            headers={"connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = error.detail if isinstance(error.detail, str) else "request refused"
        if error.status_code == 404 and message == "Not Found":
            message = f"no such page: {request.url.path}"
        return JSONResponse({"error": message}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', 'invalid')}"
                    for item in error.errors()]
        return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        # The server log gets the traceback (Starlette re-raises it); the client gets one line.
        return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(LimitAndMeasure, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    limiters: list[anyio.CapacityLimiter] = []

    def limiter() -> anyio.CapacityLimiter:
        # Image work is CPU-bound: more threads than this only add switching (made lazily,
        # inside the event loop that uses it).
        if not limiters:
            limiters.append(anyio.CapacityLimiter(settings.worker_threads))
        return limiters[0]

    def pick(name: str | None) -> ServedModel:
        if name is None:
            return served[0]
        if name not in by_name:
            raise ApiError(404, f"unknown model {name!r}; available: {', '.join(by_name)}")
        return by_name[name]

    def media_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    async def form_files(request: Request, fields: tuple[str, ...]) -> list[tuple[str | None, bytes]]:
        try:
            form = await request.form(max_files=settings.max_batch_files + 1, max_fields=100)
        except BodyTooLarge:
            raise
        except Exception as error:  # noqa: BLE001 - python-multipart and Starlette errors alike
            detail = getattr(error, "detail", None) or getattr(error, "message", None) or type(error).__name__
            if "too many files" in str(detail).lower():
                raise ApiError(422, too_many_files(settings.max_batch_files)) from None
            raise ApiError(422, f"malformed multipart body ({detail})") from None
        try:
            uploads = [value for key, value in form.multi_items()
                       if key in fields and isinstance(value, UploadFile)]
            return [(upload.filename, await upload.read()) for upload in uploads]
        finally:
            await form.close()

    def infer(model: ServedModel, digits: np.ndarray) -> np.ndarray:
        with model.lock:  # one forward pass at a time per model; the CPU is shared anyway
            began = time.perf_counter()
            rows = model.predictor.probabilities(digits)
            metrics.inference.labels(model.name).observe(time.perf_counter() - began)
        return rows

    def predict_one(model: ServedModel, data: bytes, with_image: bool) -> dict[str, Any]:
        try:
            digit = read_digit(data)
        except ImageError as error:
            metrics.images.labels(model.name, "refused").inc()
            raise ApiError(422, str(error)) from None
        result = prediction(infer(model, digit[None])[0], model)
        metrics.images.labels(model.name, "predicted").inc()
        if with_image:
            result["preprocessed"] = png_base64(digit)
        return result

    def predict_many(model: ServedModel, files: list[tuple[str | None, bytes]],
                     with_image: bool) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        digits, waiting = [], []
        for filename, data in files:
            results.append({"filename": filename})
            try:
                digits.append(read_digit(data))
                waiting.append(results[-1])
            except ImageError as error:
                results[-1]["error"] = str(error)
                metrics.images.labels(model.name, "refused").inc()
        if digits:
            for result, row, digit in zip(waiting, infer(model, np.stack(digits)), digits):
                result.update(prediction(row, model))
                if with_image:
                    result["preprocessed"] = png_base64(digit)
                metrics.images.labels(model.name, "predicted").inc()
        return results

    model_query = Query(None, description="model name from /api/models (default: the first)")
    preprocessed_query = Query(False, description="add the 28x28 image the model saw (base64 PNG)")

    @app.post("/api/predict", response_model=PredictResponse, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=IMAGE_BODY, tags=["predict"])
    async def predict(request: Request, model: str | None = model_query,
                      preprocessed: bool = preprocessed_query):
        """Predict the class of one image: a multipart field `file`, or a raw `image/*` body."""
        chosen = pick(model)
        kind = media_type(request)
        if kind == "multipart/form-data":
            files = await form_files(request, ("file",))
            if len(files) != 1:
                raise ApiError(422, "send one image in the multipart field 'file'"
                               + (" (several: use /api/predict/batch)" if files else ""))
            data = files[0][1]
        elif kind.startswith("image/"):
            data = await request.body()
        else:
            raise ApiError(415, f"unsupported content type {kind or '(none)'!r}; send "
                                "multipart/form-data with a field 'file', or an image/* body")
        return await anyio.to_thread.run_sync(predict_one, chosen, data, preprocessed, limiter=limiter())

    @app.post("/api/predict/batch", response_model=BatchResponse, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=BATCH_BODY, tags=["predict"])
    async def predict_batch(request: Request, model: str | None = model_query,
                            preprocessed: bool = preprocessed_query):
        """Predict several images (multipart fields `files`), one result per file in order;
        a file that fails has `error` instead of a prediction and does not fail the others."""
        chosen = pick(model)
        if media_type(request) != "multipart/form-data":
            raise ApiError(415, "send multipart/form-data with the images in fields 'files'")
        files = await form_files(request, ("files", "file"))
        if not files:
            raise ApiError(422, "no files: send the images in multipart fields 'files'")
        if len(files) > settings.max_batch_files:
            raise ApiError(422, too_many_files(settings.max_batch_files))
        results = await anyio.to_thread.run_sync(predict_many, chosen, files, preprocessed, limiter=limiter())
        return {"model": chosen.name, "results": results}

    @app.get("/api/health", response_model=HealthResponse, tags=["service"])
    async def health():
        return {"status": "ok", "version": __version__, "models": list(by_name)}

    @app.get("/api/models", response_model=ModelsResponse, tags=["service"])
    async def list_models():
        """The models served: architecture, parameters, data set, classes, recipe, accuracy."""
        return {"default": served[0].name,
                "models": [{"name": m.name, **m.info} for m in served]}

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"content-security-policy": PAGE_CSP,
                                     "x-content-type-options": "nosniff", "cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    assets = _swagger_assets()
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs(request: Request):
            root = request.scope.get("root_path", "")
            return get_swagger_ui_html(
                openapi_url=f"{root}{app.openapi_url}", title="mnist-cnn API",
                swagger_js_url=f"{root}/docs-assets/swagger-ui-bundle.js",
                swagger_css_url=f"{root}/docs-assets/swagger-ui.css",
                swagger_favicon_url=f"{root}/docs-assets/favicon.png",
                oauth2_redirect_url=None, swagger_ui_parameters={"validatorUrl": None})

    return app
