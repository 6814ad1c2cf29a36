"""POST /api/predict and /api/predict/batch. Decoding and the forward pass run in worker
threads, at most `worker_threads` at once, so the event loop keeps answering."""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile

from mnist_cnn.preprocess import ImageError
from mnist_cnn.serve.errors import ERRORS, ApiError, BodyTooLarge, too_many_files
from mnist_cnn.serve.images import png_base64, prediction, read_digit
from mnist_cnn.serve.metrics import Metrics
from mnist_cnn.serve.models import ServedModel, chosen_model
from mnist_cnn.serve.schemas import BATCH_BODY, IMAGE_BODY, BatchResponse, PredictResponse

router = APIRouter(prefix="/api/predict", tags=["predict"], responses=ERRORS)
PREPROCESSED = Query(False, description="add the 28x28 image the model saw (base64 PNG)")


def worker_limiter(request: Request) -> anyio.CapacityLimiter:
    """Dependency: image work is CPU-bound, so more threads than this only add switching
    (made on first use, inside the event loop that uses it)."""
    state = request.app.state
    if getattr(state, "limiter", None) is None:
        state.limiter = anyio.CapacityLimiter(state.settings.worker_threads)
    return state.limiter


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def form_files(request: Request, fields: tuple[str, ...]) -> list[tuple[str | None, bytes]]:
    """The uploaded files of a multipart body in `fields`, as (filename, bytes)."""
    limit = request.app.state.settings.max_batch_files
    try:
        form = await request.form(max_files=limit + 1, max_fields=100)
    except BodyTooLarge:
        raise
    except Exception as error:  # noqa: BLE001 - python-multipart and Starlette errors alike
        detail = getattr(error, "detail", None) or getattr(error, "message", None) or type(error).__name__
        if "too many files" in str(detail).lower():
            raise ApiError(422, too_many_files(limit)) from None
        raise ApiError(422, f"malformed multipart body ({detail})") from None
    try:
        uploads = [value for key, value in form.multi_items() if key in fields and isinstance(value, UploadFile)]
        return [(upload.filename, await upload.read()) for upload in uploads]
    finally:
        await form.close()


async def single_image(request: Request) -> bytes:
    """The image of a /api/predict request: a multipart field `file` or a raw image/* body."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        files = await form_files(request, ("file",))
        if len(files) != 1:
            raise ApiError(422, "send one image in the multipart field 'file'"
                           + (" (several: use /api/predict/batch)" if files else ""))
        return files[0][1]
    if kind.startswith("image/"):
        return await request.body()
    raise ApiError(415, f"unsupported content type {kind or '(none)'!r}; send "
                        "multipart/form-data with a field 'file', or an image/* body")


def predict_one(model: ServedModel, data: bytes, with_image: bool, metrics: Metrics) -> dict[str, Any]:
    try:
        digit = read_digit(data)
    except ImageError as error:
        metrics.images.labels(model.name, "refused").inc()
        raise ApiError(422, str(error)) from None
    result = prediction(model.probabilities(digit[None], metrics=metrics)[0], model.classes, model.name,
                        min_confidence=model.min_confidence)
    metrics.images.labels(model.name, "predicted").inc()
    if with_image:
        result["preprocessed"] = png_base64(digit)
    return result


def predict_many(model: ServedModel, files: list[tuple[str | None, bytes]], with_image: bool,
                 metrics: Metrics) -> list[dict[str, Any]]:
    """One result per file, in order; a file that fails has `error` and no prediction."""
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
        rows = model.probabilities(np.stack(digits), metrics=metrics)
        for result, row, digit in zip(waiting, rows, digits):
            result.update(prediction(row, model.classes, model.name, min_confidence=model.min_confidence))
            if with_image:
                result["preprocessed"] = png_base64(digit)
            metrics.images.labels(model.name, "predicted").inc()
    return results


@router.post("", response_model=PredictResponse, response_model_exclude_none=True, openapi_extra=IMAGE_BODY)
async def predict(request: Request, model: ServedModel = Depends(chosen_model),
                  preprocessed: bool = PREPROCESSED,
                  limiter: anyio.CapacityLimiter = Depends(worker_limiter)):
    """Predict the class of one image: a multipart field `file`, or a raw `image/*` body."""
    data = await single_image(request)
    metrics = request.app.state.metrics
    return await anyio.to_thread.run_sync(predict_one, model, data, preprocessed, metrics, limiter=limiter)


@router.post("/batch", response_model=BatchResponse, response_model_exclude_none=True, openapi_extra=BATCH_BODY)
async def predict_batch(request: Request, model: ServedModel = Depends(chosen_model),
                        preprocessed: bool = PREPROCESSED,
                        limiter: anyio.CapacityLimiter = Depends(worker_limiter)):
    """Predict several images (multipart fields `files`), one result per file in order;
    a file that fails has `error` instead of a prediction and does not fail the others."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with the images in fields 'files'")
    files = await form_files(request, ("files", "file"))
    limit = request.app.state.settings.max_batch_files
    if not files:
        raise ApiError(422, "no files: send the images in multipart fields 'files'")
    if len(files) > limit:
        raise ApiError(422, too_many_files(limit))
    metrics = request.app.state.metrics
    results = await anyio.to_thread.run_sync(predict_many, model, files, preprocessed, metrics, limiter=limiter)
    return {"model": model.name, "results": results}
