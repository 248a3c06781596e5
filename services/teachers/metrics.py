"""Per-teacher metrics, exported in Prometheus format through Ray's metrics port.

Names and labels come from the metrics contract, danceopd/telemetry.py (Ray exports them as ray_<name>[_total]).
"""

from __future__ import annotations

import danceopd.telemetry as T
from danceopd.telemetry import make

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class TeacherMetrics:
    def __init__(self, teacher: str):
        self.tags = {"teacher": teacher}
        self.queries = make(T.TEACHER_QUERIES)
        self.samples = make(T.TEACHER_SAMPLES)
        self.errors = make(T.TEACHER_ERRORS)
        self.latency = make(T.TEACHER_LATENCY, LATENCY_BOUNDARIES_S)
        self.batch = make(T.TEACHER_BATCH, BATCH_BOUNDARIES)
        self.queue = make(T.TEACHER_QUEUE)
        for m in (self.queries, self.samples, self.latency, self.batch, self.queue):
            m.set_default_tags(self.tags)

    def answered(self, samples: int, seconds: float) -> None:
        self.queries.inc(1)
        self.samples.inc(samples)
        self.latency.observe(seconds)

    def model_call(self, samples: int) -> None:
        self.batch.observe(samples)

    def error(self, kind: str) -> None:
        self.errors.inc(1, tags={**self.tags, "kind": kind})
