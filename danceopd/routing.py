"""Routing policies: which capability field supervises each update. Deterministic functions of the run
seed and the step, so a retried or resumed step is routed exactly as before."""

from __future__ import annotations

import numpy as np

from danceopd.seeding import derive_seed


class HardRouter:
    """The paper's hard routing: one route per optimizer step, drawn by weight (uniform by default)."""

    def __init__(self, routes: dict[str, float], seed: int):
        if not routes:
            raise ValueError("routing needs at least one route")
        bad = {k: w for k, w in routes.items() if not (w >= 0)}
        if bad or sum(routes.values()) <= 0:
            raise ValueError(f"route weights must be >= 0 with a positive sum, got {routes}")
        self.names = list(routes)
        w = np.asarray([routes[n] for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = seed

    def route(self, step: int) -> str:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng = np.random.default_rng(derive_seed(self.seed, "route", step))
        return self.names[int(rng.choice(len(self.names), p=self.probs))]
