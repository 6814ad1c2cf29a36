"""How the app refuses: always `{"error": "one line"}` with a 4xx status, never a traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """A request the API refuses: answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(Exception):
    """Raised from the receive channel as soon as a body passes the limit."""


class ErrorResponse(BaseModel):
    error: str


# The error answers of the API routes, for the OpenAPI schema.
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    404: "unknown model", 413: "body over the size limit", 415: "unsupported content type",
    422: "not a usable image, or a bad parameter"}.items()}


def too_many_files(limit: int) -> str:
    return f"too many files; at most {limit} per request"


def too_large(limit: int) -> str:
    return f"request body over the limit of {limit:,} bytes"


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


async def body_too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
    limit = request.app.state.settings.max_body_bytes
    return JSONResponse({"error": too_large(limit)}, status_code=413, headers={"connection": "close"})


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else "request refused"
    if error.status_code == 404 and message == "Not Found":
        message = f"no such page: {request.url.path}"
    return JSONResponse({"error": message}, status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in item.get('loc', ()))}: {item.get('msg', 'invalid')}"
                for item in error.errors()]
    return JSONResponse({"error": "; ".join(problems) or "invalid request"}, status_code=422)


async def unexpected(request: Request, error: Exception) -> JSONResponse:
    # The server log gets the traceback (Starlette re-raises it); the client gets one line.
    return JSONResponse({"error": "internal error; the server log has the details"}, status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
