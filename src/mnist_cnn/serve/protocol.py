"""The HTTP server's own limits, which no ASGI app can set: a cap on open connections, on the
size of a request's head, on the time to send it, and one-line JSON for what uvicorn refuses.

`HardenedHttp` is uvicorn's httptools protocol with these checks added; `make_server` builds
the uvicorn server `mnist-cnn serve` runs (and the tests start). The limits come from
`ServeSettings` (see serve.settings and docs/security.md).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mnist_cnn.serve.settings import MAX_DRAIN_BYTES, ServeSettings


def answer(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response: one-line JSON {"error": message}, then the connection closes."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close", "x-content-type-options: nosniff",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HardenedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, with `settings`' connection limits (set by `protocol_for`)."""

    settings = ServeSettings()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_bytes, self.in_head, self.dropping = 0, True, None
        self.head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.settings.max_connections:
            self.refuse(503, f"too many connections (limit {self.settings.max_connections}); retry later",
                        {"retry-after": "1"})
            return
        self.arm_head_timer()

    def connection_lost(self, exc) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)

    # The head: request line and headers, within max_header_bytes and header_timeout.
    def arm_head_timer(self) -> None:
        self.cancel_head_timer()
        self.head_timer = self.loop.call_later(self.settings.header_timeout, self.head_timed_out)

    def cancel_head_timer(self) -> None:
        if getattr(self, "head_timer", None) is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.head_bytes == 0 or (self.cycle is not None and not self.cycle.response_complete):
            self.transport.close()  # a silent connection (or one still answering): just close it
        else:
            self.refuse(408, f"request headers not received within {self.settings.header_timeout:g} s")

    def data_received(self, data: bytes) -> None:
        if self.dropping is not None:  # refused: read and drop what the client still sends
            self.dropping -= len(data)
            if self.dropping < 0:
                self.transport.close()
            return
        if self.in_head:
            if self.head_bytes == 0 and self.timeout_keep_alive_task is not None:
                self.arm_head_timer()  # a new request on a kept-alive connection
            end = data.find(b"\r\n\r\n")
            head = self.head_bytes + (len(data) if end < 0 else end + 4)
            self.head_bytes += len(data)
            if head > self.settings.max_header_bytes:
                self.refuse(431, f"request headers over the limit of {self.settings.max_header_bytes:,} bytes")
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.in_head and self.head_bytes:
            self.arm_head_timer()  # a pipelined request's head has begun already

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to malformed HTTP is text/plain; the API's errors are one-line JSON.
        self.refuse(400, f"malformed HTTP request ({msg.rstrip('.').lower()})")

    def refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """Answer, send EOF, then read and drop (bounded) what the client is still sending, so
        that it reads the answer instead of a reset connection."""
        self.cancel_head_timer()
        self.transport.write(answer(status, message, headers))
        self.dropping = MAX_DRAIN_BYTES
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(self.settings.header_timeout, self.transport.close)
        else:
            self.transport.close()


def protocol_for(settings: ServeSettings) -> type[HardenedHttp]:
    """A HardenedHttp class bound to `settings` (uvicorn makes one protocol per connection)."""
    return type("HardenedHttp", (HardenedHttp,), {"settings": settings})


def make_server(app, settings: ServeSettings, *, log_level: str = "warning") -> uvicorn.Server:
    """The uvicorn server for `app` with `settings`' connection limits."""
    return uvicorn.Server(uvicorn.Config(
        app, http=protocol_for(settings), log_level=log_level, server_header=False,
        timeout_keep_alive=settings.keep_alive_timeout, timeout_graceful_shutdown=5))
