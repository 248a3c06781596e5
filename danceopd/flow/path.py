"""The rectified-flow path shared with diffusers' flow-match models."""

from __future__ import annotations

import torch


def _b(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps."""
    s = _b(sigma, x0)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0 (d x_sigma / d sigma)."""
    return eps - x0


def clean_estimate(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0_hat = x - sigma v."""
    return x - _b(sigma, x) * v
