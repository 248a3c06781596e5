"""Which states of a rollout are queried: indices into the N visited states (0 = sigma 1, N-1 = lowest noise)."""

from __future__ import annotations

from typing import Literal

import torch

QueryPosition = Literal["low", "mid", "high", "uniform", "stratified", "dense"]

# Beta(a, b) laws of u in index = floor(u * N): low noise is the high index end.
BETA_LAWS: dict[str, tuple[float, float]] = {"low": (5.0, 2.0), "mid": (5.0, 5.0), "high": (2.0, 5.0)}
POSITIONS = ("low", "mid", "high", "uniform", "stratified", "dense")


def sample_query_indices(num_steps: int, batch: int, k: int, position: QueryPosition = "low",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, k] indices in [0, num_steps). `dense` ignores k and returns every index (k = num_steps).

    low / mid / high: u ~ Beta(5,2) / Beta(5,5) / Beta(2,5), index = floor(u * N), K i.i.d. draws.
    uniform: index uniform over the N states. stratified: K draws, one in each of K equal strata of [0, 1).
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown query position {position!r}: choose from {list(POSITIONS)}")
    if num_steps < 1 or batch < 0 or k < 1:
        raise ValueError(f"need num_steps >= 1, batch >= 0, k >= 1 (got {num_steps}, {batch}, {k})")
    if position == "dense":
        return torch.arange(num_steps).expand(batch, num_steps).clone()
    if position in BETA_LAWS:
        a, b = BETA_LAWS[position]
        # Beta from two Gammas via the generator, so that draws are reproducible across processes.
        g1 = _gamma(a, (batch, k), generator)
        g2 = _gamma(b, (batch, k), generator)
        u = g1 / (g1 + g2)
    elif position == "uniform":
        u = torch.rand(batch, k, generator=generator, dtype=torch.float64)
    else:
        u = (torch.arange(k, dtype=torch.float64) + torch.rand(batch, k, generator=generator, dtype=torch.float64)) / k
    return (u * num_steps).floor().clamp(0, num_steps - 1).long()


def _gamma(shape_param: float, size: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(shape_param) samples (shape_param >= 1) by Marsaglia-Tsang, driven by `generator`."""
    d = shape_param - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    n = int(torch.tensor(size).prod())
    out = torch.empty(0, dtype=torch.float64)
    while out.numel() < n:
        m = 2 * (n - out.numel()) + 8
        z = torch.randn(m, generator=generator, dtype=torch.float64)
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        out = torch.cat([out, (d * v)[ok]])
    return out[:n].view(size)


def gather_states(states: torch.Tensor, sigmas: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From states [N, B, ...] and indices [B, K]: (x [B*K, ...], sigma [B*K]); sample-major (b0k0, b0k1, ...)."""
    b, k = index.shape
    batch_idx = torch.arange(b, device=states.device).repeat_interleave(k)
    flat = index.reshape(-1).to(states.device)
    return states[flat, batch_idx], sigmas.to(states.device)[flat]
