"""DanceOPD losses: plain velocity MSE at the queried states."""

from __future__ import annotations

import torch


def velocity_mse(pred: torch.Tensor, target: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Mean squared error over all elements; with K states per sample that is the average over K as well."""
    del k  # every sample has exactly K states, so the global mean already averages over them
    return torch.mean((pred.float() - target.float()) ** 2)


def dense_velocity_loss(pred: torch.Tensor, target: torch.Tensor, dt: torch.Tensor, k: int, weight: str = "dt2") -> torch.Tensor:
    """DiffusionOPD-style dense loss: sum over the K = N states of w_i * per-state MSE, mean over samples.

    pred/target are [B*K, ...] sample-major; dt is [B*K], the step size (sigma_i - sigma_{i+1}) of each state.
    weight `dt2`: w_i = dt_i^2 / 2 (the grid's real steps); `uniform`: w_i = 0.5 / N^2 (the official toolkit's constant,
    which assumes a uniform grid: the two agree there).
    """
    per_state = per_state_mse(pred, target)  # [B*K]
    return (dense_state_weights(dt, k, weight) * per_state).view(-1, k).sum(1).mean()


def per_state_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[rows]: each state's mean squared error over its elements."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def dense_state_weights(dt: torch.Tensor, k: int, weight: str) -> torch.Tensor:
    """w_i of each state of the dense loss (see dense_velocity_loss): [rows], from each state's step size dt."""
    if weight == "uniform":
        return torch.full_like(dt, 0.5 / k ** 2, dtype=torch.float32)
    if weight == "dt2":
        return dt.float() ** 2 / 2
    raise ValueError(f"unknown dense weight {weight!r}: use 'uniform' or 'dt2'")
