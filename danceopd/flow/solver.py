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


RowVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x[m,...], sigma[m], rows[m]) -> v[m,...]

# A row's velocity must not depend on how many rows share its call, and on MKL it does: the per-sample GEMMs
# (timestep and pooled-text embeddings, one row per sample) take other kernels for few rows, which round differently
# (measured: ~1e-6). Which counts differ depends on the processor and the model: on an AVX2 machine below 4 rows, and
# with 2 threads at 5-7 and 9-11; on an AVX-512 one (2026-12) every count up to 10 for the suite's model and tiny SD3 /
# FLUX, up to 15 for tiny Z-Image (and odd counts up to 31 at 2 threads), while multiples of 4 from 16 on agree with
# each other (the first differing layer: the timestep embedding's first linear layer, [M, 256] x [256, d]). So a batch
# that is a multiple of ROW_QUANTUM and holds at least MIN_ROWS rows shrinks in multiples of the
# quantum, never below MIN_ROWS (padded with rows that have finished, whose new states are discarded), and chunks of a
# call hold at least MIN_ROWS rows too: that matches the full batch bit for bit at 1 and 2 threads on both; any other
# batch keeps its full size until no row needs more steps. tests/test_flow.py, tests/test_trainer.py and
# tests/test_models.py check it on the suite's model and on every family's tiny pipeline.
ROW_QUANTUM = 4
MIN_ROWS = 16


@dataclass
class QueriedStates:
    x: torch.Tensor  # [B*K, ...]: the queried states, sample-major (b0k0, b0k1, ...)
    sigma: torch.Tensor  # [B*K]
    rows_evaluated: int  # velocity rows computed; a full rollout computes B * N


def rollout_to_queries(velocity: RowVelocityFn, x_init: torch.Tensor, sigmas: torch.Tensor, index: torch.Tensor,
                       skip: torch.Tensor | None = None, chunk: int | None = None, row_quantum: int = ROW_QUANTUM) -> QueriedStates:
    """The states at `index` [B, K] of the Euler rollout from x_init, integrating each sample only down to its
    deepest queried state: samples leave the batch as they pass it, and the final step (whose end point no query
    reads) never runs. Bit-identical to gather_states(rollout_states(...).states, ...) (see ROW_QUANTUM).

    `skip` [B] marks samples whose states are not wanted (they leave at once; their rows of x are NaN).
    `velocity` gets the rows still rolling out and `rows` [m]: their positions in x_init; at most `chunk` rows
    a call when given (a multiple of the row quantum, used when the batch shrinks).
    """
    if chunk is not None and (chunk < MIN_ROWS or chunk % row_quantum):
        raise ValueError(f"chunk must be a multiple of {row_quantum} rows and at least {MIN_ROWS}, got {chunk}")
    dev = x_init.device
    sigmas = sigmas.to(device=dev, dtype=torch.float32)
    index = index.cpu()  # the bookkeeping stays on the host: no device sync per step
    b, k = index.shape
    deepest = index.amax(dim=1)
    if skip is not None:
        deepest = deepest.masked_fill(skip.cpu(), -1)
    shrink = b % row_quantum == 0 and b >= MIN_ROWS  # else the batch keeps its size and order until no row needs another step
    order = torch.argsort(deepest, descending=True, stable=True) if shrink else torch.arange(b)  # going rows: a prefix
    position = torch.empty_like(order)
    position[order] = torch.arange(b)
    need = deepest[order]
    flat = index.reshape(-1)
    owner = position[torch.arange(b * k) // k]  # each query's row in the sorted batch
    x = x_init[order.to(dev)] if shrink else x_init.clone()
    out = torch.full((b * k, *x_init.shape[1:]), float("nan"), dtype=x_init.dtype, device=dev)
    rows = 0
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            hit = ((flat == i) & (need[owner] >= i)).nonzero().squeeze(1)
            if hit.numel():
                out[hit.to(dev)] = x[owner[hit].to(dev)]
            active = int((need > i).sum())
            if active == 0:
                break
            m = min(b, max(MIN_ROWS, -(-active // row_quantum) * row_quantum)) if shrink else b
            c = chunk if chunk and shrink else m
            ends = [*range(c, m, c), m]
            if len(ends) > 1 and m - ends[-2] < MIN_ROWS:  # a short last chunk joins the one before it
                del ends[-2]
            for j, e in zip([0, *ends[:-1]], ends):
                v = velocity(x[j:e], sigmas[i].expand(e - j), order[j:e])
                x[j:e] = euler_step(x[j:e], v.to(x.dtype), sigmas[i].to(x.dtype), sigmas[i + 1].to(x.dtype))
            rows += m
    return QueriedStates(out, sigmas[flat.to(dev)], rows)
