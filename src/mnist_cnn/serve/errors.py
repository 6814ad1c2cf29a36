"""How the app refuses: always `{"error": "one line"}` with a 4xx status, never a traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

CLIENT_CLOSED = 499  # nginx's "client closed request": counted as such in /metrics, never a 500


class ApiError(Exception):
    """A request the API refuses: answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class BodyTooLarge(Exception):
    """Raised from the receive channel as soon as a body passes the limit."""

    def __init__(self, limit: int):
        super().__init__(too_large(limit))
        self.limit = limit


class BodyTimeout(Exception):
    """Raised from the receive channel when the body has not arrived in time."""

    def __init__(self, seconds: float):
        super().__init__(too_slow(seconds))
        self.seconds = seconds


class ErrorResponse(BaseModel):
    error: str


# The error answers of the API routes, for the OpenAPI schema.
ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Host header not allowed", 403: "POST from another origin", 404: "unknown model",
    408: "body not sent in time", 413: "body over the size limit", 415: "unsupported content type",
    422: "not a usable image, or a bad parameter", 429: "this client's pixel budget is used up",
    503: "every worker busy and the queue full (see Retry-After)"}.items()}


def too_many_files(limit: int) -> str:
    return f"too many files; at most {limit} per request"


def too_large(limit: int) -> str:
    return f"request body over the limit of {limit:,} bytes"


def too_slow(seconds: float) -> str:
    return f"request body not received within {seconds:g} s"


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


async def body_too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=413, headers={"connection": "close"})


async def body_timeout(request: Request, error: BodyTimeout) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=408, headers={"connection": "close"})


async def client_disconnect(request: Request, error: ClientDisconnect) -> Response:
    # Nobody reads this answer; the middleware counts and logs the request as client-closed.
    return Response(status_code=CLIENT_CLOSED)


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
    app.add_exception_handler(BodyTimeout, body_timeout)
    app.add_exception_handler(ClientDisconnect, client_disconnect)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
