"""Distributed training groundwork: Ray Train workers + router service + teacher deployments, for real."""

import json
import uuid

import pytest
import torch

from danceopd.config import load_config

SMALL = {"student.num_layers": 2, "student.attention_head_dim": 16, "optim.batch_size": 8, "method.rollout_steps": 4,
         "optim.warmup_steps": 0, "optim.lr": 2e-3, "torch_threads": 1}
APPS = {"t2i": "dist-t2i", "local_edit": "dist-local_edit", "global_edit": "dist-global_edit"}


@pytest.fixture(scope="module")
def stack(ray_cluster):
    from ray import serve

    from router.deployment import router_app
    from services.teachers.app import deploy_teachers
    from services.teachers.config import load_teachers_config

    teachers = load_teachers_config({"app_prefix": "dist-", "teachers": [
        {"name": n, "field": {"kind": "suite", "capability": n}, "ray_actor_options": {"num_cpus": 0.25}} for n in APPS]})
    deploy_teachers(teachers, gateway=False)
    serve.run(router_app({}), name="dist-router", route_prefix=None)
    yield
    for app in [*APPS.values(), "dist-router"]:
        serve.delete(app)


def test_two_workers_train_through_router_and_teachers(stack, tmp_path):
    from router.client import RouterClient
    from trainer.distributed import run_distributed

    cfg = load_config(None, {**SMALL, "steps": 48})
    run_id = f"dist-{uuid.uuid4().hex[:6]}"
    result = run_distributed(cfg, run_id, num_workers=2, storage_path=str(tmp_path), teacher_apps=APPS,
                             router_app="dist-router", report_every=16, cpus_per_worker=0.5)
    assert result.error is None
    assert result.checkpoint is not None and result.metrics["step"] == 48 and result.metrics["resumed_from"] == 0
    router = RouterClient("dist-router")
    again = router.assign(run_id, 0, 1, 0)  # a retried request gets the logged assignment
    assert again["step"] == 0 and again["rank"] == 1
    stats = router.summary(run_id, recent=1000)
    # Every (step, rank) was assigned exactly once: 48 steps x 2 ranks x 8 samples, no step lost or repeated.
    assert sum(stats["counts"].values()) == 48 * 2 * 8
    assert sorted((a["step"], a["rank"]) for a in stats["recent"]) == [(s, r) for s in range(48) for r in range(2)]
    for route, st in stats["losses"].items():  # each route's loss fell well below its own starting level
        assert st["count"] >= 4 and st["ema"] < 0.5 * st["scale"], (route, st)


def test_one_worker_reproduces_the_reference_trainer(stack, tmp_path):
    from trainer.distributed import run_distributed
    from trainer.reference import ReferenceTrainer

    cfg = load_config(None, {**SMALL, "steps": 6, "output_dir": str(tmp_path / "ref"), "checkpoint_every": 1000})
    ref = ReferenceTrainer(cfg, log=lambda m: None)
    torch.set_num_threads(1)
    ref_losses = [ref.train_step()["loss"] for _ in range(6)]
    result = run_distributed(cfg, f"one-{uuid.uuid4().hex[:6]}", num_workers=1, storage_path=str(tmp_path / "dist"),
                             teacher_apps=APPS, router_app="dist-router", report_every=6, cpus_per_worker=0.5)
    steps = json.loads(result.metrics["step_losses"])
    routes = [ref.route_log[i] for i in range(6)]
    dist_losses = []
    cursor = {r: 0 for r in steps}
    for r in routes:
        dist_losses.append(steps[r][cursor[r]])
        cursor[r] += 1
    assert dist_losses == pytest.approx(ref_losses, rel=1e-5), (dist_losses, ref_losses)  # measured: bit-identical


def test_a_killed_worker_resumes_from_the_checkpoint_without_losing_or_repeating_steps(stack, tmp_path):
    from router.client import RouterClient
    from trainer.distributed import run_distributed

    cfg = load_config(None, {**SMALL, "steps": 20})
    run_id = f"kill-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "crashed"
    result = run_distributed(cfg, run_id, num_workers=2, storage_path=str(tmp_path / "store"), teacher_apps=APPS,
                             router_app="dist-router", report_every=5, cpus_per_worker=0.5, max_failures=1,
                             crash_once={"rank": 1, "step": 17, "marker": str(marker)})
    assert marker.read_text() == "17"  # rank 1's process really died at step 17
    assert result.error is None and result.metrics["step"] == 20
    # The restarted workers continued from a checkpoint (5, 10 or 15: the newest one only counts once Ray
    # Train's controller has registered it, which can race with the crash), not from scratch.
    assert result.metrics["resumed_from"] in (5, 10, 15)
    stats = RouterClient("dist-router").summary(run_id, recent=1000)
    # Steps after the checkpoint ran again after the restart: the router answered them from its
    # log, so each (step, rank) appears once and the sample counts are those of 20 clean steps.
    assert sorted((a["step"], a["rank"]) for a in stats["recent"]) == [(s, r) for s in range(20) for r in range(2)]
    assert sum(stats["counts"].values()) == 20 * 2 * 8


def test_a_killed_teacher_replica_is_retried_transparently(stack):
    import ray

    from danceopd.suite import CapabilitySuite
    from services.teachers.client import TeacherClient

    client = TeacherClient("dist-t2i", app_prefix="", retries=8, backoff_s=0.5)
    cond = CapabilitySuite("basic").bucket("t2i").sample(4, 0)
    x, sigma = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.5)
    before = client.velocity(x, sigma, cond)
    old_id = client._call(lambda h: h.describe.remote(), 0)["replica_id"]
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "dist-t2i" in a["name"] and "TeacherServer" in a["name"]]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    after = client.velocity(x, sigma, cond)  # the first attempts fail; Serve starts a new replica; the retry lands
    torch.testing.assert_close(after, before)
    assert client._call(lambda h: h.describe.remote(), 0)["replica_id"] != old_id  # answered by a new replica
