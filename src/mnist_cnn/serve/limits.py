"""What the server lets one request, and one client, cost: decoded pixels per request, a
pixel budget per client address over time, and a bounded queue for the worker threads.

Every route that decodes images (/api/predict, /api/predict/batch, and any later one) runs
its work through `WorkQueue.run` with a `charge` from `pixel_charge`, so the same limits hold
everywhere. The numbers live in `serve.settings`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

import anyio

from mnist_cnn.preprocess import ImageError
from mnist_cnn.serve.errors import ApiError
from mnist_cnn.serve.settings import ServeSettings

MAX_CLIENTS_TRACKED = 10_000  # client buckets kept; the least recently used go first


class OverBudget(Exception):
    """A client has used its pixel budget: the request is answered 429 with Retry-After."""

    def __init__(self, retry_after: float):
        super().__init__(f"retry after {retry_after:.1f} s")
        self.retry_after = retry_after


def busy(message: str, retry_after: float) -> ApiError:
    return ApiError(503, message, headers={"retry-after": str(max(1, math.ceil(retry_after)))})


def over_budget(error: OverBudget) -> ApiError:
    return ApiError(429, "this client sent more image pixels than the server decodes per second; "
                         "retry later", headers={"retry-after": str(max(1, math.ceil(error.retry_after)))})


class ClientBudgets:
    """A token bucket of decoded pixels per client address: `burst` at most, refilled at
    `rate` per second. Thread-safe: the worker threads charge it."""

    def __init__(self, rate: int, burst: int, *, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, time)
        self.lock = threading.Lock()

    def charge(self, client: str, pixels: int) -> None:
        """Take `pixels` from `client`'s bucket, or raise OverBudget saying when they will be there."""
        if self.rate <= 0:
            return
        with self.lock:
            now = self.clock()
            tokens, then = self.buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if pixels > tokens:
                self.buckets[client] = (tokens, now)
                raise OverBudget((min(pixels, self.burst) - tokens) / self.rate)
            self.buckets[client] = (tokens - pixels, now)
            while len(self.buckets) > MAX_CLIENTS_TRACKED:
                self.buckets.popitem(last=False)


def pixel_charge(settings: ServeSettings, budgets: ClientBudgets, client: str) -> Callable[[int], None]:
    """`charge(pixels)` for one request (see `preprocess.open_image`): refuses an image that
    would take the request past `max_request_pixels` (ImageError: that image fails), and raises
    OverBudget when the client's bucket is empty (the whole request: 429)."""
    used = [0]

    def charge(pixels: int) -> None:
        if used[0] + pixels > settings.max_request_pixels:
            raise ImageError(f"image: over this request's budget of {settings.max_request_pixels:,} "
                             "decoded pixels; send fewer or smaller images")
        budgets.charge(client, pixels)
        used[0] += pixels

    return charge


class WorkQueue:
    """The worker threads that decode and predict, `workers` at once, and the requests waiting
    for them: at most `max_waiting`, each at most `timeout` seconds, else 503 with Retry-After.
    So a request waits for a worker no longer than `timeout`, however many others flood in."""

    def __init__(self, workers: int, max_waiting: int, timeout: float):
        self.workers, self.max_waiting, self.timeout = workers, max_waiting, timeout
        self.waiting = 0
        self._slots: anyio.CapacityLimiter | None = None
        self._threads: anyio.CapacityLimiter | None = None

    def _limiters(self) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        if self._slots is None:  # made on first use, inside the event loop that uses them
            self._slots = anyio.CapacityLimiter(self.workers)
            self._threads = anyio.CapacityLimiter(self.workers)
        return self._slots, self._threads

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in a worker thread, once a worker is free; a client over its
        pixel budget (OverBudget from the work) is answered 429."""
        slots, threads = self._limiters()
        if slots.available_tokens == 0 and self.waiting >= self.max_waiting:
            raise busy(f"server busy: {self.waiting} requests already wait for a worker; retry later",
                       self.timeout)
        self.waiting += 1
        try:
            with anyio.move_on_after(self.timeout) as waited:
                await slots.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:
            raise busy(f"server busy: no worker free within {self.timeout:g} s; retry later", self.timeout)
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=threads)
        except OverBudget as error:
            raise over_budget(error) from None
        finally:
            slots.release()
