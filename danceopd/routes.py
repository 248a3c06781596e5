"""Build the teacher field of every route of a run config (in-process: the reference trainer and eval)."""

from __future__ import annotations

import torch

from danceopd.config import RouteConfig
from danceopd.fields.base import VelocityField
from danceopd.fields.diffusers_field import load_model_field
from danceopd.fields.operators import CFGField
from danceopd.suite import CapabilitySuite


def build_route_field(name: str, route: RouteConfig, suite: CapabilitySuite, device: str | torch.device = "cpu",
                      dtype: str = "auto") -> VelocityField:
    if route.teacher == "suite":
        field = suite.field(route.capability)
    else:
        field = load_model_field(route.teacher, name=name, device=device, dtype=dtype)
    if route.cfg_alpha is not None:
        field = CFGField(field, route.cfg_alpha, name=name)
    return field


def build_route_fields(routes: dict[str, RouteConfig], suite: CapabilitySuite, device="cpu", dtype="auto") -> dict[str, VelocityField]:
    return {name: build_route_field(name, r, suite, device, dtype) for name, r in routes.items()}
