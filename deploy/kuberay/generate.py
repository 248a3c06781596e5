"""KubeRay manifests (ray.io/v1, KubeRay 1.4+): a RayService for the teachers and a RayJob for training.

    python deploy/kuberay/generate.py          (or: make deploy-files)

The RayService's serveConfigV2 is rendered from configs/teachers-gpu.yaml (the same renderer as
`danceopd serve-config`), so the cluster runs exactly the validated teachers config. Both clusters keep
GCS state in Redis (gcsFaultToleranceOptions): a restarted head node resumes its applications and jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from services.teachers.app import serve_config  # noqa: E402
from services.teachers.config import load_teachers_config  # noqa: E402

OUT = Path(__file__).resolve().parent
TEACHERS = "configs/teachers-gpu.yaml"
IMAGE = "ghcr.io/your-org/danceopd-serve:latest"  # built from the repository's Dockerfile
RAY_VERSION = "2.60.0"
REDIS_ADDRESS = "redis:6379"  # a Redis with append-only persistence in the namespace (see README)


def container(name: str, cpu: str, memory: str, gpus: int = 0, ports: list[tuple[str, int]] = (), extra_env: list[dict] = ()) -> dict:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {
        "name": name, "image": IMAGE,
        "resources": {"limits": limits, "requests": {"cpu": cpu, "memory": memory}},
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "danceopd-ray-token", "key": "token"}}},
                {"name": "DANCEOPD_REDIS_URL", "value": f"redis://{REDIS_ADDRESS}/1"},
                # the REST gateway's and router API's bearer token (Serve listens beyond loopback: auth is on)
                {"name": "DANCEOPD_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "danceopd-api-token", "key": "token"}}},
                # one Hugging Face cache shared by every pod (`danceopd prefetch` fills it once); the token reads gated
                # models (SD3.5, FLUX.1-dev, Kontext-dev); optional: public models need none
                {"name": "HF_HOME", "value": HF_HOME},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "danceopd-hf-token", "key": "token", "optional": True}}},
                *extra_env],
        "volumeMounts": [{"name": "runs", "mountPath": "/runs"}, {"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "hf-cache", "mountPath": HF_HOME}],
    }


HF_HOME = "/cache/huggingface"  # = the Dockerfile's HF_HOME
VOLUMES = [{"name": "runs", "persistentVolumeClaim": {"claimName": "danceopd-runs"}},
           {"name": "models", "persistentVolumeClaim": {"claimName": "danceopd-models", "readOnly": True}},
           # ReadWriteMany: every node reads the models from it; the job's prefetch writes them once
           {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "danceopd-hf-cache"}}]
HEAD_PORTS = [("gcs", 6379), ("dashboard", 8265), ("serve", 8000), ("metrics", 8080), ("client", 10001)]


def cluster_spec(worker_groups: list[dict]) -> dict:
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "gcsFaultToleranceOptions": {"redisAddress": REDIS_ADDRESS, "externalStorageNamespace": "danceopd",
                                     "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "danceopd-redis", "key": "password"}}}},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "num-gpus": "0"},
            "template": {"spec": {"containers": [container("ray-head", "8", "32Gi", ports=HEAD_PORTS)], "volumes": VOLUMES}},
        },
        "workerGroupSpecs": worker_groups,
    }


def gpu_group(name: str, min_replicas: int, max_replicas: int) -> dict:
    return {"groupName": name, "replicas": min_replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {"metrics-export-port": "8080"},
            "template": {"spec": {"containers": [container("ray-worker", "8", "64Gi", gpus=1, ports=[("metrics", 8080)])],
                                  "volumes": VOLUMES}}}


def rayservice() -> dict:
    teachers = load_teachers_config(ROOT / TEACHERS)
    serve = serve_config(teachers)
    gpus = sum(t.autoscaling_config.max_replicas if t.autoscaling_config else (t.num_replicas or 1) for t in teachers.teachers)
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "danceopd-teachers", "labels": {"app.kubernetes.io/part-of": "danceopd"}},
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            # Rendered from configs/teachers-gpu.yaml: one application per teacher (own GPUs, own autoscaling),
            # the REST gateway and the router.
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False, width=120),
            "rayClusterConfig": cluster_spec([gpu_group("teacher-gpus", 1, gpus)]),
        },
    }


def rayjob() -> dict:
    runtime_env = {"working_dir": "/app", "env_vars": {"DANCEOPD_REDIS_URL": f"redis://{REDIS_ADDRESS}/1"}}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": "danceopd-train", "labels": {"app.kubernetes.io/part-of": "danceopd"}},
        "spec": {
            # The job gets its own cluster: trainer.main deploys the teachers its routes name there
            # (services.deploy: auto) beside the 8 training workers. To train against the RayService's teachers
            # instead, replace rayClusterSpec by clusterSelector {ray.io/cluster: <its cluster>} and set
            # services.deploy=attach.
            # The models go into the shared cache first (a no-op once they are there), so that no worker or replica
            # downloads them at start-up. One `bash -c`: KubeRay's submitter pastes the entrypoint into a shell line
            # (`ray job submit ... -- <entrypoint>`), where a bare `&&` would end the submission and run the training
            # in the submitter pod (1 CPU, no GPU) instead of the Ray job.
            "entrypoint": ("bash -c 'danceopd prefetch --config configs/gpu-cluster.yaml && "
                           "python -m trainer.main --config configs/gpu-cluster.yaml --eval output_dir=/runs'"),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "backoffLimit": 2,  # resubmits resume from the latest checkpoint (run.json + Ray Train storage on /runs)
            "activeDeadlineSeconds": 7 * 24 * 3600,
            "rayClusterSpec": cluster_spec([gpu_group("train-gpus", 8, 8), gpu_group("teacher-gpus", 3, 12)]),
        },
    }


MANIFESTS = {"rayservice-teachers.yaml": rayservice, "rayjob-train.yaml": rayjob}


def render() -> dict[str, str]:
    head = "# Generated by `python deploy/kuberay/generate.py` (make deploy-files): edit that script or configs/, not this file.\n"
    return {name: head + yaml.safe_dump(build(), sort_keys=False, width=120) for name, build in MANIFESTS.items()}


def main() -> int:
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
