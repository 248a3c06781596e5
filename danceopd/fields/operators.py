"""Operator fields: fields defined by combining other fields."""

from __future__ import annotations

from dataclasses import replace

import torch

from danceopd.fields.base import Conditions, FieldInfo, VelocityField
from danceopd.flow.guidance import cfg_combine


class CFGField:
    """CFG(alpha) over any field: v(x, s, '') + alpha * (v(x, s, c) - v(x, s, '')), in one batched call."""

    def __init__(self, base: VelocityField, alpha: float, name: str | None = None):
        self.base, self.alpha = base, float(alpha)
        self.info = replace(base.info, name=name or f"cfg{alpha:g}({base.info.name})", kind="cfg", guidance=self.alpha)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        b = x.shape[0]
        both = Conditions([""] * b + conditions.prompts,
                          None if conditions.source is None else torch.cat([conditions.source, conditions.source]), conditions.shape)
        v = self.base.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        return cfg_combine(v[:b], v[b:], self.alpha)


class SoftMixField:
    """The soft-mixing ablation: a fixed weighted average of several fields' velocities (weights sum to 1)."""

    def __init__(self, fields: list[VelocityField], weights: list[float], name: str = "soft_mix"):
        if len(fields) != len(weights) or not fields:
            raise ValueError("SoftMixField needs one weight per field")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"SoftMixField weights must be >= 0 with a positive sum, got {weights}")
        total = float(sum(weights))
        self.fields, self.weights = fields, [w / total for w in weights]
        shapes = {f.info.shapes for f in fields}
        if len(shapes) != 1:
            raise ValueError(f"SoftMixField fields disagree on the sample shapes: {shapes}")
        self.info = FieldInfo(name, "soft_mix", fields[0].info.sample_shape,
                              takes_source=any(f.info.takes_source for f in fields), bucket_shapes=fields[0].info.bucket_shapes)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        return sum(w * f.velocity(x, sigma, conditions) for f, w in zip(self.fields, self.weights))
