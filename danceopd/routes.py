"""Build the teacher field of every route of a run config (in-process: the reference trainer and eval)."""

from __future__ import annotations

import torch

from danceopd.fields.base import VelocityField
from danceopd.fields.operators import CFGField
from danceopd.suite import CapabilitySuite
from danceopd.teacher_model import load_teacher_field
from danceopd.text_embeddings import TextEmbeddings


def build_route_field(name: str, cfg, suite: CapabilitySuite, device: str | torch.device = "cpu", dtype: str = "auto",
                      text: TextEmbeddings | None = None) -> VelocityField:
    """Route `name` of a TrainConfig: the suite's exact field, or a model teacher (base + checkpoint + LoRAs, merged),
    wrapped in CFG(alpha) when the route absorbs guidance."""
    route = cfg.routes[name]
    if route.model_teacher is None:
        field = suite.field(route.capability)
    else:
        field = load_teacher_field(route.model_teacher, name, cfg.student.resolution, default_base=cfg.student.base,
                                   device=device, dtype=dtype, text=text, buckets=cfg.bucket_sizes() or ())
    if route.cfg_alpha is not None:
        field = CFGField(field, route.cfg_alpha, name=name)
    return field


def build_route_fields(cfg, suite: CapabilitySuite, device="cpu", dtype="auto", text: TextEmbeddings | None = None) -> dict[str, VelocityField]:
    return {name: build_route_field(name, cfg, suite, device, dtype, text) for name in cfg.routes}
