"""Per-teacher metrics, exported in Prometheus format through Ray's metrics port.

Ray prefixes application metrics with `ray_` on export, e.g. `ray_danceopd_teacher_queries_total`.
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class TeacherMetrics:
    def __init__(self, teacher: str):
        self.tags = {"teacher": teacher}
        self.queries = metrics.Counter("danceopd_teacher_queries", "Velocity queries answered", tag_keys=("teacher",))
        self.samples = metrics.Counter("danceopd_teacher_samples", "Samples (rows) answered", tag_keys=("teacher",))
        self.errors = metrics.Counter("danceopd_teacher_errors", "Failed queries by kind", tag_keys=("teacher", "kind"))
        self.latency = metrics.Histogram("danceopd_teacher_latency_seconds", "Query latency in the replica (queue + model)",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("teacher",))
        self.batch = metrics.Histogram("danceopd_teacher_batch_samples", "Samples per model call (after merging)",
                                       boundaries=BATCH_BOUNDARIES, tag_keys=("teacher",))
        self.queue = metrics.Gauge("danceopd_teacher_queue_depth", "Queries waiting in this replica", tag_keys=("teacher",))
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
