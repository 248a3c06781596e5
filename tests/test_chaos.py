"""Seeded chaos: during a distributed run (2 workers, adaptive routing, the router's state in Redis), kill at seeded
steps a teacher replica, a train worker, the router replica and Redis, each alone and all in one run, and check the
final weights and the routing log against an uninterrupted run with the same seed, bit for bit.

`make test` runs the all-at-once run; `make chaos` runs every row and prints the table (also written to
runs/chaos/chaos.json).
"""

import json
import random
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import RedisProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
SEED = 2026
STEPS, CHECKPOINT_EVERY = 24, 6
FAILURES = ["teacher replica", "train worker", "router replica", "redis"]
SMALL = {"student.num_layers": 2, "student.attention_head_dim": 16, "optim.batch_size": 16, "method.rollout_steps": 4,
         "optim.warmup_steps": 0, "optim.lr": 2e-3, "torch_threads": 1, "method.routing": "adaptive",
         "cluster.num_workers": 2, "cluster.cpus_per_worker": 0.5, "cluster.max_failures": 4,
         "services.app_prefix": "chaos-", "services.router_app": "chaos-router", "services.gateway": False,
         "steps": STEPS, "log_every": CHECKPOINT_EVERY, "checkpoint_every": CHECKPOINT_EVERY}
ROWS: list[dict] = []


def job(tmp_path, redis_url: str):
    from trainer.job import load_job_config

    return load_job_config(None, {**SMALL, "output_dir": str(tmp_path), "services.router_redis_url": redis_url})


@pytest.fixture(scope="module")
def chaos_stack(ray_cluster, tmp_path_factory):
    """Teachers and a Redis-backed router of their own (this module kills them), and a Redis it may restart."""
    from ray import serve

    from trainer.main import ensure_services

    redis = RedisProcess(tmp_path_factory.mktemp("chaos-redis"), free_port()).start()
    ensure_services(job(tmp_path_factory.mktemp("chaos-stack"), redis.url), log=lambda m: None)
    baseline = run(tmp_path_factory.mktemp("baseline"), redis, [])
    assert baseline["steps_run"] == STEPS
    yield {"redis": redis, "baseline": baseline}
    for app in ["chaos-t2i", "chaos-local_edit", "chaos-global_edit", "chaos-router"]:
        serve.delete(app)
    redis.stop()
    if ROWS:
        out = ROOT / "runs" / "chaos" / "chaos.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(ROWS, indent=2))
        print("\n" + table(ROWS) + f"\n(written to {out})")


def replica_actor(app: str, deployment: str) -> str:
    """The named actor of the application's one replica (waiting for Serve to replace one killed before)."""
    import ray

    deadline = time.time() + 120
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
        if len(names) == 1:
            return names[0]
        assert time.time() < deadline, names
        time.sleep(0.5)


def fault_steps(failures: list[str], seed: int) -> dict[str, int]:
    """Each failure's step, drawn from the seed: after the first checkpoint, before the last step."""
    rng = random.Random(f"{seed}:{','.join(failures)}")
    return {f: rng.randrange(CHECKPOINT_EVERY + 1, STEPS - 2) for f in failures}


def faults_for(failures: dict[str, int], tmp_path: Path) -> list[dict]:
    out = []
    for failure, step in failures.items():
        marker = str(tmp_path / f"fault-{failure.replace(' ', '-')}")
        if failure == "teacher replica":  # the route of that step is not known ahead: kill the busiest teacher
            out.append({"action": "kill_actor", "step": step, "rank": 0, "marker": marker,
                        "actor": replica_actor("chaos-t2i", "TeacherServer")})
        elif failure == "train worker":
            out.append({"action": "exit", "step": step, "rank": 1, "marker": marker})
        elif failure == "router replica":
            out.append({"action": "kill_actor", "step": step, "rank": 0, "marker": marker,
                        "actor": replica_actor("chaos-router", "RouterServer")})
        else:  # redis: the worker only marks the step; the test kills Redis and restarts it 15 s later
            out.append({"action": "marker", "step": step, "rank": 0, "marker": marker})
    return out


def restart_redis_on_marker(redis: RedisProcess, marker: Path, stop: threading.Event, down_s: float = 15.0) -> None:
    while not stop.is_set():
        if marker.exists():
            redis.kill()
            time.sleep(down_s)
            redis.start()
            return
        time.sleep(0.05)


def run(tmp_path: Path, redis: RedisProcess, faults: list[dict]) -> dict:
    from router.client import RouterClient
    from trainer.distributed import run_distributed

    cfg = job(tmp_path, redis.url)
    run_id = f"chaos-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    watcher = None
    redis_marker = next((Path(f["marker"]) for f in faults if f["action"] == "marker"), None)
    if redis_marker is not None:
        watcher = threading.Thread(target=restart_redis_on_marker, args=(redis, redis_marker, stop), daemon=True)
        watcher.start()
    t0 = time.perf_counter()
    trace = tmp_path / "steps-run.txt"  # every update rank 0 completed, redone ones included
    try:
        result = run_distributed(cfg, run_id, faults=[*faults, {"action": "trace", "path": str(trace)}])
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(30)
    seconds = time.perf_counter() - t0
    assert result.error is None and result.metrics["step"] == STEPS, result.error
    with result.checkpoint.as_directory() as d:
        weights = torch.load(Path(d) / "optimizer.pt", weights_only=False)["training_weights"]
    summary = RouterClient("chaos-router", retries=8, backoff_s=0.5).summary(run_id, recent=10_000)
    log = sorted((a["step"], a["rank"], a["micro"], a["route"], tuple(sorted(a["weights"].items()))) for a in summary["recent"])
    happened = {f["marker"]: int(Path(f["marker"]).read_text()) for f in faults if Path(f["marker"]).exists()}
    return {"weights": weights, "log": log, "losses": summary["losses"], "resumed_from": result.metrics["resumed_from"],
            "happened": happened, "seconds": seconds, "steps_run": len(trace.read_text().split())}


def compare(name: str, failures: dict[str, int], got: dict, baseline: dict) -> dict:
    weights_same = all(torch.equal(got["weights"][n], w) for n, w in baseline["weights"].items())
    max_diff = max(float((got["weights"][n] - w).abs().max()) for n, w in baseline["weights"].items())
    # A worker-group restart redoes the steps after the checkpoint it resumes from.
    row = {"failure": name, "steps": ", ".join(f"{f} @ {s}" for f, s in failures.items()), "steps_redone": got["steps_run"] - STEPS,
           "weights_identical": weights_same, "max_weight_difference": max_diff, "routing_log_identical": got["log"] == baseline["log"],
           "loss_statistics_identical": got["losses"] == baseline["losses"], "seconds": round(got["seconds"], 1),
           "baseline_seconds": round(baseline["seconds"], 1)}
    ROWS.append(row)
    return row


def table(rows: list[dict]) -> str:
    yn = {True: "yes", False: "NO"}
    lines = [f"{'failure':<16}{'step(s)':<78}{'redone':>7}  {'weights':<8}{'routing log':<12}{'s (baseline)':>13}"]
    for r in rows:
        lines.append(f"{r['failure']:<16}{r['steps']:<78}{r['steps_redone']:>7}  {yn[r['weights_identical']]:<8}"
                     f"{yn[r['routing_log_identical']]:<12}{r['seconds']:>6} ({r['baseline_seconds']})")
    return "\n".join(lines)


def check(name: str, failures: list[str], chaos_stack, tmp_path) -> None:
    steps = fault_steps(failures, SEED)
    faults = faults_for(steps, tmp_path)
    got = run(tmp_path, chaos_stack["redis"], faults)
    assert len(got["happened"]) == len(faults), got["happened"]  # every failure really happened, at its step
    assert sorted(got["happened"].values()) == sorted(steps.values())
    row = compare(name, steps, got, chaos_stack["baseline"])
    assert row["routing_log_identical"] and row["loss_statistics_identical"], row
    assert row["weights_identical"], row


def test_every_failure_at_once_changes_nothing(chaos_stack, tmp_path):
    """The short version (in `make test`): all four failures in one run, at seeded steps."""
    check("all four", FAILURES, chaos_stack, tmp_path)


@pytest.mark.chaos
@pytest.mark.parametrize("failure", FAILURES)
def test_each_failure_alone_changes_nothing(chaos_stack, tmp_path, failure):
    check(failure, [failure], chaos_stack, tmp_path)
