"""What every client of a remote service (teacher, router) shares: the bad-request error that crosses
process boundaries intact, and a bounded retry with exponential back-off that never retries bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

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
        return ErrorBody(error=ErrorDetail(field=self.field, message=self.message)).model_dump()


def request_error(e: RequestError) -> RequestError:
    """The service's own RequestError behind one that crossed Ray (RayTaskError keeps it as `cause`)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, RequestError) else e


class ErrorDetail(BaseModel):
    field: str = Field(description="the input (or component) at fault")
    message: str = Field(description="what is wrong and how to fix it")


class ErrorBody(BaseModel):
    """Every 4xx/5xx body of the REST APIs: {"error": {"field", "message"}} (documented in their OpenAPI)."""

    error: ErrorDetail


def error_responses(**described: str) -> dict:
    """FastAPI `responses=` for the given statuses (keys like s404="unknown run"), all with ErrorBody."""
    return {int(k[1:]): {"model": ErrorBody, "description": v} for k, v in described.items()}


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


class PendingCall(Generic[T]):
    """A request already on its way to a service: `result()` waits for the answer (with the timeout) and, if the
    call failed or timed out, sends it again (bounded retry with back-off, never for bad input). A timed-out
    request is cancelled, so a retry does not pile duplicate work on a replica that is already slow.

    `send()` makes a Serve handle call (a DeploymentResponse); the first one goes out at construction."""

    def __init__(self, send: Callable[[], Any], what: str, timeout_s: float, retries: int, backoff_s: float,
                 convert: Callable[[Any], T] = lambda r: r, recover: Callable[[RequestError], bool] | None = None):
        self._send, self.what, self.convert, self.recover = send, what, convert, recover
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._inflight = send()
        self._value: T | None = None
        self._done = False

    def result(self) -> T:
        """The answer; a refusal that `recover` repairs (it returns True) is sent once more."""
        if not self._done:
            try:
                value = call_with_retry(self._attempt, self.what, self.retries, self.backoff_s)
            except RequestError as e:
                if self.recover is None or not self.recover(request_error(e)):
                    raise
                value = call_with_retry(self._attempt, self.what, self.retries, self.backoff_s)
            self._value = self.convert(value)
            self._done = True
        return self._value

    def _attempt(self):
        response, self._inflight = self._inflight or self._send(), None
        try:
            return response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            response.cancel()
            raise


class Resolved(Generic[T]):
    """A value already at hand, behind PendingCall's `result()`: the sequential path of an overlapping loop."""

    def __init__(self, value: T):
        self.value = value

    def result(self) -> T:
        return self.value
