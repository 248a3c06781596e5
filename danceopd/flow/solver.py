"""Euler ODE solver over any velocity function, keeping the states it visits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x[B,...], sigma[B]) -> v[B,...]


@dataclass
class Trajectory:
    states: torch.Tensor  # [N, B, ...]: x at sigmas[0..N-1] (high noise to low noise)
    sigmas: torch.Tensor  # [N + 1], the schedule (last is the terminal sigma, usually 0)
    final: torch.Tensor  # [B, ...]: x at sigmas[N]

    @property
    def num_steps(self) -> int:
        return self.states.shape[0]


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
    """x <- x + (sigma_next - sigma) v (sigma decreasing)."""
    return x + (sigma_next - sigma) * v


def rollout_states(velocity: VelocityFn, x_init: torch.Tensor, sigmas: torch.Tensor) -> Trajectory:
    """Integrate from x_init at sigmas[0] down the schedule; returns every visited state and the end point.

    Runs under no_grad: a DanceOPD rollout is a query-state generator, never a target to differentiate.
    """
    sigmas = sigmas.to(device=x_init.device, dtype=torch.float32)
    states = []
    x = x_init
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            states.append(x)
            s = sigmas[i].expand(x.shape[0])
            v = velocity(x, s)
            x = euler_step(x, v.to(x.dtype), sigmas[i].to(x.dtype), sigmas[i + 1].to(x.dtype))
    return Trajectory(torch.stack(states), sigmas, x)
