"""What every client of a remote service (teacher, router) shares: the bad-request error that crosses
process boundaries intact, and a bounded retry with exponential back-off that never retries bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class RequestError(ValueError):
    """A request the service refuses; `field` names the offending input, `status` is the HTTP status to send."""

    default_status = 400

    def __init__(self, field: str, message: str, status: int | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
        self.status = self.default_status if status is None else status

    def __reduce__(self):  # Ray pickles exceptions across processes: keep the fields
        return (type(self), (self.field, self.message, self.status))

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


class ServiceUnavailable(RuntimeError):
    pass


def call_with_retry(call: Callable[[], T], what: str, retries: int, backoff_s: float) -> T:
    """`call()` up to retries + 1 times (sleeping backoff_s * 2^attempt between); RequestError is final."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return call()
        except RequestError:
            raise  # bad input: retrying cannot help
        except Exception as e:  # a dead or restarting replica, a timeout, a transport error
            last = e
            if attempt < retries:
                time.sleep(backoff_s * 2**attempt)
    raise ServiceUnavailable(f"{what} failed after {retries + 1} attempts: {last!r}") from last


async def acall_with_retry(call: Callable[[], Awaitable[T]], what: str, retries: int, backoff_s: float) -> T:
    """The asyncio twin of call_with_retry."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            return await call()
        except RequestError:
            raise
        except Exception as e:
            last = e
            if attempt < retries:
                await asyncio.sleep(backoff_s * 2**attempt)
    raise ServiceUnavailable(f"{what} failed after {retries + 1} attempts: {last!r}") from last
