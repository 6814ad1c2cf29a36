"""What routes need, as FastAPI dependencies (the FastAPI template's `deps.py`): a route's
signature names the settings, models, metrics and limits it uses, and this module is the one
place that knows where the app keeps them (`app.state.serve`, made by `create_app`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

from fastapi import Depends, Query, Request

from mnist_cnn.serve.errors import ApiError
from mnist_cnn.serve.limits import ClientBudgets, WorkQueue, pixel_charge
from mnist_cnn.serve.metrics import Metrics
from mnist_cnn.serve.models import ServedModel
from mnist_cnn.serve.settings import ServeSettings


@dataclass
class ServeState:
    """One app's objects: made once by `create_app`, never at import."""

    settings: ServeSettings
    models: list[ServedModel]
    metrics: Metrics
    work: WorkQueue
    budgets: ClientBudgets

    @classmethod
    def create(cls, settings: ServeSettings, models: list[ServedModel]) -> ServeState:
        return cls(settings=settings, models=models, metrics=Metrics(),
                   work=WorkQueue(settings.worker_threads, settings.max_queue, settings.queue_timeout),
                   budgets=ClientBudgets(settings.client_pixels_per_second, settings.client_pixel_burst))


def serve_state(request: Request) -> ServeState:
    return request.app.state.serve


StateDep = Annotated[ServeState, Depends(serve_state)]


def get_settings(state: StateDep) -> ServeSettings:
    return state.settings


def get_models(state: StateDep) -> list[ServedModel]:
    """The app's models, the default first."""
    return state.models


def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


def get_work(state: StateDep) -> WorkQueue:
    return state.work


SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
ModelsDep = Annotated[list[ServedModel], Depends(get_models)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
WorkDep = Annotated[WorkQueue, Depends(get_work)]


def chosen_model(models: ModelsDep, model: Annotated[str | None, Query(
        description="model name from /api/models (default: the first)")] = None) -> ServedModel:
    """The model a request names with ?model=, else the default."""
    if model is None:
        return models[0]
    for served in models:
        if served.name == model:
            return served
    raise ApiError(404, f"unknown model {model!r}; available: {', '.join(m.name for m in models)}")


def pixel_budget(request: Request, state: StateDep) -> Callable[[int], None]:
    """This request's `charge(pixels)`: its own pixel budget and its client's (by address)."""
    client = request.client.host if request.client else "unknown"
    return pixel_charge(state.settings, state.budgets, client)


ModelDep = Annotated[ServedModel, Depends(chosen_model)]
ChargeDep = Annotated[Callable[[int], None], Depends(pixel_budget)]
