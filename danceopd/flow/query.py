"""Which states of a rollout are queried: indices into the N visited states (0 = sigma 1, N-1 = lowest noise)."""

from __future__ import annotations

from typing import Literal

import torch

QueryPosition = Literal["low", "mid", "high", "uniform", "stratified", "dense"]

# Beta(a, b) laws of u in index = floor(u * N): low noise is the high index end.
BETA_LAWS: dict[str, tuple[float, float]] = {"low": (5.0, 2.0), "mid": (5.0, 5.0), "high": (2.0, 5.0)}
POSITIONS = ("low", "mid", "high", "uniform", "stratified", "dense")


QuerySampling = Literal["distinct", "iid"]
REJECTION_ROUNDS = 50  # distinct Beta draws: up to 50 K candidates per sample, then uniform fill (the official toolkit's bound)


def sample_query_indices(num_steps: int, batch: int, k: int, position: QueryPosition = "low",
                         generator: torch.Generator | None = None, sampling: QuerySampling = "iid") -> torch.Tensor:
    """[batch, k] indices in [0, num_steps). `dense` ignores k and returns every index (k = num_steps).

    low / mid / high: u ~ Beta(5,2) / Beta(5,5) / Beta(2,5), index = floor(u * N). uniform: index uniform over the N
    states. stratified: one draw in each of K equal strata of [0, 1).

    sampling `iid`: K independent draws per sample (indices may repeat). `distinct` (the official DanceOPD toolkit's
    rule): K different indices per sample, sorted: the first K distinct values of a sequence of draws (Beta laws: at
    most 50 K draws, then uniform indices fill up; uniform: K of the N without replacement); with K = 1 the two are the
    same draw, and K >= N gives every index. Stratified draws are sorted and, for K <= N, already distinct.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown query position {position!r}: choose from {list(POSITIONS)}")
    if sampling not in ("distinct", "iid"):
        raise ValueError(f"unknown query sampling {sampling!r}: use 'distinct' or 'iid'")
    if num_steps < 1 or batch < 0 or k < 1:
        raise ValueError(f"need num_steps >= 1, batch >= 0, k >= 1 (got {num_steps}, {batch}, {k})")
    if position == "dense" or (sampling == "distinct" and k >= num_steps):
        return torch.arange(num_steps).expand(batch, num_steps).clone()
    if sampling == "distinct" and k > 1 and position != "stratified":
        return _distinct(num_steps, batch, k, position, generator)
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


def _distinct(num_steps: int, batch: int, k: int, position: str, generator: torch.Generator | None) -> torch.Tensor:
    """K distinct sorted indices per sample: the first K distinct values of REJECTION_ROUNDS x K draws of the law (the
    law of drawing until K are distinct), then, where a sample still lacks some, the first new ones of a uniform
    sequence; uniform itself is a random permutation's first K (sampling without replacement)."""
    out = torch.empty(batch, k, dtype=torch.long)
    if position == "uniform":
        for i in range(batch):
            out[i] = torch.randperm(num_steps, generator=generator)[:k].sort().values
        return out
    a, b = BETA_LAWS[position]
    m = REJECTION_ROUNDS * k
    g1, g2 = _gamma(a, (batch, m), generator), _gamma(b, (batch, m), generator)
    draws = ((g1 / (g1 + g2)) * num_steps).floor().clamp(0, num_steps - 1).long()
    for i in range(batch):
        chosen = list(dict.fromkeys(draws[i].tolist()))[:k]
        if len(chosen) < k:  # an improbable run of repeats: fill from uniform indices, as the toolkit does
            rest = [j for j in torch.randperm(num_steps, generator=generator).tolist() if j not in chosen]
            chosen += rest[:k - len(chosen)]
        out[i] = torch.tensor(sorted(chosen))
    return out


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
