"""The router: deterministic, restart-safe hard assignment of every micro-batch to capability routes.

An assignment is a pure function of (run seed, policy, step, rank, micro-batch) and, for the adaptive
policy, of the route weights frozen for that step; the first answer to each request is logged in the store
and returned again on every retry, after a router restart, and (with Redis + AOF) after a Redis restart.
"""

from __future__ import annotations

import math
import time

import numpy as np

from danceopd.remote import RequestError
from danceopd.routing import HardRouter
from danceopd.seeding import derive_seed
from router.config import RoutingConfig
from router.store import MemoryStore, RouterStore


class RouterError(RequestError):
    """Bad request to the router; `field` names the offending input (a 400 by default)."""


class Router:
    def __init__(self, store: RouterStore | None = None):
        self.store = store or MemoryStore()
        self._configs: dict[str, RoutingConfig] = {}

    # ------------------------------------------------------------------------------------ runs
    def register_run(self, run_id: str, config: RoutingConfig | dict) -> dict:
        """Register (or re-attach to) a run. Re-registering with a different config is refused."""
        cfg = config if isinstance(config, RoutingConfig) else RoutingConfig.model_validate(config)
        existing = self.store.get_run(run_id)
        dumped = cfg.model_dump(mode="json")
        if existing is not None:
            if existing["config"] != dumped:
                raise RouterError("config", f"run {run_id!r} is registered with another routing config; use a new run id", 409)
            if existing["status"] != "running":  # a resumed run: running again, its keys kept for good
                existing = {**existing, "status": "running"}
                existing.pop("expires", None)
                self.store.put_run(run_id, existing)
                self.store.keep_run(run_id)
            return existing
        record = {"run": run_id, "config": dumped, "status": "running", "created": time.time()}
        self.store.put_run(run_id, record)
        return record

    def set_status(self, run_id: str, status: str) -> None:
        record = self._record(run_id)
        self.store.put_run(run_id, {**record, "status": status})

    def finish_run(self, run_id: str, status: str, keep_s: float) -> dict:
        """The run ended (`finished` or `failed`): its log and statistics are kept `keep_s` seconds more, then expire
        (Redis TTLs), so that a long-lived store does not grow with every run ever trained."""
        if status not in ("finished", "failed"):
            raise RouterError("status", f"must be 'finished' or 'failed', got {status!r}")
        record = {**self._record(run_id), "status": status, "expires": time.time() + keep_s}
        self.store.put_run(run_id, record)
        self.store.expire_run(run_id, keep_s)
        return record

    def config(self, run_id: str) -> RoutingConfig:
        if run_id not in self._configs:
            self._configs[run_id] = RoutingConfig.model_validate(self._record(run_id)["config"])
        return self._configs[run_id]

    def _record(self, run_id: str) -> dict:
        record = self.store.get_run(run_id)
        if record is None:
            raise RouterError("run", f"unknown run {run_id!r}; registered: {self.store.list_runs()}", 404)
        return record

    # ------------------------------------------------------------------------------------ assignments
    def assign(self, run_id: str, step: int, rank: int = 0, micro: int = 0) -> dict:
        cfg = self.config(run_id)
        if not isinstance(step, int) or step < 0:
            raise RouterError("step", f"must be an integer >= 0, got {step!r}")
        if not isinstance(rank, int) or not 0 <= rank < cfg.world_size:
            raise RouterError("rank", f"must be in [0, {cfg.world_size}) for this run, got {rank!r}")
        if not isinstance(micro, int) or not 0 <= micro < cfg.slots:
            raise RouterError("micro", f"must be in [0, {cfg.slots}) for this run, got {micro!r}")
        value = self._compute(run_id, cfg, step, rank, micro)
        stored, _ = self.store.get_or_set_assignment(run_id, f"{step}:{rank}:{micro}", value)
        return stored

    def assign_steps(self, run_id: str, first_step: int, count: int, rank: int = 0) -> list[list[dict]]:
        """The assignments of `count` consecutive steps for one rank (every micro-batch of each), in one call: what a
        trainer asks ahead under hard routing, where an assignment is a pure function of the step. Adaptive weights
        follow the reported losses, so there only one step at a time can be answered."""
        cfg = self.config(run_id)
        if not isinstance(count, int) or not 1 <= count <= 1024:
            raise RouterError("count", f"must be an integer in [1, 1024], got {count!r}")
        if cfg.policy == "adaptive" and count > 1:
            raise RouterError("count", "adaptive weights follow the reported losses: ask for one step at a time (count 1)")
        if not isinstance(first_step, int) or first_step < 0:
            raise RouterError("step", f"must be an integer >= 0, got {first_step!r}")
        return [[self.assign(run_id, s, rank, m) for m in range(cfg.slots)] for s in range(first_step, first_step + count)]

    def weights(self, run_id: str, step: int | None = None) -> dict[str, float]:
        """Route weights in force (for the adaptive policy: as they stand now, or frozen at `step`)."""
        cfg = self.config(run_id)
        if cfg.policy != "adaptive":
            total = sum(r.weight for r in cfg.routes.values())
            return {n: r.weight / total for n, r in cfg.routes.items()}
        current = adaptive_weights(cfg, self.store.get_loss_stats(run_id))
        return current if step is None else self.store.get_or_set_weights(run_id, step, current)

    def _compute(self, run_id: str, cfg: RoutingConfig, step: int, rank: int, micro: int) -> dict:
        b = cfg.batch_size
        names = list(cfg.routes)
        weights = self.weights(run_id, step)
        soft = None
        if cfg.policy in ("hard", "soft", "adaptive"):
            route = HardRouter(weights, cfg.seed).route(step)  # one route per update: all ranks, all micro-batches
            sample_routes = [route] * b
            if cfg.policy == "soft":
                soft = weights
        elif cfg.policy == "groups":  # each group's route for micro_batches consecutive micro-batches, on every rank
            route = cfg.groups[micro // cfg.micro_batches]
            sample_routes = [route] * b
        else:  # per_sample
            rng = np.random.default_rng(derive_seed(cfg.seed, "sample-route", step, rank, micro))
            p = np.asarray([weights[n] for n in names])
            sample_routes = [names[i] for i in rng.choice(len(names), size=b, p=p / p.sum())]
            route = None
        counts: dict[str, int] = {}
        for r in sample_routes:
            counts[r] = counts.get(r, 0) + 1
        used = sorted(set(sample_routes) | (set(soft) if soft else set()))
        return {
            "run": run_id, "step": step, "rank": rank, "micro": micro, "policy": cfg.policy,
            "route": route, "sample_routes": sample_routes, "route_samples": counts,
            "teachers": {r: cfg.routes[r].teacher for r in used}, "buckets": {r: cfg.routes[r].bucket for r in used},
            "soft_weights": soft, "weights": weights,
            # Same derivation as the reference trainer: a worker draws exactly what it would draw alone.
            "data_seed": derive_seed(cfg.seed, "batch", step, rank, micro),
        }

    # ------------------------------------------------------------------------------------ losses
    def report_loss(self, run_id: str, step: int, route: str, loss: float) -> dict:
        """Fold a step's loss into its route's statistics, once per step: the first report of a step counts, later ones
        (retries, other ranks, steps redone after a restart) are ignored, so the statistics, and the adaptive weights
        drawn from them, are a function of the steps' losses alone."""
        cfg = self.config(run_id)
        if route not in cfg.routes:
            raise RouterError("route", f"unknown route {route!r}; this run has {sorted(cfg.routes)}")
        if not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
            raise RouterError("loss", f"must be a finite number >= 0, got {loss!r}")
        if not isinstance(step, int) or step < 0:
            raise RouterError("step", f"must be an integer >= 0, got {step!r}")
        a, warm = cfg.adaptive.ema, cfg.adaptive.warmup_reports

        def update(old: dict | None) -> dict:
            if old is not None and step <= old["last_step"]:  # a retry, another rank, or a step replayed after a restart
                return old
            s = old or {"count": 0, "ema": None, "scale_sum": 0.0, "scale": None}
            s["count"] += 1
            s["ema"] = loss if s["ema"] is None else a * s["ema"] + (1 - a) * loss
            if s["count"] <= warm:  # the route's own scale: the mean of its first reports
                s["scale_sum"] += loss
                s["scale"] = s["scale_sum"] / s["count"]
            s["last"], s["last_step"] = loss, step
            return s

        return self.store.update_loss_stats(run_id, route, update)

    def report_losses(self, run_id: str, reports: list[tuple[int, str, float]]) -> dict:
        """Several (step, route, loss) reports in one call, in order; returns the last route's statistics."""
        if not isinstance(reports, (list, tuple)) or not all(isinstance(r, (list, tuple)) and len(r) == 3 for r in reports):
            raise RouterError("reports", "must be a list of [step, route, loss] triples")
        out: dict = {}
        for step, route, loss in reports:
            out = self.report_loss(run_id, step, route, loss)
        return out

    def summary(self, run_id: str, recent: int = 20) -> dict:
        record = self._record(run_id)
        return {"run": run_id, "status": record["status"], "policy": record["config"]["policy"],
                "counts": self.store.route_counts(run_id), "weights": self.weights(run_id),
                "losses": self.store.get_loss_stats(run_id), "recent": self.store.recent_assignments(run_id, recent)}


def adaptive_weights(cfg: RoutingConfig, stats: dict[str, dict]) -> dict[str, float]:
    """p_r = softmax_r(log prior_r + l_r / T), l_r = EMA loss_r / its own scale, then raised to the floor.

    A route whose loss stays at its starting level (l = 1) gains weight over routes that have learned
    (l -> 0); a route without `warmup_reports` reports yet counts as l = 1 (neutral).
    """
    names = list(cfg.routes)
    a = cfg.adaptive
    prior = np.asarray([max(cfg.routes[n].weight, 1e-12) for n in names], dtype=np.float64)
    ell = []
    for n in names:
        s = stats.get(n)
        if not s or s["count"] < a.warmup_reports or not s.get("scale"):
            ell.append(1.0)
        else:
            ell.append(s["ema"] / s["scale"])
    z = np.log(prior / prior.sum()) + np.asarray(ell) / a.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return {n: float(v) for n, v in zip(names, apply_floor(p, a.floor))}


def apply_floor(p: np.ndarray, floor: float) -> np.ndarray:
    """Raise every share below `floor` to it and rescale the others (water-filling); shares already above
    the floor everywhere are returned unchanged, so the prior stays the prior."""
    p = p.astype(np.float64).copy()
    fixed = np.zeros(len(p), dtype=bool)
    while True:
        low = (p < floor) & ~fixed
        if not low.any():
            return p
        fixed |= low
        p[fixed] = floor
        free = ~fixed
        p[free] = p[free] / p[free].sum() * (1 - floor * fixed.sum())
