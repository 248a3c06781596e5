"""Routing configuration (typed, validated before anything starts)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

POLICIES = ("hard", "per_sample", "groups", "soft", "adaptive")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouteSpec(_Strict):
    teacher: str = Field(description="teacher deployment (Serve app teacher-<name>) that supervises this route")
    bucket: str = Field(description="data bucket the route's conditions come from")
    weight: float = Field(1.0, ge=0.0)


class AdaptiveConfig(_Strict):
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature over normalised losses")
    floor: float = Field(0.05, ge=0.0, lt=1.0, description="minimum share of every route (no starvation)")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="smoothing of each route's reported loss")
    warmup_reports: int = Field(3, ge=1, description="reports per route before its weight moves off the prior")


class RoutingConfig(_Strict):
    policy: Literal["hard", "per_sample", "groups", "soft", "adaptive"] = "hard"
    seed: int = 0
    routes: dict[str, RouteSpec]
    groups: list[str] | None = Field(None, description="groups policy (the official toolkit's accumulation groups): every rank "
                                     "runs, in one update, each listed route for micro_batches micro-batches, in order")
    world_size: int = Field(1, ge=1)
    micro_batches: int = Field(1, ge=1, description="gradient-accumulation micro-batches per rank per update")
    batch_size: int = Field(32, ge=1, description="samples per micro-batch")
    adaptive: AdaptiveConfig = AdaptiveConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if not self.routes:
            raise ValueError("routes is empty: name at least one route")
        if sum(r.weight for r in self.routes.values()) <= 0:
            raise ValueError("routes: at least one route needs weight > 0")
        if self.policy == "groups":
            if not self.groups:
                raise ValueError("policy 'groups' needs groups: the routes every update runs, each for micro_batches micro-batches")
            unknown = [g for g in self.groups if g not in self.routes]
            if unknown:
                raise ValueError(f"groups names unknown routes {unknown}; routes are {sorted(self.routes)}")
        elif self.groups is not None:
            raise ValueError(f"groups is only used by policy 'groups', not {self.policy!r}")
        if self.policy == "adaptive" and self.adaptive.floor * len(self.routes) >= 1:
            raise ValueError(f"adaptive.floor {self.adaptive.floor} x {len(self.routes)} routes >= 1: lower the floor")
        return self

    @property
    def slots(self) -> int:
        """Micro-batches per rank per update: micro_batches, times the number of groups under the groups policy."""
        return self.micro_batches * (len(self.groups) if self.policy == "groups" else 1)
