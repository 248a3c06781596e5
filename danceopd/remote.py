"""What every client of a remote service (teacher, router) shares: the bad-request error that crosses
process boundaries intact, and a bounded retry with exponential back-off that never retries bad input."""

from __future__ import annotations

import asyncio
import threading
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
                 convert: Callable[[Any], T] = lambda r: r, recover: Callable[[RequestError], bool] | None = None,
                 breaker: "CircuitBreaker | None" = None):
        self._send, self.what, self.convert, self.recover, self.breaker = send, what, convert, recover, breaker
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
        if self.breaker is not None:
            self.breaker.before()  # an open circuit: fail at once, do not send
        response, self._inflight = self._inflight or self._send(), None
        try:
            value = response.result(timeout_s=self.timeout_s)
        except RequestError:  # the service answered (it refused the input): it is healthy
            if self.breaker is not None:
                self.breaker.succeeded()
            raise
        except Exception as e:
            if isinstance(e, TimeoutError):
                response.cancel()
            if self.breaker is not None:
                self.breaker.failed(e)
            raise
        if self.breaker is not None:
            self.breaker.succeeded()
        return value


class Resolved(Generic[T]):
    """A value already at hand, behind PendingCall's `result()`: the sequential path of an overlapping loop."""

    def __init__(self, value: T):
        self.value = value

    def result(self) -> T:
        return self.value


def last_line(error, limit: int = 300) -> str:
    """The informative line of an error: a worker's or replica's error text ends with its exception's own line."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class CircuitBreaker:
    """One service's health as its callers see it. `threshold` failed attempts in a row (timeouts, dead replicas,
    transport errors; never refused input) open the circuit: for `cooldown_s` every call fails at once with a
    ServiceUnavailable that names the service and its last error, instead of piling requests on a failing
    replica; the first call after the cooldown tries again (half-open) and a success closes it.
    `on_change(name, is_open, message)` hears every opening and closing (the console line and the metric)."""

    def __init__(self, name: str, threshold: int = 3, cooldown_s: float = 10.0,
                 on_change: Callable[[str, bool, str], None] | None = None):
        self.name, self.threshold, self.cooldown_s, self.on_change = name, threshold, cooldown_s, on_change
        self.failures, self.open_until, self.last_error = 0, 0.0, ""
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def wait_s(self) -> float:
        """Seconds until an open circuit lets a call through again (0 when closed or half-open)."""
        return max(0.0, self.open_until - time.monotonic()) if self.is_open else 0.0

    def before(self) -> None:
        if (left := self.wait_s()) > 0:
            raise ServiceUnavailable(f"{self.name} is failing ({self.failures} failed attempts in a row, last: {self.last_error}); "
                                     f"not called for another {left:.0f} s")

    def succeeded(self) -> None:
        with self._lock:
            was_open, self.failures = self.is_open, 0
        if was_open and self.on_change:
            self.on_change(self.name, False, f"{self.name} answers again")

    def failed(self, error: Exception) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {last_line(error, 200)}"
            opened = self.failures == self.threshold
            if self.is_open:
                self.open_until = time.monotonic() + self.cooldown_s
        if opened and self.on_change:
            self.on_change(self.name, True, f"{self.name} is failing: {self.failures} failed attempts in a row "
                                            f"(last: {self.last_error}); calls pause for {self.cooldown_s:.0f} s at a time")
