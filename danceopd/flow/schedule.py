"""Sigma schedules. sigma = 1 is pure noise, sigma = 0 clean data; a schedule of N steps is N + 1 values,
decreasing, ending at 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

ScheduleKind = Literal["uniform", "sd3"]


def shift_sigmas(sigmas: np.ndarray | torch.Tensor, shift: float):
    """SD3's time shift: sigma -> shift * sigma / (1 + (shift - 1) * sigma); shift > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The schedule of diffusers' FlowMatchEulerDiscreteScheduler(shift=shift) for `num_steps` (static shift).

    Reproduces the scheduler exactly, including its choice of the last non-zero sigma (the shifted
    1/num_train_timesteps value, shifted once more).
    """
    train_sigmas = torch.from_numpy(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()) / num_train_timesteps
    train_sigmas = shift_sigmas(train_sigmas, shift)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = torch.from_numpy(shift_sigmas(t / num_train_timesteps, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def uniform_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """N equal steps from 1 to 0 (optionally shifted): states at 1, (N-1)/N, ..., 1/N."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if shift != 1.0:
        sigmas = shift_sigmas(sigmas, shift)
    return sigmas.to(torch.float32)


def sigma_schedule(num_steps: int, kind: ScheduleKind = "uniform", shift: float = 1.0) -> torch.Tensor:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "sd3":
        return sd3_sigmas(num_steps, shift)
    if kind == "uniform":
        return uniform_sigmas(num_steps, shift)
    raise ValueError(f"unknown schedule kind {kind!r}: use 'uniform' or 'sd3'")


class SigmaGrids:
    """A run's sigma grid for each sample shape: `grid(shape)` once per shape, kept. Under the family's own schedule the
    grid depends on the image's token count (FLUX, Qwen-Image: the shift mu), so each aspect-ratio bucket gets its own;
    the uniform and SD3 grids are the same for every shape. shape None: the field's default."""

    def __init__(self, grid: Callable[[tuple[int, int, int] | None], torch.Tensor], device: torch.device | str | None = None):
        self.grid, self.device = grid, device
        self._cache: dict = {}

    def __call__(self, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        key = None if shape is None else tuple(shape)
        if key not in self._cache:
            g = self.grid(key)
            self._cache[key] = g if self.device is None else g.to(self.device)
        return self._cache[key]

    def to(self, device: torch.device | str) -> "SigmaGrids":
        return SigmaGrids(self.grid, device)

    def __len__(self) -> int:  # the number of states + 1, the same for every shape
        return len(self())


def grid_for(sigmas: "torch.Tensor | SigmaGrids", shape: tuple[int, int, int] | None) -> torch.Tensor:
    """The grid for one shape from a tensor (every shape) or SigmaGrids."""
    return sigmas(shape) if isinstance(sigmas, SigmaGrids) else sigmas
