"""Deployment files, checked statically (no Docker engine or Kubernetes here): docker-compose.yml validates
with `docker-compose config` (Debian package) and is wired as the cluster guide (docs/cluster.md) describes; the KubeRay manifests
validate against the fields of the ray.io/v1 CRDs they use; generated files are current."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from test_observability import load_script

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV = {"RAY_AUTH_TOKEN": "test-token", "DANCEOPD_API_TOKEN": "api-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as `docker-compose config` resolves it (validated against the Compose schema)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: run `make os-deps` (apt-get install docker-compose)")
    proc = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **ENV}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_refuses_to_start_without_the_ray_token():
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    proc = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT, env={**env, "GRAFANA_ADMIN_PASSWORD": "x"}, timeout=60)
    assert proc.returncode != 0 and "RAY_AUTH_TOKEN" in proc.stderr  # auth is never silently off


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (a named volume, or an absolute host path)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out[dst] = src
    return out


def flag(command: list[str], name: str) -> str:
    return next(c.split("=", 1)[1] for c in command if c.startswith(f"--{name}="))


def test_compose_services_are_wired_together(compose):
    s = compose["services"]
    assert set(s) == {"redis", "ray-head", "ray-gpu-worker", "prometheus", "grafana"}
    # Redis: append-only persistence on a volume; the head's GCS and the router both use it.
    assert s["redis"]["command"][s["redis"]["command"].index("--appendonly") + 1] == "yes" and mounts(s["redis"])["/data"]
    head_env, worker_env = s["ray-head"]["environment"], s["ray-gpu-worker"]["environment"]
    assert head_env["RAY_REDIS_ADDRESS"].split(":")[0] == "redis"
    assert all(e["DANCEOPD_REDIS_URL"].startswith("redis://redis:") for e in (head_env, worker_env))
    assert all(e["RAY_AUTH_MODE"] == "token" and e["RAY_AUTH_TOKEN"] == ENV["RAY_AUTH_TOKEN"] for e in (head_env, worker_env))
    # Ray: workers join the head's GCS port; every node exports metrics on 8080.
    head_cmd, worker_cmd = s["ray-head"]["command"], s["ray-gpu-worker"]["command"]
    assert flag(worker_cmd, "address") == f"ray-head:{flag(head_cmd, 'port')}"
    assert flag(head_cmd, "metrics-export-port") == flag(worker_cmd, "metrics-export-port") == "8080"
    gpu = s["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert s["ray-head"]["build"]["context"] == str(ROOT) and (ROOT / "Dockerfile").exists()
    assert mounts(s["ray-head"])["/runs"] == mounts(s["ray-gpu-worker"])["/runs"]  # checkpoints on shared storage
    # Prometheus: the committed config, and the head's /tmp/ray (Ray's service-discovery file) read-only.
    prom = s["prometheus"]
    config_path = flag(prom["command"], "config.file")
    assert mounts(prom)[config_path] == str(ROOT / "deploy/prometheus/prometheus.yml")
    assert mounts(prom)["/tmp/ray"] == mounts(s["ray-head"])["/tmp/ray"]
    prom_cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    sd_file = prom_cfg["scrape_configs"][0]["file_sd_configs"][0]["files"][0]
    assert sd_file == "/tmp/ray/prom_metrics_service_discovery.json"
    listen_port = flag(prom["command"], "web.listen-address").rsplit(":", 1)[1]
    # Grafana: provisioning + dashboards mounted where the provisioning files say; datasource = this Prometheus.
    graf = mounts(s["grafana"])
    assert graf["/etc/grafana/provisioning"] == str(ROOT / "deploy/grafana/provisioning")
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/danceopd.yaml").read_text())["providers"][0]
    assert graf[provider["options"]["path"]] == str(ROOT / "deploy/grafana/dashboards")
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["url"] == f"http://prometheus:{listen_port}"
    home = s["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).name).exists() and home.startswith(provider["options"]["path"])


def test_the_cluster_guide_port_table_matches_compose(compose):
    """The cluster guide's table of host ports is what compose publishes."""
    readme = (ROOT / "docs" / "cluster.md").read_text()
    table = dict(re.findall(r"^\| `(\d+)` \| `([a-z-]+)` \|", readme, re.M))
    published = {}
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            published[str(p["published"] if isinstance(p, dict) else p.split(":")[0])] = name
    assert table == published, (table, published)


# ------------------------------------------------------------------------------------------------ KubeRay
# The ray.io/v1 fields our manifests use (KubeRay 1.4+: rayClusterConfig required, gcsFaultToleranceOptions
# with redisAddress required, rayStartParams a map of strings), written from the CRDs' field definitions.
# additionalProperties: false at every level we model, so a misspelt field fails here as it would in kubectl.
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SECRET_REF = {"type": "object", "required": ["secretKeyRef"], "additionalProperties": False,
              "properties": {"secretKeyRef": {"type": "object", "required": ["name", "key"], "additionalProperties": False,
                                              "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}}}
QUANTITY = {"oneOf": [{"type": "integer"}, {"type": "string"}]}
CONTAINER = {"type": "object", "required": ["name", "image"], "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "image": {"type": "string"},
    "resources": {"type": "object", "additionalProperties": False, "properties": {
        "limits": {"type": "object", "additionalProperties": QUANTITY}, "requests": {"type": "object", "additionalProperties": QUANTITY}}},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "additionalProperties": False,
                                         "properties": {"name": {"type": "string"}, "containerPort": {"type": "integer"}}}},
    "env": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                       "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": SECRET_REF}}},
    "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"], "additionalProperties": False,
                                                "properties": {"name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"}}}}}}
POD_TEMPLATE = {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {"spec": {
    "type": "object", "required": ["containers"], "additionalProperties": False, "properties": {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}}}
CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "gcsFaultToleranceOptions": {"type": "object", "required": ["redisAddress"], "additionalProperties": False, "properties": {
        "redisAddress": {"type": "string"}, "externalStorageNamespace": {"type": "string"},
        "redisPassword": {"type": "object", "additionalProperties": False, "properties": {"value": {"type": "string"}, "valueFrom": SECRET_REF}}}},
    "headGroupSpec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
        "rayStartParams": STR_MAP, "template": POD_TEMPLATE, "serviceType": {"type": "string"}}},
    "workerGroupSpecs": {"type": "array", "items": {"type": "object", "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                                                    "additionalProperties": False, "properties": {
        "groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0}, "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0}, "rayStartParams": STR_MAP, "template": POD_TEMPLATE}}}}}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,46}[a-z0-9])?$"},
                                                                   "labels": STR_MAP}}
RAYSERVICE = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False, "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": METADATA,
    "spec": {"type": "object", "required": ["rayClusterConfig"], "additionalProperties": False, "properties": {
        "serveConfigV2": {"type": "string"}, "rayClusterConfig": CLUSTER_SPEC,
        "upgradeStrategy": {"type": "object", "additionalProperties": False, "properties": {"type": {"enum": ["NewCluster", "None"]}}}}}}}
RAYJOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False, "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": METADATA,
    "spec": {"type": "object", "additionalProperties": False, "properties": {
        "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "rayClusterSpec": CLUSTER_SPEC,
        "clusterSelector": STR_MAP, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "backoffLimit": {"type": "integer", "minimum": 0}, "activeDeadlineSeconds": {"type": "integer", "minimum": 1}}}}}


def kuberay(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy/kuberay" / name).read_text())


def operator_rules(spec: dict) -> None:
    """Checks the KubeRay operator makes at reconcile time (beyond the CRD schema)."""
    ft = "gcsFaultToleranceOptions" in spec
    head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    if ft:  # FT options replace these; the operator rejects the mix
        assert not head_env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}
        assert "redis-password" not in spec["headGroupSpec"].get("rayStartParams", {})
    groups = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(groups) == len(set(groups))
    for g in spec.get("workerGroupSpecs", []):
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]


def test_kuberay_manifests_are_current():
    generate = load_script(ROOT / "deploy/kuberay/generate.py")
    for name, text in generate.render().items():
        assert (ROOT / "deploy/kuberay" / name).read_text() == text, f"{name} is stale: run `make deploy-files`"


def test_rayservice_validates_and_serves_the_gpu_teachers_config():
    from ray.serve.schema import ServeDeploySchema

    from services.teachers.app import serve_config
    from services.teachers.config import load_teachers_config

    m = kuberay("rayservice-teachers.yaml")
    jsonschema.validate(m, RAYSERVICE)
    operator_rules(m["spec"]["rayClusterConfig"])
    serve = yaml.safe_load(m["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    cfg = load_teachers_config(ROOT / "configs/teachers-gpu.yaml")
    assert serve == json.loads(json.dumps(serve_config(cfg)))
    # Per-teacher GPUs and autoscaling, as configured, and GPU workers enough for every teacher's maximum.
    apps = {a["name"]: a for a in serve["applications"]}
    for t in cfg.teachers:
        app = apps[cfg.app_name(t.name)]
        assert app["args"]["teachers"][0]["ray_actor_options"]["num_gpus"] == 1
        assert app["deployments"][0]["autoscaling_config"]["max_replicas"] == t.autoscaling_config.max_replicas
    group = m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus_per_pod = group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert group["maxReplicas"] * gpus_per_pod >= sum(t.autoscaling_config.max_replicas for t in cfg.teachers)


def test_rayjob_validates_and_runs_the_training_entry_point():
    m = kuberay("rayjob-train.yaml")
    jsonschema.validate(m, RAYJOB)
    spec = m["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)  # exactly one (operator rule)
    assert spec["ttlSecondsAfterFinished"] == 0 or spec["shutdownAfterJobFinishes"]
    operator_rules(spec["rayClusterSpec"])
    yaml.safe_load(spec["runtimeEnvYAML"])
    shell, flag, script = shlex.split(spec["entrypoint"])  # one `bash -c`: KubeRay pastes it into a shell line after `--`
    assert (shell, flag) == ("bash", "-c")
    prefetch, train = (part.split() for part in script.split(" && "))
    assert prefetch[:2] == ["danceopd", "prefetch"] and train[:3] == ["python", "-m", "trainer.main"]
    assert prefetch[prefetch.index("--config") + 1] == train[train.index("--config") + 1]  # the models of the config it trains
    assert (ROOT / train[train.index("--config") + 1]).exists()
    train = next(g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "train-gpus")
    from trainer.job import JobConfig  # the job's worker count fits the training worker group

    cfg = yaml.safe_load((ROOT / "configs/gpu-cluster.yaml").read_text())
    assert JobConfig.model_fields["cluster"].annotation.model_validate(cfg["cluster"]).num_workers <= train["maxReplicas"]


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m["spec"].pop("rayClusterConfig"), "rayClusterConfig"),
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 4}), "4"),
    (lambda m: m["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].pop("redisAddress"), "redisAddress"),
    (lambda m: m["spec"].update({"upgradeStrategy": {"type": "Rolling"}}), "Rolling"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update({"maxReplica": 3}), "maxReplica"),
])
def test_the_kuberay_schema_rejects_what_kubernetes_would(mutate, message):
    m = kuberay("rayservice-teachers.yaml")
    mutate(m)
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(m, RAYSERVICE)


def test_compose_and_kuberay_pass_the_rest_api_token(compose):
    """Serve listens on 0.0.0.0 there: the gateway and router require a bearer token, so every node gets it (compose
    refuses to start without it)."""
    s = compose["services"]
    assert all(s[n]["environment"]["DANCEOPD_API_TOKEN"] == ENV["DANCEOPD_API_TOKEN"] for n in ("ray-head", "ray-gpu-worker"))
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    proc = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, cwd=ROOT, env={**env, "RAY_AUTH_TOKEN": "x", "GRAFANA_ADMIN_PASSWORD": "x"}, timeout=60)
    assert proc.returncode != 0 and "DANCEOPD_API_TOKEN" in proc.stderr
    for name in ("rayservice-teachers.yaml", "rayjob-train.yaml"):
        text = (ROOT / "deploy/kuberay" / name).read_text()
        containers = [c for doc in yaml.safe_load_all(text) for c in _under(doc, "containers")]
        assert containers and all(any(e["name"] == "DANCEOPD_API_TOKEN" and e["valueFrom"]["secretKeyRef"]["name"] == "danceopd-api-token"
                                      for e in c["env"]) for c in containers), name


def _under(node, key: str):
    """Every item of every list named `key`, anywhere in a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get(key), list):
            yield from node[key]
        for v in node.values():
            yield from _under(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _under(v, key)


def test_every_node_shares_one_model_cache_and_gets_the_hub_token(compose):
    """HF_HOME is the Dockerfile's in every Ray container, a writable shared volume / PVC is mounted there (what
    `danceopd prefetch` fills once), and HF_TOKEN reaches them from .env or a Secret (optional: public models)."""
    home = re.search(r"HF_HOME=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    s = compose["services"]
    for name in ("ray-head", "ray-gpu-worker"):
        env = s[name]["environment"]
        assert env["HF_HOME"] == home and mounts(s[name])[home] == "hf-cache", name
        assert not any(str(v).endswith(f"{home}:ro") for v in s[name].get("volumes", [])), name
    assert "hf-cache" in compose["volumes"]
    env = {**os.environ, **ENV, "HF_TOKEN": "hf_secret"}
    proc = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)
    assert yaml.safe_load(proc.stdout)["services"]["ray-gpu-worker"]["environment"]["HF_TOKEN"] == "hf_secret"
    for name in ("rayservice-teachers.yaml", "rayjob-train.yaml"):
        doc = kuberay(name)
        claims = {v["name"]: v["persistentVolumeClaim"] for v in _under(doc, "volumes")}
        assert claims["hf-cache"] == {"claimName": "danceopd-hf-cache"}  # writable: no readOnly
        for c in _under(doc, "containers"):
            env = {e["name"]: e for e in c["env"]}
            assert env["HF_HOME"]["value"] == home
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "danceopd-hf-token", "key": "token", "optional": True}
            assert {"name": "hf-cache", "mountPath": home} in c["volumeMounts"]
