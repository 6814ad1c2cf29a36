"""POST /api/predict and /api/predict/batch. Decoding and the forward pass run in the worker
threads of `serve.limits.WorkQueue` (bounded, with a bounded queue), so the event loop keeps
answering; the pixels they decode are charged to the request's and the client's budgets."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from fastapi import APIRouter, Query, Request

from mnist_cnn.preprocess import ImageError
from mnist_cnn.serve.deps import ChargeDep, MetricsDep, ModelDep, SettingsDep, WorkDep
from mnist_cnn.serve.errors import ERRORS, ApiError
from mnist_cnn.serve.images import png_base64, prediction, read_digit
from mnist_cnn.serve.metrics import Metrics
from mnist_cnn.serve.models import ServedModel
from mnist_cnn.serve.schemas import BATCH_BODY, IMAGE_BODY, BatchResponse, PredictResponse
from mnist_cnn.serve.uploads import batch_images, single_image

router = APIRouter(prefix="/api/predict", tags=["predict"], responses=ERRORS)
PREPROCESSED = Query(False, description="add the 28x28 image the model saw (base64 PNG)")


def predict_one(model: ServedModel, data: bytes, with_image: bool, metrics: Metrics,
                charge: Callable[[int], None]) -> dict[str, Any]:
    try:
        digit = read_digit(data, charge)
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
                 metrics: Metrics, charge: Callable[[int], None]) -> list[dict[str, Any]]:
    """One result per file, in order; a file that fails has `error` and no prediction."""
    results: list[dict[str, Any]] = []
    digits, waiting = [], []
    for filename, data in files:
        results.append({"filename": filename})
        try:
            digits.append(read_digit(data, charge))
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
async def predict(request: Request, model: ModelDep, settings: SettingsDep, metrics: MetricsDep,
                  work: WorkDep, charge: ChargeDep, preprocessed: bool = PREPROCESSED):
    """Predict the class of one image: a multipart field `file`, or a raw `image/*` body."""
    data = await single_image(request, max_files=settings.max_batch_files)
    return await work.run(predict_one, model, data, preprocessed, metrics, charge)


@router.post("/batch", response_model=BatchResponse, response_model_exclude_none=True, openapi_extra=BATCH_BODY)
async def predict_batch(request: Request, model: ModelDep, settings: SettingsDep, metrics: MetricsDep,
                        work: WorkDep, charge: ChargeDep, preprocessed: bool = PREPROCESSED):
    """Predict several images (multipart fields `files`), one result per file in order;
    a file that fails has `error` instead of a prediction and does not fail the others."""
    files = await batch_images(request, max_files=settings.max_batch_files)
    results = await work.run(predict_many, model, files, preprocessed, metrics, charge)
    return {"model": model.name, "results": results}
