"""Probes run on a trained student beside the judges."""

from __future__ import annotations

import torch

from danceopd.fields.base import Conditions, VelocityField
from danceopd.flow import forward_noise
from danceopd.seeding import generator
from danceopd.suite import CapabilitySuite


@torch.no_grad()
def effective_guidance(student: VelocityField, suite: CapabilitySuite, alpha: float, betas: list[float], n: int = 64,
                       seed: int = 0, device="cpu", sigma_range: tuple[float, float] = (0.3, 0.9)) -> dict[str, float]:
    """The guidance scale the student applies when sampled with CFG scale beta, in units of the exact fields.

    With v_c / v_u the exact conditional / unconditional T2I velocities and s_c / s_u the student's, the student's
    guided velocity s_u + beta (s_c - s_u) is fitted as v_u + w (v_c - v_u) by least squares over noised
    reference states, sigma uniform in `sigma_range` (default [0.3, 0.9], where both fields are smooth).
    Absorption predicts w = alpha beta.
    """
    cond = suite.bucket("t2i").evaluation_set(n, seed=seed)
    cond = Conditions(cond.prompts[:n])
    g = generator(seed, "cfg-probe")
    x0 = suite.clean_samples("t2i", cond, seed)
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(len(cond), generator=g)
    x = forward_noise(x0, torch.randn(x0.shape, generator=g), sigma)
    uncond = Conditions([""] * len(cond))
    t2i = suite.field("t2i")
    v_c, v_u = t2i.velocity(x, sigma, cond), t2i.velocity(x, sigma, uncond)
    xd, sd = x.to(device), sigma.to(device)
    s_c = student.velocity(xd, sd, cond).float().cpu()
    s_u = student.velocity(xd, sd, uncond).float().cpu()
    d = (v_c - v_u).flatten()
    out = {}
    for beta in betas:
        w = float(((s_u + beta * (s_c - s_u) - v_u).flatten() @ d) / (d @ d))
        out[f"w_b{beta:g}"] = w
        out[f"ratio_b{beta:g}"] = w / (alpha * beta)
    return out
