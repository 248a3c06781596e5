"""Trainer metrics (rank 0, once per log window), exported through Ray's metrics port like the services'.

Names and labels come from the metrics contract (danceopd/telemetry.py); the training dashboard reads them.
"""

from __future__ import annotations

import time

import danceopd.telemetry as T
from danceopd.telemetry import make


class TrainerMetrics:
    def __init__(self, run_id: str, route_capability: dict[str, str]):
        self.run, self.capability = run_id, route_capability
        self.step = make(T.TRAINER_STEP)
        self.loss = make(T.TRAINER_LOSS)
        self.route_steps = make(T.TRAINER_ROUTE_STEPS)
        self.samples_per_s = make(T.TRAINER_SAMPLES_PER_S)
        self.step_time = make(T.TRAINER_STEP_TIME)
        self.checkpoint_time = make(T.TRAINER_CHECKPOINT_TIME)
        self.nonfinite = make(T.TRAINER_NONFINITE)

    def _route(self, route: str) -> dict:
        # a route fed by data (no suite capability) is labelled with its own name: Ray refuses a None tag value
        return {"run": self.run, "route": route, "capability": self.capability[route] or route}

    def window(self, step: int, losses: dict[str, float], route_steps: dict[str, int], samples_per_s: float,
               seconds_per_step: dict[str, float], skipped: dict[str, int]) -> None:
        self.step.set(step, tags={"run": self.run})
        for route in self.capability:  # 0 for every route until one is skipped: the dashboard shows 0, not "no data"
            self.nonfinite.set(skipped.get(route, 0), tags=self._route(route))
        for route, value in losses.items():
            self.loss.set(value, tags=self._route(route))
        for route, n in route_steps.items():
            if n:
                self.route_steps.inc(n, tags=self._route(route))
        self.samples_per_s.set(samples_per_s, tags={"run": self.run})
        for part, seconds in seconds_per_step.items():
            self.step_time.set(seconds, tags={"run": self.run, "part": part})

    def checkpointed(self) -> None:
        self.checkpoint_time.set(time.time(), tags={"run": self.run})
