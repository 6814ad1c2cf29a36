"""The JSON contract: these pydantic models are the OpenAPI schema at /openapi.json."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from mnist_cnn.serve.settings import TOP_K


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
    unsure: bool = Field(False, description="the top probability is below min_confidence: "
                         "maybe not a digit at all (as `mnist-cnn predict` says unsure)")
    min_confidence: float = Field(0.0, description="the model's threshold, chosen on its validation split")
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
    unsure: bool | None = None
    min_confidence: float | None = None
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


# Request bodies FastAPI cannot infer (the routes read the raw request themselves).
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "an image file"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}
