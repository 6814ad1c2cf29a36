"""The ASGI middleware in front of every route: who may ask (Host allowlist, no costly POSTs
from other origins), how much and how fast they may send (body size and time), what every
answer carries (security headers), and what is counted (/metrics, client aborts as 499)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import anyio

from mnist_cnn.serve.errors import CLIENT_CLOSED, BodyTimeout, BodyTooLarge, too_large, too_slow
from mnist_cnn.serve.limits import busy
from mnist_cnn.serve.metrics import Metrics, route_label
from mnist_cnn.serve.settings import MAX_DRAIN_BYTES, ServeSettings

log = logging.getLogger("mnist_cnn.serve")

# The page's own policy: scripts, styles and images from this server (and the canvas' blobs).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# Everything that is not HTML (JSON, images, scripts): nothing to run, nowhere to be framed.
DATA_CSP = "default-src 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"))


def with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` plus nosniff, no framing, no referrer, and a CSP (the page's for HTML, none
    at all for anything else) unless the route set its own."""
    names = {name.lower() for name, _ in headers}
    added = [(name, value) for name, value in SECURITY_HEADERS if name not in names]
    if b"content-security-policy" not in names:
        kind = next((value for name, value in headers if name.lower() == b"content-type"), b"")
        policy = PAGE_CSP if kind.startswith(b"text/html") else DATA_CSP
        added.append((b"content-security-policy", policy.encode()))
    return [*headers, *added]


async def send_json(send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    extra = [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *extra]})
    await send({"type": "http.response.body", "body": payload})


def host_name(host: str) -> str:
    """"Example.org:8000" → "example.org", "[::1]:8000" → "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def authority(netloc: str, scheme: str) -> str:
    """host[:port] without the scheme's default port, lowercase."""
    netloc = netloc.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


def foreign_origin(origin: str, host: str, scheme: str, allowed: tuple[str, ...]) -> bool:
    """Whether a browser's Origin is another site than the one it sent the request to (the
    Host header) and not one --cors-origin allows. "null" (a sandboxed page, a file) is foreign."""
    if origin.rstrip("/") in allowed or "*" in allowed:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return True
    return authority(parts.netloc, parts.scheme) != authority(host, parts.scheme)


class Exchange:
    """One request as the Guard sees it: what the client sent, what was answered, and the
    receive and send channels the app gets, with the body's limits enforced on receive."""

    def __init__(self, guard: Guard, scope, receive, send):
        self.guard, self.settings, self.scope = guard, guard.settings, scope
        self._receive, self._send = receive, send
        self.headers = {name.lower(): value for name, value in scope["headers"]}
        self.deadline = time.monotonic() + self.settings.body_timeout
        self.status, self.started, self.done = 500, False, False  # the answer
        self.closed, self.body_done, self.received = False, False, 0  # the request
        self.drain_after_answer = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            message = {**message, "headers": with_security_headers(list(message.get("headers", [])))}
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if self.drain_after_answer:  # the answer first, then read the rest of the body
                await self._send({**message, "more_body": True})
                await self.drain()
                message = {"type": "http.response.body", "body": b""}
            self.done = True
        await self._send(message)

    async def next_message(self):
        """The next message; while the body is still coming, within the body deadline."""
        if self.body_done:
            message = await self._receive()
        else:
            with anyio.move_on_after(max(0.0, self.deadline - time.monotonic())) as waited:
                message = await self._receive()
            if waited.cancelled_caught:
                raise BodyTimeout(self.settings.body_timeout)
        if message["type"] == "http.disconnect":
            self.closed = True
        elif message["type"] == "http.request" and not message.get("more_body", False):
            self.body_done = True
        return message

    async def receive(self):
        """The app's receive: refuses a body past the limit (413) or past the memory held for
        all uploads together (503); either way the rest is drained after the answer."""
        message = await self.next_message()
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            self.received += size
            self.guard.buffered += size
            if self.received > self.settings.max_body_bytes:
                self.drain_after_answer = True
                raise BodyTooLarge(self.settings.max_body_bytes)
            if self.guard.buffered > self.settings.max_buffered_bytes:
                self.drain_after_answer = True
                raise busy("server busy: too many uploads in progress; retry later", 1)
        return message

    async def drain(self) -> None:
        """Read and drop the rest of the body (bounded in bytes and time) after a refusal was
        sent: a client that reads while it sends stops at once, and one that sends everything
        first (no Expect: 100-continue) reads the answer instead of a reset connection."""
        if self.headers.get(b"expect", b"").lower() == b"100-continue":
            return  # it waits for our answer before sending
        dropped = 0
        try:
            while dropped <= MAX_DRAIN_BYTES and not self.body_done and not self.closed:
                dropped += len((await self.next_message()).get("body", b""))
        except BodyTimeout:
            pass  # answer now; the connection is closed after it

    def refusal(self) -> tuple[int, dict[str, str]] | None:
        """(status, body) of a request refused before the app sees it, or None."""
        settings, headers = self.settings, self.headers
        host = headers.get(b"host", b"").decode("latin-1")
        if settings.allowed_hosts and host_name(host) not in settings.allowed_hosts:
            return 400, {"error": f"Host {host_name(host)[:100]!r} is not served here (see --allowed-host)"}
        origin = headers.get(b"origin")
        if self.scope.get("method") == "POST" and origin is not None:
            origin_text = origin.decode("latin-1")
            if foreign_origin(origin_text, host, self.scope.get("scheme", "http"), settings.cors_origins):
                return 403, {"error": f"POST from another origin ({origin_text[:100]}) refused; "
                                      "serve with --cors-origin to allow it"}
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return 413, {"error": too_large(settings.max_body_bytes)}
        return None


class Guard:
    """Pure ASGI middleware, the outermost: refuses foreign Hosts (400) and cross-origin POSTs
    (403); refuses bodies over the limit (at once when Content-Length says so, else as soon as
    the streamed bytes pass it: 413), bodies that do not arrive in time (408) and bodies past
    the memory held for all uploads together (503), then reads and drops what the client still
    sends so that it reads the answer; adds the security headers to every answer; counts every
    request in /metrics, one whose client went away before the answer as 499."""

    def __init__(self, app, *, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.buffered = 0  # body bytes received by the requests in progress, together

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        exchange = Exchange(self, scope, receive, send)
        try:
            refusal = exchange.refusal()
            if refusal is not None:
                exchange.drain_after_answer = True
                await send_json(exchange.send, *refusal)
            else:
                await self.app(scope, exchange.receive, exchange.send)
        except BodyTimeout:
            if exchange.started:
                raise
            await send_json(exchange.send, 408, {"error": too_slow(self.settings.body_timeout)})
        except Exception:
            if not exchange.closed:
                raise
            # The client went away (ClientDisconnect, a broken multipart stream, ...): not ours.
        finally:
            self.buffered -= exchange.received
            route, method = route_label(scope), scope.get("method", "")
            status = CLIENT_CLOSED if exchange.closed and not exchange.done else exchange.status
            if status == CLIENT_CLOSED:
                log.warning("client closed the connection before the answer: %s %s", method, route)
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
