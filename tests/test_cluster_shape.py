"""A cluster shaped like the shipped ones (deploy/kuberay, docker-compose.yml), on this machine: a head node with no
CPUs and no GPUs (KubeRay's advice for heads: nothing but the job's driver and Ray's own processes can run there) and
two worker nodes with CPUs and logical GPUs (`device: cpu`: there is no real GPU here). The job is submitted as `ray
job submit` runs it, a driver process attached to the cluster: `python -m trainer.main`, on tiny FLUX pipelines.

- With --eval, the student is evaluated before and after training on the workers (each rank its routes), on the
  worker nodes; the driver holds no model (a guard in it raises if one is built: tested to raise in test_job.py).
- The prompts are listed (a manifest): one Ray task encodes them into the run's embedding store before training, and
  neither the workers nor the teacher replicas load a text encoder (their counts are in report.json).
- A Ray Train worker killed mid-run: the group restarts from the latest checkpoint and ends with the same weights as
  an uninterrupted run; keep_checkpoints is honoured by the distributed job; bf16 exports are half the fp32 ones;
  the merged export exists once, at the end, never in a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """Head: 0 CPUs, 0 GPUs. Two worker nodes: 2 CPUs and 2 logical GPUs each."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield {"address": c.address, "head": c.head_node.node_id, "workers": {n.node_id for n in workers}}
    c.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline

    root = tmp_path_factory.mktemp("shape")
    flux = build_tiny_pipeline("flux", root / "flux", seed=0)
    loras = [build_random_lora(flux, root / f"lora-{i}", rank=4, std=0.1, seed=i + 1) for i in range(2)]
    # listed prompts: student.text_embeddings auto = precompute (one task encodes them; no worker or replica holds a
    # text encoder)
    rows = [{"uid": f"{r}{i}", "route": r, "prompt": f"{subject} number {i}"} for r, subject in (("t2i", "a cat"), ("style", "a dog"))
            for i in range(10)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    cfg = {"run_name": "killed", "output_dir": str(root / "runs"), "device": "cpu", "dtype": "float32", "steps": 16, "torch_threads": 1,
           "student": {"base": str(flux), "lora": {"rank": 8, "alpha": 8}, "save_merged": True}, "data": {"manifest": str(root / "data.jsonl")},
           "routes": {"t2i": {"capability": "t2i", "teacher": {"loras": [{"path": str(loras[0])}]}},
                      "style": {"capability": "t2i", "teacher": {"loras": [{"path": str(loras[1])}]}}},
           "method": {"rollout_steps": 4, "schedule": "family"},
           "optim": {"batch_size": 4, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 0},
           "eval": {"velocity_error_samples": 4, "sampling_steps": 4, "schedule": "family", "samples_per_condition_in_grid": 2},
           "log_every": 2, "checkpoint_every": 4,
           "cluster": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
           "services": {"app_prefix": "shape-", "router_app": "shape-router", "gateway": False, "http_port": free_port(),
                        # calls of >= 0.1 s (a teacher on its own device): the run lasts long enough to be killed mid-way.
                        # Batching off: a batched FLUX forward differs in the last bit (~4e-7 here) with the batch's
                        # make-up, which depends on timing; the weights are compared bit for bit.
                        "teacher_defaults": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, "simulated_call_s": 0.1,
                                             "batching": {"enabled": False}}}}
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # routes in this order: t2i on rank 0, style on rank 1
    return path


def submit(cluster, config: Path, *args, on_checkpoint=None) -> subprocess.CompletedProcess:
    """The job's driver, attached to the cluster as `ray job submit` starts it. `on_checkpoint(pids)` is called once,
    when Ray Train has registered the run's first checkpoint (its snapshot on storage lists one), with the pids of
    the Ray Train workers."""
    env = {**os.environ, "RAY_ADDRESS": cluster["address"]}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.main", "--config", str(config), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = Path(yaml.safe_load(config.read_text())["output_dir"])
    deadline = time.time() + 600
    while on_checkpoint is not None and proc.poll() is None and time.time() < deadline:
        if any(json.loads(f.read_text() or "{}").get("checkpoint_results") for f in runs.glob("*/ray/*/checkpoint_manager_snapshot.json")):
            on_checkpoint(train_worker_pids())
            break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=max(1, deadline - time.time()))
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers (Ray names them ray::RayTrainWorker...)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


def final_checkpoint(run_dir: Path) -> Path:
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    return max(p for p in (run_dir / "ray" / run_id).glob("checkpoint_*") if p.is_dir())


def test_the_job_trains_and_evaluates_on_worker_nodes_and_a_killed_worker_changes_nothing(cluster, config):
    killed = []

    def kill_one(pids):
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        killed.append(pids[-1])

    run = submit(cluster, config, "--eval", "--no-resume", on_checkpoint=kill_one)
    assert run.returncode == 0, run.stdout + run.stderr
    assert killed and "resumed from the checkpoint at step" in run.stdout, run.stdout
    assert "ModelInDriverError" not in run.stdout + run.stderr and "Traceback" not in run.stdout
    runs = config.parent / "runs"
    report = json.loads((runs / "killed" / "report.json").read_text())
    # Evaluated on the workers, one route each, before and after training; never on the head.
    for evaluation in (report, report["before"]):
        where = evaluation["evaluated_on"]
        assert {r: w["rank"] for r, w in where.items()} == {"t2i": 0, "style": 1}
        assert {w["node_id"] for w in where.values()} <= cluster["workers"] and cluster["head"] not in str(where)
    assert report["step"] == 16 and report["before"]["step"] == 0
    # the run's 21 prompts ("" for CFG) were encoded once, by one task; no worker or teacher replica holds a text encoder
    assert "text embeddings: 21 prompts x 1 encoder set(s), 21 encoded" in run.stdout, run.stdout
    emb = report["text_embeddings"]
    assert emb["mode"] == "precompute" and emb["train_worker_text_encoder_parameters"] == 0
    assert emb["teacher_text_encoder_parameters"] == {"shape-t2i": 0, "shape-style": 0}
    assert all(v["after"] < v["before"] for v in report["velocity_error"].values()), report["velocity_error"]
    # The merged export: once, in the final student folder, never in a checkpoint.
    student = runs / "killed" / "student"
    assert (student / "transformer" / "config.json").exists() and (student / "pytorch_lora_weights.safetensors").exists()
    assert not list((runs / "killed" / "ray").rglob("transformer"))

    # The same run without interruption (and without evaluation): the same weights. It also keeps 2 checkpoints of 8
    # and exports in bf16.
    straight = submit(cluster, config, "--no-resume", "run_name=straight", "checkpoint_every=2", "keep_checkpoints=2",
                      "student.save_dtype=bfloat16", "student.save_merged=false")
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "21 encoded" not in straight.stdout and ", 0 encoded" in straight.stdout  # the store is shared by runs
    # the running teachers read that store: a job that stores its prompts elsewhere is refused before it trains
    other = submit(cluster, config, "--no-resume", "run_name=other", f"student.text_embeddings_store={config.parent / 'elsewhere'}")
    assert other.returncode == 2 and "reads prompt embeddings from" in other.stderr and "text_embeddings_store" in other.stderr, other.stderr
    kept = sorted(p for p in (runs / "straight" / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert len(kept) == 2, kept
    weights = {name: torch.load(final_checkpoint(runs / name) / "optimizer.pt", weights_only=False)["training_weights"]
               for name in ("killed", "straight")}
    assert weights["killed"].keys() == weights["straight"].keys()
    assert all(torch.equal(weights["killed"][n], w) for n, w in weights["straight"].items())
    from safetensors.torch import load_file

    fp32, bf16 = (load_file(final_checkpoint(runs / name) / "student" / "pytorch_lora_weights.safetensors") for name in ("killed", "straight"))
    assert {v.dtype for v in fp32.values()} == {torch.float32} and {v.dtype for v in bf16.values()} == {torch.bfloat16}
    assert all(torch.equal(fp32[k].to(torch.bfloat16), v) for k, v in bf16.items())  # the same weights, rounded once
    assert not (runs / "straight" / "student" / "transformer").exists()
