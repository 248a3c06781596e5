"""TeacherClient: a velocity field backed by a teacher deployment, called through a Serve DeploymentHandle.

It implements the same `velocity(x, sigma, conditions)` contract as an in-process field, so a trainer can
use a served teacher and a local one interchangeably. Every call has a timeout and a bounded retry (a
replica that died mid-call is retried on another).
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from danceopd.contracts import VelocityQuery, info_from_dict
from danceopd.fields.base import Conditions, FieldInfo
from danceopd.remote import CircuitBreaker, PendingCall, acall_with_retry

APP_PREFIX = "teacher-"


class TeacherClient:
    def __init__(self, teacher: str, app_prefix: str = APP_PREFIX, timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.5, by_value: bool = True, adapter: str | None = None, breaker: CircuitBreaker | None = None):
        from ray import serve

        self.teacher, self.timeout_s, self.retries, self.backoff_s = teacher, timeout_s, retries, backoff_s
        self.adapter = adapter  # the teacher to ask for on a shared-base (adapter bank) deployment
        self.breaker = breaker  # shared by the clients of one teacher application
        handle = serve.get_deployment_handle("TeacherServer", app_name=f"{app_prefix}{teacher}")
        # Small numpy payloads are cheapest by value over gRPC (no object-store round trip); large ones by
        # reference. The cut-off follows ../shared/docs/ray-on-this-machine.md (gRPC path slow above ~4 MiB).
        self._handle_small = handle.options(_by_reference=False, request_serialization="pickle",
                                            response_serialization="pickle") if by_value else handle
        self._handle_large = handle
        self._info: FieldInfo | None = None

    BY_VALUE_MAX_BYTES = 4 * 2**20

    def describe(self) -> dict:
        """The answering replica's field info, teacher spec, device, batching and recent model calls."""
        return self._call(lambda h: h.describe.remote(), 0)

    @property
    def info(self) -> FieldInfo:
        if self._info is None:
            info = info_from_dict(self.describe())
            if self.adapter is not None:  # this client is one teacher of the bank
                from dataclasses import replace

                info = replace(info, name=self.adapter)
            self._info = info
        return self._info

    def _handle(self, nbytes: int):
        return self._handle_small if nbytes < self.BY_VALUE_MAX_BYTES else self._handle_large

    def _send(self, make, nbytes: int, convert=lambda r: r) -> PendingCall:
        handle = self._handle(nbytes)
        return PendingCall(lambda: make(handle), f"teacher {self.teacher!r}", self.timeout_s, self.retries, self.backoff_s,
                           convert=convert, breaker=self.breaker)

    def _call(self, make, nbytes: int):
        return self._send(make, nbytes).result()

    def query(self, query: VelocityQuery) -> np.ndarray:
        return self._call(lambda h: h.velocity.remote(query), query.x.nbytes)

    def submit(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> PendingCall[torch.Tensor]:
        """Send the query now; `.result()` waits for the velocity (on x's device and dtype), retrying on failure."""
        q = VelocityQuery.from_torch(x, sigma, conditions, self.adapter)
        return self._send(lambda h: h.velocity.remote(q), q.x.nbytes,
                          convert=lambda v: torch.from_numpy(v).to(device=x.device, dtype=x.dtype))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        return self.submit(x, sigma, conditions).result()

    async def velocity_async(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """For many concurrent queries from one process (e.g. per-sample routing to several teachers)."""
        q = VelocityQuery.from_torch(x, sigma, conditions, self.adapter)
        handle = self._handle(q.x.nbytes)
        v = await acall_with_retry(lambda: asyncio.wait_for(handle.velocity.remote(q), self.timeout_s),
                                   f"teacher {self.teacher!r}", self.retries, self.backoff_s)
        return torch.from_numpy(v).to(device=x.device, dtype=x.dtype)
