"""The pieces of one DanceOPD update that every trainer shares (reference and distributed), so that both
draw the same states from the same seeds and compute the same loss."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from danceopd.config import TrainConfig
from danceopd.fields.base import Conditions, VelocityField
from danceopd.fields.operators import CFGField
from danceopd.flow import (SigmaGrids, dense_state_weights, dense_velocity_loss, forward_noise, gather_states, grid_for, rollout_states, rollout_to_queries,
                           per_state_mse, sample_query_indices, sigma_schedule, velocity_mse)
from danceopd.seeding import derive_seed, generator
from danceopd.suite import CapabilitySuite


@dataclass
class QueryBatch:
    x: torch.Tensor  # [B*K, C, H, W] queried states
    sigma: torch.Tensor  # [B*K]
    conditions: Conditions  # repeated K times, sample-major
    dt: torch.Tensor  # [B*K] step size at each queried state (dense loss weight)
    x0: torch.Tensor | None = None  # dataset targets (off-policy only)
    eps: torch.Tensor | None = None
    rollout_rows: int = 0  # velocity rows the rollout computed (a full rollout: B * N)

    def state_chunks(self, states_per_backward: int | None) -> list[slice]:
        """The rows the student predicts per forward + backward (optim.states_per_backward; one chunk: all of them)."""
        n = self.x.shape[0]
        size = states_per_backward or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def inputs(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, Conditions]:
        """The student's (x, sigma, conditions) at `rows` (all rows: the batch itself, not a copy)."""
        if rows == slice(0, self.x.shape[0]):
            return self.x, self.sigma, self.conditions
        return self.x[rows], self.sigma[rows], self.conditions.select(rows)


@dataclass
class MicroBatch:
    """A micro-batch ready to train on: its route, its query states, and the teacher's velocity at them (a
    PendingCall still in flight, or Resolved)."""

    route: str
    q: QueryBatch
    target: Any
    rank: int = 0  # the worker it belongs to (the reference trainer can stand for several: world_size)


def refills(cfg: TrainConfig, step: int) -> bool:
    """Under method.staleness, whether `step` is rolled out fresh (with the weights it trains): at every checkpoint,
    so that a run resumed there computes exactly what the uninterrupted run computed."""
    return step % cfg.checkpoint_every == 0 or step >= cfg.steps


def query_batch(cfg: TrainConfig, suite: CapabilitySuite, sigmas: torch.Tensor | SigmaGrids, roller: VelocityField, route: str,
                cond: Conditions, step: int, rank: int, micro: int, device: torch.device) -> QueryBatch:
    """The states to query: from a no-grad rollout of `roller` (the current student on-policy, the teacher for
    teacher_rollout) or forward-noised dataset targets (off_policy); K per sample at the configured position. The
    batch's shape is its aspect-ratio bucket's (cond.shape) where it has one, with that shape's grid."""
    m, b = cfg.method, len(cond)
    sigmas = grid_for(sigmas, cond.shape)
    n = len(sigmas) - 1
    k = n if m.query_position == "dense" else m.k
    idx = sample_query_indices(n, b, k, m.query_position, generator(cfg.seed, "query", step, rank, micro), m.query_sampling)
    k = idx.shape[1]  # distinct sampling with K > N queries every state once
    shape = cond.shape or roller.info.sample_shape
    noise = torch.randn(b, *shape, generator=generator(cfg.seed, "noise", step, rank, micro)).to(device)
    cond_dev = cond.to(device)
    dt = (sigmas[idx] - sigmas[idx + 1]).reshape(-1)
    sigma = sigmas[idx].reshape(-1)
    if m.states == "off_policy":
        x0k, eps = dataset_states(cfg, suite, route, cond, k, step, rank, micro, device)
        return QueryBatch(forward_noise(x0k, eps, sigma), sigma, cond_dev.repeat(k), dt, x0k, eps)
    off = round(m.off_policy_share * b)  # the first samples' states come from the data path instead of the rollout
    if cfg.execution.truncate_rollout:
        q = rollout_to_queries(lambda x, s, rows: roller.velocity(x, s, cond_dev.select(rows)), noise, sigmas, idx,
                               skip=torch.arange(b) < off, chunk=rollout_chunk(cfg, noise.device) if m.states == "on_policy" else None)
        x, rows = q.x, q.rows_evaluated
    else:  # the full rollout: every state of every sample, then the queried ones
        traj = rollout_states(lambda x, s: roller.velocity(x, s, cond_dev), noise, sigmas)
        x, rows = gather_states(traj.states, traj.sigmas, idx)[0], b * n
    if off:
        x0k, eps = dataset_states(cfg, suite, route, cond.select(slice(0, off)), k, step, rank, micro, device)
        x = torch.cat([forward_noise(x0k, eps, sigma[:off * k]).to(x.dtype), x[off * k:]])
    return QueryBatch(x, sigma, cond_dev.repeat(k), dt, rollout_rows=rows)


def rollout_chunk(cfg: TrainConfig, device: torch.device) -> int | None:
    """Rows per student call in a truncated rollout (execution.rollout_chunk; auto: 8 per thread on CPU, at least
    danceopd.flow.solver.MIN_ROWS)."""
    from danceopd.flow.solver import MIN_ROWS

    chunk = cfg.execution.rollout_chunk
    if chunk == "auto":
        return max(MIN_ROWS, 8 * torch.get_num_threads()) if device.type == "cpu" else None
    return chunk


def dataset_states(cfg: TrainConfig, suite: CapabilitySuite, route: str, cond: Conditions, k: int, step: int, rank: int,
                   micro: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset targets x0 (each repeated K times, sample-major) and the noise that forward-noises them."""
    x0 = suite.clean_samples(cfg.routes[route].capability, cond, derive_seed(cfg.seed, "x0", step, rank, micro)).to(device)
    eps = torch.randn(len(cond) * k, *x0.shape[1:], generator=generator(cfg.seed, "eps", step, rank, micro)).to(device)
    return x0.repeat_interleave(k, 0), eps


def distillation_loss(cfg: TrainConfig, pred: torch.Tensor, target: torch.Tensor, q: QueryBatch, num_steps: int) -> torch.Tensor:
    if cfg.method.loss == "dense":
        return dense_velocity_loss(pred, target, q.dt, k=num_steps, weight=cfg.method.dense_weight)
    return velocity_mse(pred, target)


def chunk_loss(cfg: TrainConfig, pred: torch.Tensor, target: torch.Tensor, q: QueryBatch, rows: slice, num_steps: int) -> torch.Tensor:
    """The share of distillation_loss(q) that q's states `rows` carry, `pred` being the student's there: the chunks'
    shares sum to it (to rounding), and one chunk of every row is it, bit for bit."""
    n = q.x.shape[0]
    if rows == slice(0, n):
        return distillation_loss(cfg, pred, target, q, num_steps)
    per_state = per_state_mse(pred, target[rows])
    if cfg.method.loss == "dense":  # sum over each sample's N states, mean over the n / N samples
        return (dense_state_weights(q.dt[rows], num_steps, cfg.method.dense_weight) * per_state).sum() * num_steps / n
    return per_state.sum() / n  # the mean over every element of the n states, each of the same size


def student_guided(cfg: TrainConfig, field: VelocityField) -> VelocityField:
    """The student as it rolls out and predicts: CFG(method.student_cfg_scale) over it (its unconditional pass in the same
    call), or the field itself at 1.0 (bit for bit what it computes without the option)."""
    scale = cfg.method.student_cfg_scale
    return field if scale == 1.0 else CFGField(field, scale, name=field.info.name)


def route_step_losses(parts: list[float], names: list[str], routes: list[str]) -> dict[str, float]:
    """Each route's mean micro-batch loss in one update from its summed shares `parts` (aligned with `names`) of the loss,
    which was divided by every micro-batch (len(routes), the update's route per micro-batch): the update's loss under one
    route, each group's own mean under routing groups."""
    counts = {r: routes.count(r) for r in names}
    return {r: parts[i] if counts[r] == len(routes) else parts[i] * len(routes) / counts[r] for i, r in enumerate(names) if counts[r]}


def step_routes(cfg: TrainConfig, route: str | None = None) -> list[str]:
    """The route of each micro-batch of one rank's update: routing groups: each group route for grad_accum micro-batches,
    in order; otherwise `route` (the update's hard route) for all grad_accum."""
    groups = cfg.group_routes()
    return [g for g in groups for _ in range(cfg.optim.grad_accum)] if groups else [route] * cfg.optim.grad_accum


def run_sigmas(cfg: TrainConfig, student) -> SigmaGrids:
    """The rollout grid per sample shape: uniform / SD3-shifted, or the student family's own (method.schedule: family;
    one per aspect-ratio bucket where its shift follows the token count)."""
    m = cfg.method
    if m.schedule == "family":
        return SigmaGrids(lambda shape: student.family.default_sigmas(student.pipe, m.rollout_steps, shape or student.field.info.sample_shape))
    grid = sigma_schedule(m.rollout_steps, m.schedule, m.shift)
    return SigmaGrids(lambda shape: grid)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine down to min_lr_ratio x lr at cfg.steps."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_schedule == "cosine":
        t = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return o.lr


@dataclass
class StepTimes:
    """Seconds spent in each part of an update (summed over micro-batches and steps)."""

    rollout: float = 0.0
    teacher: float = 0.0  # waiting for the teacher's velocity (in-process call or network round trip)
    forward_backward: float = 0.0  # includes DDP's gradient all-reduce, which overlaps the backward pass
    optimizer: float = 0.0
    router: float = 0.0  # assignment and loss-report calls (distributed trainer only)

    def total(self) -> float:
        return sum(asdict(self).values())

    def add(self, other: "StepTimes") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def shares(self) -> dict[str, float]:
        tot = max(self.total(), 1e-9)
        return {k: v / tot for k, v in asdict(self).items()}

    @contextmanager
    def time(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - t0)


class NonFiniteSteps:
    """Updates whose loss or gradient is not finite (an overflow, a teacher answering NaN) are skipped: the weights,
    optimizer and EMA keep their state, the step counts as done, and the loss is not reported. `limit` of them in a
    row stop the run: by then the weights themselves are broken, or the data is, and replaying cannot help. On the
    distributed trainer the decision is taken from the all-reduced gradient norm, so every rank takes the same one."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def check(self, *values: float) -> bool:
        """Whether this update may be applied (all `values` finite); counts it otherwise."""
        if all(math.isfinite(v) for v in values):
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.in_row >= self.limit

    def skipped(self, step: int, route: str, loss: float, grad_norm: float) -> str:
        return (f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'} on route {route} "
                f"(loss {loss}, gradient norm {grad_norm}): update skipped ({self.in_row} in a row, {self.total} in all)")

    def stop_message(self, step: int) -> str:
        return (f"stopped at step {step + 1}: {self.in_row} updates in a row had a non-finite loss or gradient "
                f"(optim.max_nonfinite_steps={self.limit}). The weights were last changed by a finite update; lower optim.lr, "
                "check the teachers' answers, or resume from an earlier checkpoint")


def window_stats(cfg: TrainConfig, step: int, steps_done: int, elapsed: float, end: int, counts: dict[str, float],
                 grad_norms: list[float]) -> dict:
    """What a progress window records besides its losses and time shares (both trainers): samples/s and ETA since
    this start, the learning rate of its last update, the mean gradient norm of its applied updates and each route's
    share of them (`counts`: applied updates per route)."""
    eta = elapsed / max(steps_done, 1) * (end - step)
    if cfg.max_minutes is not None:
        eta = min(eta, max(0.0, cfg.max_minutes * 60 - elapsed))
    updates = sum(counts.values())
    return {"samples_per_s": steps_done * cfg.optim.batch_size * cfg.optim.grad_accum / max(elapsed, 1e-9), "eta_s": eta,
            "lr": lr_at(cfg, step - 1), "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
            "route_mix": {r: counts.get(r, 0) / updates for r in cfg.routes} if updates else {}}


def training_extent(cfg: TrainConfig, steps_done: int) -> dict:
    """How far a run got against its plan, for report.json's `training`: a run cut by max_minutes is another run than
    the one its config describes (fewer updates; a cosine schedule stopped before its end), and says so."""
    cut = steps_done < cfg.steps
    return {"steps": steps_done, "steps_planned": cfg.steps, "cut_by_max_minutes": cut,
            "schedule_finished": not cut or cfg.optim.lr_schedule == "constant"}


def cut_note(cfg: TrainConfig, steps_done: int) -> str | None:
    """The console line of a run cut by max_minutes (None for a run that did every step)."""
    if steps_done >= cfg.steps:
        return None
    schedule = (f", and its {cfg.optim.lr_schedule} learning-rate schedule stopped before its end"
                if cfg.optim.lr_schedule != "constant" else "")
    return (f"note: cut by max_minutes={cfg.max_minutes:g} after {steps_done} of {cfg.steps} steps{schedule}: the results are "
            "those of a shorter run than the config plans")


def format_progress(step: int, end: int, losses: dict[str, float], samples_per_s: float, shares: dict[str, float], eta_s: float) -> str:
    loss_txt = " ".join(f"{r}={v:.4f}" for r, v in sorted(losses.items()))
    parts = " ".join(f"{k.replace('forward_backward', 'fwd/bwd')} {v:.0%}" for k, v in shares.items() if v > 0.005)
    return f"step {step:>5}/{end}  loss {loss_txt}  {samples_per_s:6.1f} samples/s  {parts}  ETA {eta_s / 60:4.1f} min"


def routing_config(cfg: TrainConfig, world_size: int, batch_size: int, teacher=lambda route: route) -> dict:
    """The router's view of a run (router.config.RoutingConfig): one route per update for all ranks and
    micro-batches, drawn by weight (hard) or by weights that follow the routes' losses (adaptive)."""
    policy = cfg.method.routing if cfg.method.routing in ("adaptive", "groups") else "hard"
    return {"policy": policy, "seed": cfg.seed, "world_size": world_size, **({"groups": cfg.group_routes()} if policy == "groups" else {}),
            "micro_batches": cfg.optim.grad_accum, "batch_size": batch_size,
            "routes": {n: {"teacher": teacher(n), "bucket": r.capability or n, "weight": r.weight} for n, r in cfg.routes.items()}}
