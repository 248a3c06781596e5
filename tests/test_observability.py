"""Observability for real: the Debian `prometheus` scrapes the Ray metrics port of a running stack (teachers,
router, a 2-worker training run) with the committed scrape config, and every query of every panel of the
generated Grafana dashboards returns data from it."""

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"


def load_script(path: Path):
    """A generator script under deploy/ as a module (they share the file name generate.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"deploy_{path.parent.name}_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of every panel."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p["targets"]:
                out.append((d["title"], p["title"], t["expr"]))
    return out


def as_promql(expr: str) -> str:
    """Grafana's template variables as Grafana would expand them for 'All' (.*) and the committed 5 s scrape interval
    ($__rate_interval = 4 scrape intervals)."""
    return expr.replace("$__rate_interval", "20s").replace("$run", ".*").replace("$teacher", ".*")


def test_generated_dashboards_are_current_and_name_only_exported_metrics():
    import danceopd.telemetry as T

    generate = load_script(ROOT / "deploy/grafana/generate.py")

    for name, text in generate.render().items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run `make deploy-files`"
    exported = {T.SERVE_REPLICAS_HEALTHY}
    for spec in T.ALL:
        exported |= {spec.exported} if spec.kind != "histogram" else {spec.exported + s for s in ("_bucket", "_sum", "_count")}
    queries = panel_queries()
    assert len(queries) >= 16
    for dash, title, expr in queries:
        for name in re.findall(r"\b(ray_[a-z_]+)", expr):
            assert name in exported, f"{dash} / {title}: {name} is not a metric the code exports"
    titles = {t for _, t, _ in queries}
    for needed in ("Loss per capability", "Route mix", "Throughput", "Step-time breakdown", "Queries per second",
                   "Latency p50 / p99", "Batch size", "Queue depth", "Healthy replicas", "Errors per second"):
        assert any(t.startswith(needed) for t in titles), needed


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus"
    for path in DASHBOARDS.glob("*.json"):
        d = json.loads(path.read_text())
        ds_var = next(v for v in d["templating"]["list"] if v["type"] == "datasource")
        assert ds_var["current"]["value"] == ds["uid"]  # the dashboards default to the provisioned datasource
        assert all(p["datasource"]["uid"] == "${datasource}" for p in d["panels"])


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed: run `make os-deps` (apt-get install prometheus)")
    d = tmp_path_factory.mktemp("prometheus")
    targets = d / "ray_targets.json"  # the same format as Ray's prom_metrics_service_discovery.json
    targets.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{ray_cluster.metrics_port}"]}]))
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())  # the committed config ...
    # ... as committed: its 5 s interval is also the scrape timeout. (At 1 s, a 2-core machine under a full suite's
    # load answered the scrape too late while training ran; Ray drops a gauge ~20 s after its last set, so the
    # gauges never reached Prometheus.) Only the targets file is this cluster's.
    assert cfg["global"]["scrape_interval"] == "5s"
    cfg["scrape_configs"][0]["file_sd_configs"][0].update(files=[str(targets)], refresh_interval="1s")
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen([exe, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200:
                break
        except Exception:
            time.sleep(0.5)
    else:
        pytest.fail((d / "prometheus.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


def query_range(url: str, expr: str, start: float, end: float) -> list:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
    body = json.loads(urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def scrape_health(url: str, metrics_port: int) -> str:
    """What a failure needs to be told apart: Prometheus's view of the target, and the export endpoint read directly."""
    target = json.loads(urllib.request.urlopen(f"{url}/api/v1/targets", timeout=30).read())["data"]["activeTargets"]
    t0 = time.perf_counter()
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60).read().decode()
    took = time.perf_counter() - t0
    ours = sorted({ln.split("{")[0] for ln in body.splitlines() if ln.startswith("ray_danceopd_")})
    return (f"targets: {[(t['health'], t['lastError'], round(t['lastScrapeDuration'], 3)) for t in target]}; the endpoint: "
            f"{len(body.splitlines())} lines in {took:.2f} s, danceopd metrics now: {ours}")


def test_every_dashboard_query_returns_series_from_a_running_stack(prometheus, ray_cluster, tmp_path):
    from ray import serve

    from danceopd.contracts import QueryError, VelocityQuery
    from services.teachers.client import TeacherClient
    from trainer.distributed import run_distributed
    from trainer.job import load_job_config
    from trainer.main import ensure_services

    t0 = time.time()
    job = load_job_config(None, {
        "student.num_layers": 2, "student.attention_head_dim": 16, "optim.batch_size": 16, "method.rollout_steps": 4,
        "torch_threads": 1, "steps": 24, "log_every": 3, "checkpoint_every": 8, "output_dir": str(tmp_path),
        "cluster.num_workers": 2, "cluster.cpus_per_worker": 0.5,
        "services.app_prefix": "obs-", "services.router_app": "obs-router", "services.gateway": False})
    ensure_services(job, log=lambda m: None)
    try:
        run_id = f"obs-{uuid.uuid4().hex[:6]}"
        result = run_distributed(job, run_id)
        assert result.error is None
        bad = VelocityQuery(x=np.zeros((1, 3, 16, 16), np.float32), sigma=np.array([1.5], np.float32), prompts=["a red circle"])
        with pytest.raises(QueryError):  # an error for the errors panel
            TeacherClient("obs-t2i", app_prefix="").query(bad)

        queries = panel_queries()
        missing = queries
        deadline = time.time() + 90  # metrics reach Prometheus within a few scrape + export intervals
        while missing and time.time() < deadline:
            time.sleep(2)
            missing = [(d, t, e) for d, t, e in missing if not query_range(prometheus, as_promql(e), t0, time.time())]
        assert not missing, f"panels without data: {missing}; {scrape_health(prometheus, ray_cluster.metrics_port)}"
        # The numbers are the run's: its last step, and one loss series per route with its capability.
        step = query_range(prometheus, f'ray_danceopd_trainer_step{{run="{run_id}"}}', t0, time.time())
        assert max(float(v) for _, v in step[0]["values"]) == 24
        losses = query_range(prometheus, f'ray_danceopd_trainer_loss{{run="{run_id}"}}', t0, time.time())
        assert {(s["metric"]["route"], s["metric"]["capability"]) for s in losses} == {
            ("t2i", "t2i"), ("local_edit", "local_edit"), ("global_edit", "global_edit")}
    finally:
        for app in ["obs-t2i", "obs-local_edit", "obs-global_edit", "obs-router"]:
            serve.delete(app)
