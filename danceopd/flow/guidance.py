"""Classifier-free guidance as an operator on velocities."""

from __future__ import annotations

import torch


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_uncond + scale * (v_cond - v_uncond); scale 1 is the conditional field itself."""
    return v_uncond + scale * (v_cond - v_uncond)
