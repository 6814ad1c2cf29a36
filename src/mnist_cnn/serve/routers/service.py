"""GET /api/health and /api/models: is the server up, and what does it serve."""

from __future__ import annotations

from fastapi import APIRouter

from mnist_cnn import __version__
from mnist_cnn.serve.deps import ModelsDep
from mnist_cnn.serve.schemas import HealthResponse, ModelsResponse

router = APIRouter(prefix="/api", tags=["service"])


@router.get("/health", response_model=HealthResponse)
async def health(models: ModelsDep):
    return {"status": "ok", "version": __version__, "models": [m.name for m in models]}


@router.get("/models", response_model=ModelsResponse)
async def list_models(models: ModelsDep):
    """The models served: architecture, parameters, data set, classes, recipe, accuracy."""
    return {"default": models[0].name, "models": [{"name": m.name, **m.info} for m in models]}
