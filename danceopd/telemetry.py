"""The metrics contract: every metric the services and the trainer export, with its labels.

Exporters (services/teachers/metrics.py, router/deployment.py, trainer/metrics.py) create their metrics from
these specs, and the Grafana dashboards (deploy/grafana/generate.py) are written against them, so a
dashboard cannot name a metric the code does not export. Ray adds the `ray_` prefix on export (and
`_total` to counters): `danceopd_teacher_queries` is scraped as `ray_danceopd_teacher_queries_total`.

Labels are shared: `teacher` (a teacher application's teacher name), `run` (a training run id), `route`
(a route of a run) with its `capability` (the suite capability / data bucket it trains).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as created in Ray (no ray_ prefix, no _total suffix)
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes (histograms add _bucket / _sum / _count to it)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


TEACHER = ("teacher",)
RUN_ROUTE = ("run", "route", "capability")

TEACHER_QUERIES = MetricSpec("danceopd_teacher_queries", "counter", TEACHER, "Velocity queries answered")
TEACHER_SAMPLES = MetricSpec("danceopd_teacher_samples", "counter", TEACHER, "Samples (rows) answered")
TEACHER_ERRORS = MetricSpec("danceopd_teacher_errors", "counter", TEACHER + ("kind",), "Failed queries by kind")
TEACHER_LATENCY = MetricSpec("danceopd_teacher_latency_seconds", "histogram", TEACHER, "Query latency in the replica (queue + model)")
TEACHER_BATCH = MetricSpec("danceopd_teacher_batch_samples", "histogram", TEACHER, "Samples per model call (after merging)")
TEACHER_QUEUE = MetricSpec("danceopd_teacher_queue_depth", "gauge", TEACHER, "Queries waiting in this replica")

ROUTER_ASSIGNMENTS = MetricSpec("danceopd_router_assignments", "counter", RUN_ROUTE, "Samples assigned per route")
ROUTER_WEIGHT = MetricSpec("danceopd_router_route_weight", "gauge", RUN_ROUTE, "Current route weight")
ROUTER_LOSS = MetricSpec("danceopd_router_reported_loss", "gauge", RUN_ROUTE, "Last loss a trainer reported for the route")

TRAINER_STEP = MetricSpec("danceopd_trainer_step", "gauge", ("run",), "Optimizer steps done")
TRAINER_LOSS = MetricSpec("danceopd_trainer_loss", "gauge", RUN_ROUTE, "Mean loss per route over the last log window (all workers)")
TRAINER_ROUTE_STEPS = MetricSpec("danceopd_trainer_route_steps", "counter", RUN_ROUTE, "Updates routed to the route")
TRAINER_SAMPLES_PER_S = MetricSpec("danceopd_trainer_samples_per_second", "gauge", ("run",), "Training throughput (all workers)")
TRAINER_STEP_TIME = MetricSpec("danceopd_trainer_step_time_seconds", "gauge", ("run", "part"),
                               "Seconds per step by part (rollout, teacher, forward_backward, optimizer, router), last log window")
TRAINER_NONFINITE = MetricSpec("danceopd_trainer_skipped_updates", "gauge", RUN_ROUTE,
                              "Updates skipped since the workers (re)started because the loss or gradient was not finite")
TRAINER_DATA_SKIPPED = MetricSpec("danceopd_trainer_data_rows_skipped", "gauge", ("run", "route", "rank"),
                                  "Rows drawn since the worker (re)started whose image could not be read (each replaced by "
                                  "another row of its bucket)")
TRAINER_TEACHER_CIRCUIT = MetricSpec("danceopd_trainer_teacher_circuit_open", "gauge", ("run", "teacher", "rank"),
                                     "1 while a worker's circuit to a teacher application is open (the teacher is failing)")
TRAINER_CHECKPOINT_TIME = MetricSpec("danceopd_trainer_checkpoint_timestamp_seconds", "gauge", ("run",),
                                     "Unix time of the last checkpoint (age = time() - value)")

ALL = [TEACHER_QUERIES, TEACHER_SAMPLES, TEACHER_ERRORS, TEACHER_LATENCY, TEACHER_BATCH, TEACHER_QUEUE,
       ROUTER_ASSIGNMENTS, ROUTER_WEIGHT, ROUTER_LOSS,
       TRAINER_STEP, TRAINER_LOSS, TRAINER_ROUTE_STEPS, TRAINER_SAMPLES_PER_S, TRAINER_STEP_TIME, TRAINER_NONFINITE, TRAINER_DATA_SKIPPED, TRAINER_TEACHER_CIRCUIT, TRAINER_CHECKPOINT_TIME]

# Ray Serve's own metric the teachers dashboard uses for replica counts (per application).
SERVE_REPLICAS_HEALTHY = "ray_serve_deployment_replica_healthy"


def make(spec: MetricSpec, boundaries: list[float] | None = None):
    """The ray.util.metrics object for a spec (inside a Ray worker, replica or actor)."""
    from ray.util import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.help, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.help, tag_keys=spec.labels)
    return metrics.Histogram(spec.name, spec.help, boundaries=boundaries, tag_keys=spec.labels)
