"""Grafana dashboards as code: writes deploy/grafana/dashboards/*.json from the metrics contract.

    python deploy/grafana/generate.py          (or: make dashboards)

A small generator of our own (the dashboards are two pages of time series; a library would add a
dependency for little). Queries are built from danceopd.telemetry specs, so a dashboard can only name
metrics the code exports; tests/test_observability.py runs every query against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import danceopd.telemetry as T  # noqa: E402

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def sel(spec: T.MetricSpec, suffix: str = "", **match: str) -> str:
    """`ray_<name>[_total|_bucket...]{label=~"$var", ...}` for a contract metric."""
    name = spec.exported + suffix
    inner = ",".join(f'{k}=~"{v}"' for k, v in match.items())
    return f"{name}{{{inner}}}" if inner else name


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries", stack: bool = False,
          description: str = "") -> dict:
    p = {"type": kind, "title": title, "description": description, "datasource": DATASOURCE,
         "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
                     for i, (expr, legend) in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 30 if stack else 0}
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    return p


def variable(name: str, query: str, label: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE, "query": {"query": query, "refId": name},
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}}


def dashboard(uid: str, title: str, panels: list[dict], variables: list[dict]) -> dict:
    width, height = 12, 8
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"x": (i % 2) * width, "y": (i // 2) * height, "w": width, "h": height}
    datasource_var = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                      "current": {"text": "Prometheus", "value": "prometheus"}}
    return {"uid": uid, "title": title, "tags": ["danceopd"], "timezone": "browser", "schemaVersion": 39, "version": 1,
            "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": [datasource_var, *variables]}, "annotations": {"list": []}, "panels": panels}


def training() -> dict:
    run = {"run": "$run"}
    panels = [
        panel("Loss per capability (mean over workers, last log window)",
              [(sel(T.TRAINER_LOSS, **run), "{{route}} ({{capability}})")]),
        panel("Route mix: updates per second per route",
              [(f"sum by (route, capability) (rate({sel(T.TRAINER_ROUTE_STEPS, **run)}[{RATE}]))", "{{route}}")], "ops", stack=True),
        panel("Throughput", [(f"sum by (run) ({sel(T.TRAINER_SAMPLES_PER_S, **run)})", "{{run}}")], "short",
              description="training samples per second, all workers"),
        panel("Step-time breakdown (seconds per step)",
              [(f"sum by (part) ({sel(T.TRAINER_STEP_TIME, **run)})", "{{part}}")], "s", stack=True),
        panel("Step", [(f"max by (run) ({sel(T.TRAINER_STEP, **run)})", "{{run}}")], "short"),
        panel("Skipped updates (non-finite loss or gradient)",
              [(f"max by (route) ({sel(T.TRAINER_NONFINITE, **run)})", "{{route}}")], "short"),
        panel("Skipped data rows (unreadable images, all workers)",
              [(f"sum by (route) ({sel(T.TRAINER_DATA_SKIPPED, **run)})", "{{route}}")], "short"),
        panel("Failing teachers (workers with an open circuit)",
              [(f"sum by (teacher) ({sel(T.TRAINER_TEACHER_CIRCUIT, **run)})", "{{teacher}}")], "short"),
        panel("Checkpoint age", [(f"time() - max by (run) ({sel(T.TRAINER_CHECKPOINT_TIME, **run)})", "{{run}}")], "s"),
        panel("Router: samples assigned per route",
              [(f"sum by (route, capability) (rate({sel(T.ROUTER_ASSIGNMENTS, **run)}[{RATE}]))", "{{route}}")], "short", stack=True),
        panel("Router: route weights", [(sel(T.ROUTER_WEIGHT, **run), "{{route}}")], "percentunit"),
        panel("Router: last reported loss per route", [(sel(T.ROUTER_LOSS, **run), "{{route}} ({{capability}})")]),
    ]
    return dashboard("danceopd-training", "DanceOPD training", panels,
                     [variable("run", f"label_values({T.TRAINER_STEP.exported}, run)", "Run")])


def teachers() -> dict:
    t = {"teacher": "$teacher"}
    by = "sum by (teacher)"

    def quantile(q: float) -> str:
        return f"histogram_quantile({q}, sum by (le, teacher) (rate({sel(T.TEACHER_LATENCY, '_bucket', **t)}[{RATE}])))"

    panels = [
        panel("Queries per second", [(f"{by} (rate({sel(T.TEACHER_QUERIES, **t)}[{RATE}]))", "{{teacher}}")], "reqps"),
        panel("Samples per second", [(f"{by} (rate({sel(T.TEACHER_SAMPLES, **t)}[{RATE}]))", "{{teacher}}")], "short"),
        panel("Latency p50 / p99 (in the replica)", [(quantile(0.5), "p50 {{teacher}}"), (quantile(0.99), "p99 {{teacher}}")], "s"),
        panel("Batch size (samples per model call)",
              [(f"{by} (rate({sel(T.TEACHER_BATCH, '_sum', **t)}[{RATE}])) / {by} (rate({sel(T.TEACHER_BATCH, '_count', **t)}[{RATE}]))",
                "{{teacher}}")], "short"),
        panel("Queue depth", [(f"{by} ({sel(T.TEACHER_QUEUE, **t)})", "{{teacher}}")], "short"),
        panel("Healthy replicas", [(f'sum by (application) ({T.SERVE_REPLICAS_HEALTHY}{{deployment="TeacherServer"}})', "{{application}}")],
              "short", description="Ray Serve's own gauge; application = <app_prefix><teacher>"),
        panel("Errors per second", [(f"sum by (teacher, kind) (rate({sel(T.TEACHER_ERRORS, **t)}[{RATE}]))", "{{teacher}} {{kind}}")], "reqps"),
    ]
    return dashboard("danceopd-teachers", "DanceOPD teachers", panels,
                     [variable("teacher", f"label_values({T.TEACHER_QUERIES.exported}, teacher)", "Teacher")])


DASHBOARDS = {"danceopd-training.json": training, "danceopd-teachers.json": teachers}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
