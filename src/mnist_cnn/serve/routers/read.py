"""POST /api/read: every digit in one image, left to right, as `mnist-cnn predict --number`
reads it. The same inputs, limits and refusals as /api/predict."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from mnist_cnn.number import read_image
from mnist_cnn.preprocess import ImageError, open_image
from mnist_cnn.serve.deps import ChargeDep, MetricsDep, ModelDep, SettingsDep, WorkDep
from mnist_cnn.serve.errors import ERRORS, ApiError
from mnist_cnn.serve.images import png_base64, refuse_unsupported
from mnist_cnn.serve.limits import OverBudget
from mnist_cnn.serve.metrics import Metrics
from mnist_cnn.serve.models import ServedModel
from mnist_cnn.serve.routers.predict import PREPROCESSED
from mnist_cnn.serve.schemas import IMAGE_BODY
from mnist_cnn.serve.uploads import single_image

router = APIRouter(prefix="/api/read", tags=["read"], responses=ERRORS)


class NumberDigit(BaseModel):
    label: int = Field(description="index of the most likely class")
    name: str = Field(description="its name (the digit for MNIST)")
    probability: float = Field(description="its probability")
    unsure: bool = Field(description="below the model's min_confidence: shown as ? in text")
    box: list[int] = Field(description="[x0, y0, x1, y1] of this digit's ink in the image's pixels "
                           "(x1, y1 exclusive)")
    preprocessed: str | None = Field(None, description="with ?preprocessed=1: the 28x28 image the "
                                     "model saw for this digit, a base64-encoded PNG")


class ReadResponse(BaseModel):
    text: str = Field(description="the digits left to right, ? where a digit is unsure")
    digits: list[NumberDigit] = Field(description="one per digit, left to right")
    model: str = Field(description="name of the model that answered")


def read_one(model: ServedModel, data: bytes, with_images: bool, metrics: Metrics,
             charge: Callable[[int], None]) -> dict[str, Any]:
    """Bytes → the reading as the API's JSON, or ApiError 422 with a one-line reason. The
    image is decoded at full size (the boxes are in its pixels), charged to the budgets first."""
    # The served model's lock and timing wrap every forward pass (the cut search makes several).
    predictor = SimpleNamespace(classes=model.classes,
                                probabilities=lambda digits: model.probabilities(digits, metrics=metrics))
    try:
        if not data:
            raise ImageError("empty body: no image")
        refuse_unsupported(data)
        reading = read_image(predictor, open_image(data, charge=charge), min_confidence=model.min_confidence)
    except ImageError as error:
        metrics.images.labels(model.name, "refused").inc()
        raise ApiError(422, str(error).removeprefix("image: ")) from None
    except OverBudget:
        raise
    except Exception as error:  # noqa: BLE001 - a Pillow plugin failing on hostile bytes
        metrics.images.labels(model.name, "refused").inc()
        raise ApiError(422, f"cannot decode the image ({type(error).__name__})") from None
    metrics.images.labels(model.name, "predicted").inc()
    digits = [dict(d) for d in reading.digits]
    if with_images:
        for digit, image in zip(digits, reading.images):
            digit["preprocessed"] = png_base64(image)
    return {"text": reading.text, "digits": digits, "model": model.name}


@router.post("", response_model=ReadResponse, response_model_exclude_none=True, openapi_extra=IMAGE_BODY)
async def read(request: Request, model: ModelDep, settings: SettingsDep, metrics: MetricsDep,
               work: WorkDep, charge: ChargeDep, preprocessed: bool = PREPROCESSED):
    """Read every digit in one image, left to right (a multipart field `file`, or a raw
    `image/*` body): the number as text, and each digit with its box."""
    data = await single_image(request, max_files=settings.max_batch_files)
    return await work.run(read_one, model, data, preprocessed, metrics, charge)
