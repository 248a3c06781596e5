"""Distributed training groundwork: Ray Train workers + router service + teacher deployments, for real."""

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from tensorboard_files import read_scalars


SMALL = {"student.num_layers": 2, "student.attention_head_dim": 16, "optim.batch_size": 16, "method.rollout_steps": 4,
         "optim.warmup_steps": 0, "optim.lr": 2e-3, "torch_threads": 1, "eval.samples_per_capability": 8,
         "cluster.num_workers": 2, "cluster.cpus_per_worker": 0.5,
         "services.app_prefix": "dist-", "services.router_app": "dist-router", "services.gateway": False}
APPS = ["dist-t2i", "dist-local_edit", "dist-global_edit"]


def job(tmp_path, **over):
    from trainer.job import load_job_config

    return load_job_config(None, {**SMALL, "output_dir": str(tmp_path), **over})


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    """The job's own bring-up path: teachers derived from the routes, and the router, on the session's Serve."""
    from ray import serve

    from trainer.main import ensure_services

    ensure_services(job(tmp_path_factory.mktemp("stack")), log=lambda m: None)
    yield
    for app in [*APPS, "dist-router"]:
        serve.delete(app)


def replica_id(app: str) -> str:
    """The id of the replica answering a teacher application (one replica here)."""
    from services.teachers.client import TeacherClient

    return TeacherClient(app, app_prefix="", retries=8)._call(lambda h: h.describe.remote(), 0)["replica_id"]


def process_alive(pid: int) -> bool:
    """Whether a local process runs (a zombie, killed but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def replica_actor(app: str, rid: str) -> str:
    """The named actor of a Serve replica (Ray Serve names it SERVE_REPLICA::<app>#<deployment>#<id>)."""
    return f"SERVE_REPLICA::{app}#TeacherServer#{rid}"


def test_two_workers_train_through_router_and_teachers_and_survive_a_teacher_kill(stack, tmp_path):
    """Loss falls on every route; a teacher replica killed mid-run is retried without the run noticing."""
    import ray

    from router.client import RouterClient
    from trainer.distributed import run_distributed

    cfg = job(tmp_path, steps=48, log_every=16, checkpoint_every=16)
    run_id = f"dist-{uuid.uuid4().hex[:6]}"
    router = RouterClient("dist-router")
    victim = replica_id("dist-t2i")
    killed = {}

    def kill_when_running():
        deadline = time.time() + 300
        while time.time() < deadline:
            try:  # losses reach the router at each log window: 16 of them = the run is past step 16 (assignments
                # come in blocks of 16 steps ahead, so they say nothing about how far it got)
                done = sum(st["count"] for st in router.summary(run_id, recent=1)["losses"].values())
                if done >= 16:
                    ray.kill(ray.get_actor(replica_actor("dist-t2i", victim), namespace="serve"), no_restart=True)
                    killed["at"] = done
                    return
            except Exception:  # the run is not registered yet
                pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    result = run_distributed(cfg, run_id)
    killer.join(timeout=5)
    assert result.error is None
    assert 16 <= killed["at"] < 48, killed  # the t2i replica died mid-run ...
    assert replica_id("dist-t2i") != victim  # ... and Serve replaced it
    assert result.checkpoint is not None and result.metrics["step"] == 48 and result.metrics["resumed_from"] == 0
    shares = result.metrics["time_share_total"]
    assert set(shares) == {"rollout", "teacher", "forward_backward", "optimizer", "router"} and abs(sum(shares.values()) - 1) < 1e-6
    assert result.metrics["samples_per_s"] > 0
    again = router.assign(run_id, 0, 1, 0)  # a retried request gets the logged assignment
    assert again["step"] == 0 and again["rank"] == 1
    stats = router.summary(run_id, recent=1000)
    # Every (step, rank) was assigned exactly once: 48 steps x 2 ranks x 8 samples, no step lost or repeated.
    assert sum(stats["counts"].values()) == 48 * 16
    assert sorted((a["step"], a["rank"]) for a in stats["recent"]) == [(s, r) for s in range(48) for r in range(2)]
    # The router counted each step's loss once (rank 0's, hard routing), and saw every route's loss fall.
    assert sum(st["count"] for st in stats["losses"].values()) == 48
    for route, st in stats["losses"].items():
        assert st["count"] >= 4 and st["ema"] < 0.8 * st["scale"], (route, st)
    # The checkpoint holds the student the standard way (save_pretrained), plus optimizer, step and routing cursor.
    with result.checkpoint.as_directory() as d:
        from danceopd.student import load_student

        student = load_student(Path(d) / "student")
        state = json.loads((Path(d) / "state.json").read_text())
        assert state["step"] == 48 and state["routing_cursor"] == 48 and state["run"] == run_id
        assert (Path(d) / "optimizer.pt").exists()
        assert student.transformer.config.num_layers == 2
    first, last = state["history"][0]["loss"], state["history"][-1]["loss"]  # all workers, per log window
    assert all(last[r] < 0.5 * first[r] for r in first), (first, last)  # each route's loss fell well below its start


def step_losses(result, route_log: list[str]) -> list[float]:
    """Rank 0's per-step losses of a run (recorded per route) in step order."""
    by_route = json.loads(result.metrics["step_losses"])
    cursor = {r: 0 for r in by_route}
    out = []
    for r in route_log:
        out.append(by_route[r][cursor[r]])
        cursor[r] += 1
    return out


@pytest.mark.parametrize("staleness", [0, 1])
def test_one_worker_reproduces_the_reference_trainer(stack, tmp_path, staleness):
    """Two micro-batches per step, the defaults (truncated rollouts, teacher queries in flight while the student
    computes, assignments asked ahead), with and without the one-step-stale schedule. The job also samples every 3
    steps on its worker (eval.every): grids at 0, 3 and 6 on disk and in TensorBoard, and nothing it trains changes."""
    from tensorboard_files import read_images

    from trainer.distributed import run_distributed
    from trainer.reference import ReferenceTrainer

    cfg = job(tmp_path, steps=6, checkpoint_every=3, **{"cluster.num_workers": 1, "optim.batch_size": 8, "optim.grad_accum": 2,
                                                        "method.staleness": staleness, "eval.every": 3})
    ref = ReferenceTrainer(cfg, log=lambda m: None)
    torch.set_num_threads(1)
    ref_losses = [ref.train_step()["loss"] for _ in range(6)]  # train_step alone: no sampling
    result = run_distributed(cfg, f"one-{uuid.uuid4().hex[:6]}", record_step_losses=True)
    assert step_losses(result, ref.route_log[3:]) == ref_losses[3:]  # bit-identical (the report since the step-3 checkpoint)
    assert sorted(p.name for p in (cfg.run_dir / "samples").glob("*.png")) == [f"step-{s:06d}.png" for s in (0, 3, 6)]
    assert read_images(cfg.run_dir / "tensorboard" / "samples") == {"samples": [0, 3, 6]}
    curves = read_scalars(cfg.run_dir / "tensorboard" / "samples")
    assert {k for k in curves if k.endswith("velocity_error")} == {f"samples/{r}/velocity_error" for r in cfg.routes}
    assert all([s for s, _ in curves[f"samples/{r}/velocity_error"]] == [0, 3, 6] for r in cfg.routes)


def test_async_dispatch_truncation_and_prefetch_change_nothing_on_two_workers(stack, tmp_path):
    """Two workers x two micro-batches: the defaults and the sequential full-rollout loop of before compute the same
    losses and the same final weights, bit for bit."""
    from trainer.distributed import run_distributed

    over = {"optim.grad_accum": 2, "steps": 8, "checkpoint_every": 8}
    before = {"execution.truncate_rollout": False, "execution.overlap_teacher": False, "execution.prefetch_routing": False,
              "execution.find_unused_parameters": True}
    runs = {}
    for name, extra in (("defaults", {}), ("before", before)):
        result = run_distributed(job(tmp_path / name, **over, **extra), f"{name}-{uuid.uuid4().hex[:6]}", record_step_losses=True)
        with result.checkpoint.as_directory() as d:
            weights = torch.load(Path(d) / "optimizer.pt", weights_only=False)["training_weights"]
        runs[name] = (json.loads(result.metrics["step_losses"]), weights)
    assert runs["defaults"][0] == runs["before"][0]
    assert sum(len(v) for v in runs["defaults"][0].values()) == 8
    assert all(torch.equal(runs["defaults"][1][n], w) for n, w in runs["before"][1].items())


def test_a_killed_worker_changes_nothing_even_under_adaptive_routing(stack, tmp_path):
    """Adaptive routing: the weights of step s follow the losses of steps < s. Rank 1 dies at step 17; Ray Train
    restarts the group from a checkpoint and the steps after it run again. Every rank reports the update's
    all-reduced loss and the router counts each step's first report only, so the run ends exactly where an
    uninterrupted run with the same seed ends: weights bit for bit, the routing log with each step's weights, and
    the router's loss statistics (which before counted every rank's and every redone step's report)."""
    from router.client import RouterClient
    from trainer.distributed import run_distributed

    over = {"steps": 20, "log_every": 5, "checkpoint_every": 5, "cluster.max_failures": 1, "method.routing": "adaptive"}
    runs = {}
    for name, crash in (("straight", None), ("killed", {"rank": 1, "step": 17, "marker": str(tmp_path / "crashed")})):
        run_id = f"{name}-{uuid.uuid4().hex[:6]}"
        result = run_distributed(job(tmp_path / name, **over), run_id, crash_once=crash)
        assert result.error is None and result.metrics["step"] == 20
        with result.checkpoint.as_directory() as d:
            weights = torch.load(Path(d) / "optimizer.pt", weights_only=False)["training_weights"]
            history = json.loads((Path(d) / "state.json").read_text())["history"]
        stats = RouterClient("dist-router").summary(run_id, recent=1000)
        log = sorted((a["step"], a["rank"], a["route"], tuple(sorted(a["weights"].items()))) for a in stats["recent"])
        runs[name] = {"result": result, "weights": weights, "history": history, "log": log, "losses": stats["losses"],
                      "counts": stats["counts"]}
    killed, straight = runs["killed"], runs["straight"]
    assert (tmp_path / "crashed").read_text() == "17"  # rank 1's process really died at step 17
    # Restarted from a checkpoint (5, 10 or 15: the newest counts once Ray Train's controller registered it), not from 0.
    assert killed["result"].metrics["resumed_from"] in (5, 10, 15)
    assert [(s, r) for s, r, *_ in killed["log"]] == [(s, r) for s in range(20) for r in range(2)]  # each (step, rank) once
    assert killed["log"] == straight["log"]  # the same route and the same adaptive weights at every step
    assert len({w for *_, w in straight["log"]}) > 1  # the weights did move with the losses
    assert killed["losses"] == straight["losses"] and sum(s["count"] for s in killed["losses"].values()) == 20
    assert killed["counts"] == straight["counts"] and sum(killed["counts"].values()) == 20 * 16
    assert all(torch.equal(killed["weights"][n], w) for n, w in straight["weights"].items())
    assert [h["step"] for h in killed["history"]] == [5, 10, 15, 20]  # every progress window once
    # Rank 0's TensorBoard curves: the resumed attempt continues them, each window once (TensorBoard's reader), with
    # the uninterrupted run's losses and learning rates.
    curves = {name: read_scalars(tmp_path / name / "run" / "tensorboard" / "train") for name in runs}
    assert {"loss/t2i", "optim/lr", "optim/grad_norm", "route_mix/t2i", "time_share/rollout"} <= set(curves["straight"])
    assert [s for s, _ in curves["killed"]["throughput/samples_per_s"]] == [5, 10, 15, 20]
    for tag in [t for t in curves["straight"] if t.startswith(("loss/", "optim/lr", "route_mix/"))]:
        assert dict(curves["killed"][tag]) == pytest.approx(dict(curves["straight"][tag]), rel=1e-6), tag


def test_a_killed_teacher_replica_is_retried_transparently(stack):
    import ray

    from danceopd.suite import CapabilitySuite
    from services.teachers.client import TeacherClient

    client = TeacherClient("dist-t2i", app_prefix="", retries=8, backoff_s=0.5)
    cond = CapabilitySuite("basic").bucket("t2i").sample(4, 0)
    x, sigma = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.5)
    before = client.velocity(x, sigma, cond)
    old = client._call(lambda h: h.describe.remote(), 0)
    old_id = old["replica_id"]
    actor = ray.get_actor(replica_actor("dist-t2i", old_id), namespace="serve")
    ray.kill(actor, no_restart=True)
    deadline = time.time() + 120
    while True:  # ray.kill returns at once: wait until the replica is really gone (a slow answer is not death)
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.ActorDiedError:
            break
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):  # unreachable for now is not dead
            pass
        assert time.time() < deadline, f"replica {old_id} still answers 120 s after ray.kill"
        time.sleep(0.2)
    # The GCS marks the actor dead before its raylet has killed the process; until then a handle that already holds a
    # connection to it can still be answered by it (seen once in CI on the loaded 2-core machine). Wait for the process.
    while process_alive(old["pid"]):
        assert time.time() < deadline, f"replica {old_id}'s process {old['pid']} still runs 120 s after ray.kill"
        time.sleep(0.2)
    after = client.velocity(x, sigma, cond)  # the first attempts fail; Serve starts a new replica; the retry lands
    torch.testing.assert_close(after, before)
    assert client._call(lambda h: h.describe.remote(), 0)["replica_id"] != old_id  # answered by a new replica


def test_a_diverged_run_stops_on_every_worker_with_one_clear_message(stack, tmp_path):
    """lr=1e30 blows the weights up at step 1: the rollouts turn NaN, no worker sends them to a teacher (which would
    refuse them and fail the worker group), every update is skipped alike on both ranks (the decision is the all-reduced
    gradient's), and after optim.max_nonfinite_steps in a row the run ends without a checkpoint and with the reason."""
    from trainer.distributed import run_distributed, stop_marker
    from trainer.main import training_failed

    cfg = job(tmp_path, steps=20, log_every=5, checkpoint_every=100,
              **{"optim.lr": 1e30, "optim.max_nonfinite_steps": 3, "cluster.max_failures": 0})
    run_id = f"nan-{uuid.uuid4().hex[:6]}"
    result = run_distributed(cfg, run_id)  # max_failures 0: a worker error would raise here
    assert result.error is None and result.checkpoint is None
    reason = stop_marker(cfg, run_id).read_text()
    assert reason.startswith("stopped at step 4: 3 updates in a row had a non-finite loss or gradient (optim.max_nonfinite_steps=3)")
    text = training_failed(cfg, run_id, reason)
    assert text.splitlines() == [f"error: training failed (run {run_id}):", f"  {reason}",
                                 "  no checkpoint was written; the workers' full tracebacks are in Ray's logs (ray logs, or the dashboard)"]


def test_a_run_that_fails_for_good_ends_with_one_line_per_failed_worker_and_the_resume_point(stack, tmp_path):
    import ray.train

    from trainer.distributed import run_distributed
    from trainer.main import training_failed

    cfg = job(tmp_path, steps=8, log_every=2, checkpoint_every=2, **{"cluster.max_failures": 0})
    run_id = f"fail-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ray.train.TrainingFailedError) as err:  # what Ray Train raises once its restarts are spent
        run_distributed(cfg, run_id, crash_once={"rank": 1, "step": 5, "marker": str(tmp_path / "crashed")})
    text = training_failed(cfg, run_id, err.value)
    lines = text.splitlines()
    assert lines[0] == f"error: training failed (run {run_id}):" and "Traceback" not in text and 'File "' not in text
    assert any(ln.startswith("  rank 1: ") and "died" in ln for ln in lines), text  # the worker that died, named
    assert f"re-running the same command resumes from {cfg.storage_path / run_id}/checkpoint_" in lines[-1], text
    named = Path(lines[-1].split("resumes from ")[1].split(";")[0])
    assert named.is_dir() and (named / "state.json").exists(), named  # a checkpoint, not Ray Train's snapshot file beside them
    assert all(len(ln) < 420 for ln in lines)


def test_the_job_attaches_only_to_services_that_serve_its_config(stack, tmp_path):
    """Running applications with the expected names are checked against the job's own teachers and store: the
    same config attaches; another teacher (a different suite tau) or another Redis store is refused, naming the keys."""
    from trainer.main import ServiceError, ensure_services

    lines = []
    ensure_services(job(tmp_path), log=lines.append)  # the stack's own config: attaches, deploys nothing
    assert lines == [f"attached to running teachers {APPS}"]
    with pytest.raises(ServiceError) as err:
        ensure_services(job(tmp_path, **{"suite.tau": 0.05, "services.router_redis_url": "redis://:secret@localhost:6399/0"}),
                        log=lines.append)
    text = str(err.value)
    for app in APPS:
        assert f"{app!r} differs in" in text
    cap = APPS[0].removeprefix("dist-")
    assert f"{cap}.field.tau (running 0.0, this job 0.05)" in text
    assert "'dist-router' keeps runs in {'kind': 'ray'}, this job's router.redis_url is redis://localhost:6399/0" in text
    assert "secret" not in text and "serve delete" in text


def test_a_failing_teacher_is_named_in_metrics_and_in_the_failure_after_bounded_step_retries(stack, ray_cluster, tmp_path):
    """One teacher answers slower than cluster.timeout_s: each attempt times out and is cancelled; the worker's circuit
    to it opens (the metric says which teacher, while the others stay healthy), the query is sent again after each
    pause (cluster.step_retries), and then the run fails naming that teacher, instead of hanging or failing anonymously."""
    import urllib.request

    import ray.train
    from ray import serve

    from trainer.distributed import run_distributed
    from trainer.main import ensure_services, training_failed

    cfg = job(tmp_path, steps=12, log_every=4, checkpoint_every=100,
              **{"services.app_prefix": "sickjob-", "services.teachers.t2i.simulated_call_s": 5.0, "cluster.timeout_s": 0.5,
                 "cluster.teacher_failures_to_open": 2, "cluster.teacher_pause_s": 4.0, "cluster.step_retries": 2,
                 "cluster.max_failures": 0})
    ensure_services(cfg, log=lambda m: None)
    seen, stop = set(), threading.Event()

    def watch():  # the circuit gauge, as Prometheus scrapes it, while the run goes on
        while not stop.is_set():
            with urllib.request.urlopen(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10) as resp:
                for ln in resp.read().decode().splitlines():
                    if ln.startswith("ray_danceopd_trainer_teacher_circuit_open{") and ln.endswith(" 1.0"):
                        seen.add(ln.split('teacher="')[1].split('"')[0])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_id = f"sick-{uuid.uuid4().hex[:6]}"
    try:
        with pytest.raises(ray.train.TrainingFailedError) as err:
            run_distributed(cfg, run_id)
    finally:
        stop.set()
        watcher.join(30)
        for app in ("sickjob-t2i", "sickjob-local_edit", "sickjob-global_edit"):
            serve.delete(app)
    text = training_failed(cfg, run_id, err.value)
    assert "teacher 'sickjob-t2i'" in text and "Traceback" not in text, text
    assert seen == {"sickjob-t2i"}, seen


def replica_counts(metrics_port: int) -> dict[str, float]:
    """Healthy TeacherServer replicas per application, from Ray's metrics export as Prometheus scrapes it: the
    teachers dashboard's "Healthy replicas" panel, sum by (application) of the same gauge."""
    import re
    import urllib.request

    from danceopd.telemetry import SERVE_REPLICAS_HEALTHY

    counts: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(SERVE_REPLICAS_HEALTHY + "{") and 'deployment="TeacherServer"' in line:
                app = re.search(r'application="([^"]+)"', line).group(1)
                counts[app] = counts.get(app, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def running_replicas(app: str) -> int:
    """The replicas Serve's controller runs for a teacher application: what the autoscaler decided."""
    from ray import serve

    return serve.status().applications[app].deployments["TeacherServer"].replica_states.get("RUNNING", 0)


def until(condition, timeout_s: float, every_s: float = 0.5) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return condition()


class QueryLoad:
    """`threads` callers querying a teacher back to back (each waits for its answer): load that keeps its ongoing
    requests above the autoscaling target however slowly the machine runs, until stopped."""

    def __init__(self, client, shape: tuple, threads: int):
        from danceopd.fields.base import Conditions

        self.client, self.stop, self.calls = client, threading.Event(), 0
        x, sigma, cond = torch.randn(2, *shape), torch.full((2,), 0.5), Conditions(["a red circle", "a blue square"])
        self.threads = [threading.Thread(target=self._run, args=(x, sigma, cond), daemon=True) for _ in range(threads)]

    def _run(self, x, sigma, cond) -> None:
        while not self.stop.is_set():
            self.client.velocity(x, sigma, cond)
            self.calls += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_a_teacher_scales_on_its_own_under_a_job_and_the_job_computes_the_same(stack, ray_cluster, tmp_path):
    """The t2i teacher autoscales (1 to 3 replicas; each call made to last 0.25 s by the device-bound sleep option, as a
    teacher on its own GPU would): under load it grows, the dashboard's replica gauge shows it, the job trains against it
    meanwhile and computes what the reference trainer computes, bit for bit (one worker, four micro-batches in flight per
    step; batching is off: a batched teacher's answer depends, in the last bit, on which other queries share its model
    call); idle, it shrinks back; the other teachers keep one replica throughout. The load is driven until the effect is
    observed (within a bound), and the assertions read what Serve decided, so a busy machine slows the test, not fails it."""
    from ray import serve

    from trainer.distributed import run_distributed
    from trainer.main import ensure_services
    from trainer.reference import ReferenceTrainer

    scaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 0.5, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
               "metrics_interval_s": 0.5, "look_back_period_s": 2.0}
    cfg = job(tmp_path, steps=24, log_every=8, checkpoint_every=24, **{
        "cluster.num_workers": 1, "optim.batch_size": 8, "optim.grad_accum": 4, "services.app_prefix": "auto-",
        "routes": {"t2i": {"capability": "t2i", "weight": 2.0}, "local_edit": {"capability": "local_edit"},
                   "global_edit": {"capability": "global_edit"}},
        "services.teacher_defaults": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}, "batching": {"enabled": False}},
        "services.teachers.t2i": {"autoscaling_config": scaling, "simulated_call_s": 0.25}})
    apps = ["auto-t2i", "auto-local_edit", "auto-global_edit"]
    ensure_services(cfg, log=lambda m: None)
    others: list[int] = []
    client = cfg.teacher_client("t2i")
    try:
        with QueryLoad(client, client.info.sample_shape, threads=4) as load:
            grew = until(lambda: running_replicas("auto-t2i") >= 2, 180)  # the autoscaler's decision under load
            shown = until(lambda: replica_counts(ray_cluster.metrics_port).get("auto-t2i", 0) >= 2, 90)  # and the dashboard's
            scaled = run_distributed(cfg, f"auto-{uuid.uuid4().hex[:6]}", record_step_losses=True)  # trains against it
            others += [running_replicas(a) for a in apps[1:]]
        shrank = until(lambda: running_replicas("auto-t2i") == 1, 120)  # idle now: back to min_replicas
        shown_after = until(lambda: replica_counts(ray_cluster.metrics_port).get("auto-t2i") == 1, 90)
        others += [running_replicas(a) for a in apps[1:]]
    finally:
        for a in apps:
            serve.delete(a)
    assert grew and shown and load.calls > 0, (grew, shown, load.calls)  # grew under load, the gauge showed it ...
    assert shrank and shown_after  # ... and shrank once the load was gone
    assert others == [1, 1, 1, 1]  # the other teachers kept their single replica
    assert scaled.error is None and scaled.metrics["resumed_from"] == 0 and scaled.metrics["step"] == 24
    ref = ReferenceTrainer(cfg, log=lambda m: None)
    torch.set_num_threads(1)
    ref_losses = [ref.train_step()["loss"] for _ in range(24)]
    assert step_losses(scaled, ref.route_log) == ref_losses  # bit for bit, whatever the replica count was


def test_routing_groups_on_two_workers_match_the_reference_and_survive_a_killed_worker(stack, tmp_path):
    """method.routing: groups (the official toolkit's accumulation groups) on 2 workers x grad_accum 2: every step each
    rank runs every route for 2 micro-batches (6 per rank), the loss divided by 6. Rank 0's per-route losses and the
    final weights are those of the reference trainer standing for both ranks (world_size=2; DDP's all-reduce sums in
    another order, so to rounding); rank 1 killed at step 4 changes nothing (weights bit for bit). Each worker's micro-batch
    of 4 states is predicted in chunks of 3 and 1 (optim.states_per_backward), the gradients all-reduced once per step."""
    from trainer.distributed import run_distributed
    from trainer.reference import ReferenceTrainer

    over = {"steps": 6, "log_every": 6, "checkpoint_every": 6, "method.routing": "groups", "optim.grad_accum": 2,
            "optim.batch_size": 8, "optim.states_per_backward": 3, "cluster.max_failures": 1}
    cfg = job(tmp_path / "straight", **over)
    ref = ReferenceTrainer(cfg, log=lambda m: None, world_size=2)
    torch.set_num_threads(1)
    ref_out = [ref.train_step() for _ in range(6)]
    straight = run_distributed(cfg, f"groups-{uuid.uuid4().hex[:6]}", record_step_losses=True)
    assert straight.error is None
    logged = json.loads(straight.metrics["step_losses"])  # rank 0: each route's mean loss, every step
    assert set(logged) == set(cfg.routes) and all(len(v) == 6 for v in logged.values())
    for route, values in logged.items():
        assert values == pytest.approx([o["rank_route_losses"][0][route] for o in ref_out], rel=1e-4), route
    weights = {}
    for name, result in (("straight", straight),):
        with result.checkpoint.as_directory() as d:
            weights[name] = torch.load(Path(d) / "optimizer.pt", weights_only=False)["training_weights"]
    ref_weights = ref.student.transformer.state_dict()
    for n, w in weights["straight"].items():
        assert torch.allclose(w, ref_weights[n], rtol=1e-4, atol=1e-6), n
    killed_cfg = job(tmp_path / "killed", **{**over, "checkpoint_every": 2})
    crash = {"rank": 1, "step": 4, "marker": str(tmp_path / "crashed")}
    killed = run_distributed(killed_cfg, f"groups-k-{uuid.uuid4().hex[:6]}", crash_once=crash)
    assert killed.error is None and killed.metrics["step"] == 6 and (tmp_path / "crashed").read_text() == "4"
    assert killed.metrics["resumed_from"] in (2, 4)
    with killed.checkpoint.as_directory() as d:
        killed_weights = torch.load(Path(d) / "optimizer.pt", weights_only=False)["training_weights"]
    assert all(torch.equal(killed_weights[n], w) for n, w in weights["straight"].items())
