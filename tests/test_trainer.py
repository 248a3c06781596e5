"""The reference trainer: learning, determinism, exact resume, ablation switches, config errors."""

import json
import subprocess
import sys

import pytest
import torch

from danceopd.config import ConfigError, load_config
from trainer.reference import ReferenceTrainer, main
from trainer.job import JobConfig
from trainer.steps import StepTimes, dataset_states, query_batch

SMALL = {
    "student.num_layers": 2, "student.attention_head_dim": 16, "optim.batch_size": 8, "method.rollout_steps": 4,
    "log_every": 2, "checkpoint_every": 1000, "torch_threads": 2, "optim.warmup_steps": 0,
}


def small_config(tmp_path, **extra):
    return load_config(None, {**SMALL, "output_dir": str(tmp_path), **extra})


def params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.student.transformer.parameters()])


def test_loss_falls_on_every_route(tmp_path):
    cfg = small_config(tmp_path, steps=60, **{"optim.batch_size": 16, "optim.lr": 2e-3})
    tr = ReferenceTrainer(cfg, log=lambda m: None)
    per_route = {r: [] for r in cfg.routes}
    for _ in range(cfg.steps):
        out = tr.train_step()
        per_route[out["route"]].append(out["loss"])
    for r, losses in per_route.items():
        assert len(losses) >= 10, (r, len(losses))
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.5 * first, (r, first, last)


@pytest.mark.parametrize("ema_decay, routing", [(0.995, "hard"), (0.0, "hard"), (0.995, "adaptive")])
def test_same_seed_same_run_and_exact_resume(tmp_path, ema_decay, routing):
    ema_cfg = {"optim.ema_decay": ema_decay, "method.routing": routing}
    straight = ReferenceTrainer(small_config(tmp_path / "a", steps=6, **ema_cfg), log=lambda m: None)
    straight.fit()
    again = ReferenceTrainer(small_config(tmp_path / "b", steps=6, **ema_cfg), log=lambda m: None)
    again.fit()
    assert torch.equal(params(straight), params(again))

    cfg = small_config(tmp_path / "c", steps=6, checkpoint_every=3, **ema_cfg)
    first = ReferenceTrainer(cfg, log=lambda m: None)
    first.fit(steps=3)  # "crash" after step 3's checkpoint
    del first
    resumed = ReferenceTrainer(cfg, log=lambda m: None)
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    assert resumed.route_log == straight.route_log
    assert torch.equal(params(resumed), params(straight))
    if ema_decay > 0:
        ema = lambda t: torch.cat([p.flatten() for p in t.ema.params.values()])  # noqa: E731
        assert torch.equal(ema(resumed), ema(straight))
    else:
        assert resumed.ema is None and straight.ema is None
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)
    if routing == "adaptive":  # the adaptive router's loss statistics came back with the checkpoint
        stats = lambda t: t.adaptive.store.get_loss_stats("reference")  # noqa: E731
        assert stats(resumed) == stats(straight) and len(stats(straight)) >= 2


def test_stale_schedule_trains_on_states_of_the_weights_before_the_last_update_and_resumes_exactly(tmp_path):
    """method.staleness 1: step s trains on states rolled out with the weights before update s - 1 (the same states
    a fresh trainer holding those weights draws for step s), except at checkpoints, where the pipeline refills:
    a run resumed there equals the uninterrupted one bit for bit. Two micro-batches per step."""
    over = {"method.staleness": 1, "optim.grad_accum": 2, "checkpoint_every": 3, "steps": 6}
    stale = ReferenceTrainer(small_config(tmp_path / "a", **over), log=lambda m: None)
    fresh = ReferenceTrainer(small_config(tmp_path / "b", **{**over, "method.staleness": 0}), log=lambda m: None)
    assert torch.equal(params(stale), params(fresh))  # same initial weights
    stale.train_step()  # step 0 (fresh: a checkpoint boundary) also rolls out step 1 before its update
    ahead = stale.prepared[1]
    want = fresh.prepare(1, StepTimes())  # the weights before update 0
    assert [mb.route for mb in ahead] == [mb.route for mb in want]
    for a, b in zip(ahead, want):
        assert torch.equal(a.q.x, b.q.x) and torch.equal(a.target.result(), b.target.result())
    fresh.train_step()
    assert not torch.equal(fresh.prepare(1, StepTimes())[0].q.x, ahead[0].q.x)  # the non-stale step 1 sees new weights
    stale.fit()
    assert 3 not in stale.prepared and stale.step == 6  # nothing is carried over a checkpoint

    first = ReferenceTrainer(small_config(tmp_path / "c", **over), log=lambda m: None)
    first.fit(steps=3)  # "crash" after step 3's checkpoint
    resumed = ReferenceTrainer(small_config(tmp_path / "c", **over), log=lambda m: None)
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    assert resumed.route_log == stale.route_log and torch.equal(params(resumed), params(stale))


def test_unused_parameter_probe_finds_what_gets_no_gradient_and_leaves_no_trace(tmp_path):
    from trainer.distributed import unused_parameters

    tr = ReferenceTrainer(small_config(tmp_path), log=lambda m: None)
    probes = {r: d.sample(1, 0) for r, d in tr.data.items()}
    rng = torch.get_rng_state()
    assert unused_parameters(tr.student, probes) == []  # every parameter of the suite's student is used by every route
    tr.student.transformer.register_parameter("spare", torch.nn.Parameter(torch.zeros(3)))
    assert unused_parameters(tr.student, probes) == ["spare"]
    assert torch.equal(torch.get_rng_state(), rng) and not tr.student.field.prompts.entries
    assert all(p.grad is None for p in tr.student.transformer.parameters())


def test_hard_routing_uses_one_route_per_step_by_weight(tmp_path):
    cfg = small_config(tmp_path, **{"routes": {"t2i": {"capability": "t2i", "weight": 3.0},
                                               "global_edit": {"capability": "global_edit", "weight": 1.0}}})
    tr = ReferenceTrainer(cfg, log=lambda m: None)
    routes = [tr.router.route(s) for s in range(4000)]
    share = routes.count("t2i") / len(routes)
    assert abs(share - 0.75) < 0.03  # 4000 draws: std 0.007
    assert routes == [tr.router.route(s) for s in range(4000)]


@pytest.mark.parametrize("method", [
    {"method.routing": "soft"},
    {"method.states": "off_policy"},
    {"method.states": "off_policy", "method.target": "data"},
    {"method.states": "teacher_rollout"},
    {"method.query_position": "dense", "method.loss": "dense_dt2"},
    {"method.query_position": "stratified", "method.k": 3},
    {"method.query_position": "high", "method.schedule": "sd3", "method.shift": 3.0},
    {"optim.grad_accum": 2},
])
def test_ablation_switches_train(tmp_path, method):
    tr = ReferenceTrainer(small_config(tmp_path, steps=2, **method), log=lambda m: None)
    before = params(tr).clone()
    out = tr.train_step()
    assert torch.isfinite(torch.tensor(out["loss"])) and out["loss"] > 0
    assert not torch.equal(before, params(tr))


def test_cosine_schedule_warms_up_and_decays(tmp_path):
    tr = ReferenceTrainer(small_config(tmp_path, steps=100, **{"optim.lr_schedule": "cosine", "optim.warmup_steps": 10,
                                                               "optim.lr": 1e-3, "optim.min_lr_ratio": 0.1}), log=lambda m: None)
    assert tr.lr_at(0) == pytest.approx(1e-4) and tr.lr_at(9) == pytest.approx(1e-3)
    assert tr.lr_at(10) == pytest.approx(1e-3) and tr.lr_at(55) == pytest.approx(0.55e-3)
    assert tr.lr_at(100) == pytest.approx(1e-4) and tr.lr_at(500) == pytest.approx(1e-4)


def test_query_batch_shapes_follow_k_and_position(tmp_path):
    tr = ReferenceTrainer(small_config(tmp_path, **{"method.k": 3, "method.query_position": "uniform"}), log=lambda m: None)
    cond = tr.suite.bucket("local_edit").sample(5, 0)
    q = tr.query_batch("local_edit", cond, 0, 0)
    assert q.x.shape == (15, 3, 16, 16) and q.sigma.shape == (15,)
    assert q.conditions.prompts[:3] == [cond.prompts[0]] * 3
    assert torch.equal(q.conditions.source[1], cond.source[0])
    assert set(q.sigma.tolist()) <= set(tr.sigmas()[:-1].tolist())


def test_off_policy_share_replaces_the_first_samples_states_with_noised_data(tmp_path):
    """A share of 0.5 of 4 samples: samples 0-1 sit on the data path (x = (1 - sigma) x0 + sigma eps, at the same
    sigma as the rollout would), samples 2-3 keep the student's own rollout states bit for bit."""
    cond = None
    batches = {}
    for share in (0.0, 0.5):
        tr = ReferenceTrainer(small_config(tmp_path, **{"method.k": 2, "method.off_policy_share": share}), log=lambda m: None)
        cond = cond or tr.suite.bucket("t2i").sample(4, 0)
        batches[share] = tr.query_batch("t2i", cond, 0, 0)
    on, mixed = batches[0.0], batches[0.5]
    assert torch.equal(mixed.sigma, on.sigma) and torch.equal(mixed.x[4:], on.x[4:])
    assert not torch.allclose(mixed.x[:4], on.x[:4], atol=1e-3)
    refs = tr.suite.field("t2i").references
    x0k, eps = dataset_states(tr.cfg, tr.suite, "t2i", cond.select(slice(0, 2)), 2, 0, 0, 0, tr.device)
    for i in range(4):  # (x - sigma eps) / (1 - sigma) must be one of the prompt's dataset images
        x0 = (mixed.x[i] - mixed.sigma[i] * eps[i]) / (1 - mixed.sigma[i])
        assert torch.allclose(x0, x0k[i], atol=1e-4)
        assert min(float((x0 - r).abs().max()) for r in refs(cond.prompts[i // 2])) < 1e-4


@pytest.mark.parametrize("threads", [1, 2])
def test_truncated_rollouts_query_the_full_rollouts_states_bit_for_bit(tmp_path, threads):
    """The suite's student (demo size), batches that shrink (16, 32) and one that cannot (6), low / uniform K=3 /
    dense queries and an off-policy share: truncated and full rollouts give identical states, at 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for over in ({}, {"method.query_position": "uniform", "method.k": 3}, {"method.query_position": "dense"},
                     {"method.off_policy_share": 0.25}):
            cfg = load_config("experiments/base.yaml", {**over, "torch_threads": threads, "output_dir": str(tmp_path)}, model=JobConfig)
            tr = ReferenceTrainer(cfg, log=lambda m: None)
            full = cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"truncate_rollout": False})})
            rows = {True: 0, False: 0}
            for step, (route, b) in enumerate([("t2i", 16), ("local_edit", 32), ("global_edit", 6), ("local_edit", 16)]):
                cond = tr.data[route].sample(b, step)
                short = query_batch(cfg, tr.suite, tr.sigmas, tr.student.field, route, cond, step, 0, 0, tr.device)
                ref = query_batch(full, tr.suite, tr.sigmas, tr.student.field, route, cond, step, 0, 0, tr.device)
                assert torch.equal(short.x, ref.x) and torch.equal(short.sigma, ref.sigma), (over, route, b)
                rows[True] += short.rollout_rows
                rows[False] += ref.rollout_rows
            n = cfg.method.rollout_steps
            if over == {"method.query_position": "dense"}:  # every state is queried: only the final step is saved
                assert rows[True] / rows[False] == (n - 1) / n
            else:  # measured (2026-12, calls of at least MIN_ROWS = 12 rows): 0.74 of the full rollout's rows at the low
                # position, 0.80 with 3 uniform queries (their deepest is lower); 0.70 / 0.68 before the 12-row floor
                assert rows[True] / rows[False] < (0.85 if over.get("method.k") else 0.78), (over, rows)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("override,needle", [
    ({"method.off_policy_share": 0.25, "method.states": "off_policy"}, "states: on_policy"),
    ({"method.off_policy_share": 1.0}, "method.off_policy_share"),
    ({"method.query_position": "middle"}, "method.query_position"),
    ({"optim.lr": -1}, "optim.lr"),
    ({"routes": {"x": {"capability": "inpainting"}}}, "routes.x.capability"),
    ({"student.sample_size": 32}, "sample_size"),
    ({"method.loss": "dense_dt2"}, "query_position: dense"),
    ({"optim.batchsize": 3}, "optim.batchsize"),
    ({"method.staleness": 2}, "method.staleness"),
    ({"execution.truncate_rollouts": False}, "execution.truncate_rollouts"),
    ({"execution.rollout_chunk": 6}, "execution.rollout_chunk"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_cli_bad_config_exits_2_with_message(tmp_path, capsys):
    assert main(["method.k=0"]) == 2
    err = capsys.readouterr().err
    assert "method.k" in err and "Traceback" not in err
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run([sys.executable, "-m", "trainer.reference", "--config", str(missing)], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path):
    from trainer.cli import check_resume_config

    def cfg(**over):
        return load_config(None, {"output_dir": str(tmp_path), "steps": 4, "log_every": 2, "checkpoint_every": 2, **over},
                           model=JobConfig)  # what the CLI loads

    assert main([f"output_dir={tmp_path}", "steps=4", "log_every=2", "checkpoint_every=2"]) == 0  # a run with checkpoints
    # How far and how it runs may change on resume; what an update computes may not.
    assert check_resume_config(cfg(steps=8, max_minutes=5.0, **{"execution.truncate_rollout": False}), fresh=False, allow_change=False) == []
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.01.*--allow-config-change"):
        check_resume_config(cfg(**{"optim.lr": 0.01}), fresh=False, allow_change=False)
    proc = subprocess.run([sys.executable, "-m", "trainer.reference", f"output_dir={tmp_path}", "steps=6", "seed=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "seed: 0 -> 3" in proc.stderr and "Traceback" not in proc.stderr
    assert check_resume_config(cfg(seed=3), fresh=False, allow_change=True) == ["seed"]  # allowed, and recorded
    assert check_resume_config(cfg(seed=3), fresh=False, allow_change=False) == []


def test_shipped_configs_validate(tmp_path):
    from trainer.job import load_job_config

    load_config("configs/hard-tier.yaml")
    demo = load_job_config("configs/demo.yaml")
    assert demo.worker_batch_size == 16 and [t.name for t in demo.teachers_config().teachers] == ["t2i", "local_edit", "global_edit"]
    # The real-model jobs validate offline up to model loading (hub ids, shipped manifests); the GPU job derives
    # CUDA LoRA teachers with a GPU per replica, CFG on the cfg route, autoscaling by default and the override.
    for path in ("configs/sd35-medium-lora.yaml", "configs/flux-kontext-lora.yaml"):
        job = load_job_config(path)
        assert job.student.trains_lora and job.student.lora.rank == 128 and job.dtype == "bfloat16"
    gpu_job = load_job_config("configs/gpu-cluster.yaml")
    assert gpu_job.student.model_family.name == "sd3" and gpu_job.method.rollout_steps == 16 and gpu_job.method.shift == 3.0
    gpu = gpu_job.teachers_config()
    by_name = {t.name: t for t in gpu.teachers}
    assert by_name["text"].field.kind == "diffusers" and by_name["text"].field.loras[0].path == "jieliu/SD3.5M-FlowGRPO-Text"
    assert by_name["text"].field.path == "stabilityai/stable-diffusion-3.5-medium" and by_name["text"].field.resolution == 1024
    assert by_name["cfg"].field.kind == "cfg" and by_name["cfg"].field.base == "cfg-base"
    assert all(t.device == "cuda" and t.ray_actor_options.num_gpus == 1 for t in gpu.teachers)
    assert by_name["cfg"].num_replicas == 2 and by_name["cfg"].autoscaling_config is None
    assert by_name["geneval"].autoscaling_config.max_replicas == 4 and by_name["geneval"].num_replicas is None


class NaNAt:
    """A teacher whose answer is NaN on the calls listed (a teacher overflowing in fp16, say); otherwise the real one."""

    def __init__(self, field, calls: set[int]):
        self.field, self.calls, self.n = field, calls, 0

    def __getattr__(self, name):
        return getattr(self.field, name)

    def velocity(self, x, sigma, cond):
        v = self.field.velocity(x, sigma, cond)
        self.n += 1
        return torch.full_like(v, float("nan")) if self.n - 1 in self.calls else v


def test_a_non_finite_update_is_skipped_and_the_run_goes_on(tmp_path):
    """A NaN target poisons one step: its update is skipped (weights, optimizer state and EMA untouched), counted and
    logged with the route, and the next steps train normally."""
    lines = []
    tr = ReferenceTrainer(small_config(tmp_path, steps=6, **{"method.routing": "adaptive"}), log=lines.append)
    tr.fit(steps=3)
    route = tr.adaptive.assign("reference", 3)["route"]
    tr.teachers[route] = NaNAt(tr.teachers[route], {0})
    before, adam_steps = params(tr).clone(), [s["step"].item() for s in tr.optimizer.state.values()]
    ema = {n: p.clone() for n, p in tr.ema.params.items()}
    stats = tr.adaptive.store.get_loss_stats("reference")
    out = tr.train_step()
    assert out["route"] == route and not out["applied"] and out["step"] == 3 and tr.step == 4
    assert torch.equal(params(tr), before)
    assert [s["step"].item() for s in tr.optimizer.state.values()] == adam_steps
    assert all(torch.equal(p, ema[n]) for n, p in tr.ema.params.items())
    assert tr.adaptive.store.get_loss_stats("reference") == stats  # a NaN never reaches the router's statistics
    assert f"step 4: non-finite loss on route {route}" in lines[-1] and "(1 in a row, 1 in all)" in lines[-1]
    result = tr.fit()
    assert "stopped" not in result and tr.step == 6 and tr.nonfinite.in_row == 0 and tr.nonfinite.total == 1
    assert torch.isfinite(params(tr)).all() and not torch.equal(params(tr), before)


def test_a_diverged_run_stops_after_the_configured_non_finite_steps_with_a_message(tmp_path, capsys):
    """lr=1e30 blows the weights up at step 1: every later update is NaN. The run stops after
    optim.max_nonfinite_steps of them in a row, exit 1 with one clear line, no traceback, no checkpoint of that state."""
    rc = main(["--config", "experiments/base.yaml", *[f"{k}={v}" for k, v in SMALL.items()], f"output_dir={tmp_path}", "steps=20",
               "optim.lr=1e30", "optim.max_nonfinite_steps=3"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.count("update skipped") == 3 and "(3 in a row, 3 in all)" in out
    assert "error: training failed: stopped at step 4: 3 updates in a row had a non-finite loss or gradient" in err
    assert "optim.max_nonfinite_steps=3" in err and "Traceback" not in out + err
    assert not (tmp_path / "demo" / "checkpoints").exists() and not (tmp_path / "demo" / "student").exists()


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Every file and folder of a checkpoint is fsynced before the rename, and the rename (its folder) after it."""
    import os

    from trainer.checkpoint import save_checkpoint

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    tr = ReferenceTrainer(small_config(tmp_path, steps=1), log=lambda m: None)
    tr.fit()
    synced.clear()
    final = save_checkpoint(tmp_path / "run", 7, tr.student, tr.ema, tr.optimizer, tr.state())
    tmp = str(final.parent / ".tmp-step-00000007")
    written = {str(p.relative_to(final)) for p in final.rglob("*")} | {"."}
    flushed = {os.path.relpath(p, tmp) for p in synced if p.startswith(tmp)}
    assert written == flushed, written ^ flushed
    assert synced[-1] == str(final.parent)  # the rename is flushed last


def test_a_checkpoint_written_on_another_gpu_restores_onto_this_process_own_device(tmp_path):
    """Every rank restores onto its own device: a checkpoint whose tensors were saved from cuda:1 (tagged so by torch's
    serializer, as rank 1 of a node writes them) restores on this CPU-only machine; torch.load without map_location
    would put them back on cuda:1 (on a GPU node: every rank's state on one card) and fails here."""
    from trainer.checkpoint import restore_checkpoint, save_checkpoint

    tr = ReferenceTrainer(small_config(tmp_path, steps=2), log=lambda m: None)
    tr.fit()
    on_gpu1 = (-1, lambda storage: "cuda:1", lambda storage, location: None)  # tags every storage saved while registered
    torch.serialization.register_package(*on_gpu1)
    try:
        path = save_checkpoint(tmp_path / "from-gpu1", tr.step, tr.student, tr.ema, tr.optimizer, tr.state())
    finally:
        torch.serialization._package_registry.remove(on_gpu1)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path / "optimizer.pt", weights_only=False)
    fresh = ReferenceTrainer(small_config(tmp_path, steps=2, run_name="fresh"), log=lambda m: None)
    assert not torch.equal(params(fresh), params(tr))
    state = restore_checkpoint(path, fresh.student.transformer, fresh.optimizer, fresh.ema)
    assert state["step"] == 2 and torch.equal(params(fresh), params(tr))
    moments = [s["exp_avg"] for s in fresh.optimizer.state.values()]
    assert moments and all(m.device.type == "cpu" for m in moments)
    assert all(torch.equal(fresh.ema.params[n], v) for n, v in tr.ema.params.items())


def test_student_side_cfg_is_a_no_op_at_one_and_the_cfg_combination_at_two(tmp_path):
    """method.student_cfg_scale (the toolkit's student_cfg_scale): at 1.0 every loss is bit for bit the default's; at 2.0
    the rollout (and the prediction) are v_u + 2 (v_c - v_u) of the student's own conditional and unconditional passes."""
    from danceopd.fields.base import Conditions
    from danceopd.flow import cfg_combine, rollout_states
    from trainer.steps import student_guided

    plain = ReferenceTrainer(small_config(tmp_path / "a", steps=3), log=lambda m: None)
    one = ReferenceTrainer(small_config(tmp_path / "b", steps=3, **{"method.student_cfg_scale": 1.0}), log=lambda m: None)
    assert [plain.train_step()["loss"] for _ in range(3)] == [one.train_step()["loss"] for _ in range(3)]
    two = ReferenceTrainer(small_config(tmp_path / "c", steps=3, **{"method.student_cfg_scale": 2.0,
                                                                  "execution.truncate_rollout": False}), log=lambda m: None)
    cond = two.suite.bucket("t2i").sample(4, 0)
    field = two.student.field
    with torch.no_grad():
        q = two.query_batch("t2i", cond, 0, 0)
        x = torch.randn(4, *field.info.sample_shape)
        s = torch.full((4,), 0.6)
        guided = student_guided(two.cfg, field).velocity(x, s, cond)
        both = cfg_combine(field.velocity(x, s, Conditions([""] * 4)), field.velocity(x, s, cond), 2.0)
        assert torch.allclose(guided, both, atol=1e-5)
        # the queried states are those of a rollout of that combination from the micro-batch's noise
        from danceopd.seeding import generator

        noise = torch.randn(4, *field.info.sample_shape, generator=generator(two.cfg.seed, "noise", 0, 0, 0))
        traj = rollout_states(lambda z, t: cfg_combine(field.velocity(z, t, Conditions([""] * len(z))), field.velocity(z, t, cond), 2.0),
                              noise, two.sigmas())
        want = traj.states[q.sigma.new_tensor([list(two.sigmas()).index(v) for v in q.sigma]).long(), torch.arange(4)]
        assert torch.allclose(q.x, want, atol=1e-4)
    assert torch.isfinite(torch.tensor(two.train_step()["loss"]))


@pytest.mark.parametrize("method", [{"method.k": 4}, {"method.query_position": "dense", "method.loss": "dense"},
                                    {"method.query_position": "dense", "method.loss": "dense", "method.dense_weight": "dt2",
                                     "method.student_cfg_scale": 2.0}], ids=["k4", "dense", "dense-dt2-cfg"])
def test_states_per_backward_gives_the_same_training_with_smaller_student_calls(tmp_path, method):
    """optim.states_per_backward: the student predicts a micro-batch's queried states a chunk at a time, each chunk's
    share of the loss backpropagated on its own. Losses and weights equal the all-at-once step's to rounding (a chunk
    that does not divide the rows included); no call with grad sees more rows than the chunk (x2: student CFG's
    unconditional pass rides in the same call); a chunk of every row is the all-at-once step bit for bit."""
    base = {"steps": 3, "optim.grad_accum": 2, "optim.batch_size": 4, **method}
    whole = ReferenceTrainer(small_config(tmp_path / "a", **base), log=lambda m: None)
    chunked = ReferenceTrainer(small_config(tmp_path / "b", **base, **{"optim.states_per_backward": 3}), log=lambda m: None)
    rows_with_grad = []
    chunked.student.transformer.register_forward_pre_hook(  # the rows of the samples a call with grad carries
        lambda module, args, kwargs: rows_with_grad.append(kwargs["hidden_states"].shape[0]) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    def grads(trainer):
        return torch.cat([p.grad.flatten() for p in trainer.student.transformer.parameters() if p.grad is not None])

    for step in range(3):
        a, b = whole.train_step(), chunked.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["route_losses"] == pytest.approx(a["route_losses"], rel=1e-5)
        if step == 0:  # from the same weights: the same gradient (largest entries ~0.1; measured differences ~2e-8)
            assert torch.allclose(grads(whole), grads(chunked), atol=2e-7, rtol=0)
    # AdamW's first steps move a near-zero gradient's weight by ~lr whatever its rounding: measured differences ~2e-6
    assert torch.allclose(params(whole), params(chunked), atol=2e-5, rtol=0)
    states = 4 * whole.cfg.method.queried_states * 2  # rows per micro-batch: 4 samples x queried states, x2 micro-batches
    per_call = 3 * (2 if "method.student_cfg_scale" in method else 1)
    assert max(rows_with_grad) == per_call and sum(rows_with_grad) == 3 * states * per_call // 3
    once = ReferenceTrainer(small_config(tmp_path / "c", **base, **{"optim.states_per_backward": 10_000}), log=lambda m: None)
    fresh = ReferenceTrainer(small_config(tmp_path / "d", **base), log=lambda m: None)
    assert [once.train_step()["loss"] for _ in range(2)] == [fresh.train_step()["loss"] for _ in range(2)]


def test_routing_groups_run_every_group_each_step_with_the_loss_divided_by_all_micro_batches(tmp_path):
    """routing: groups (the toolkit's accumulation groups): each optimizer step runs every listed route for grad_accum
    micro-batches, in order; the loss is the mean over all of them; each group's own mean is logged."""
    cfg = small_config(tmp_path, steps=2, **{"method.routing": "groups", "method.groups": ["local_edit", "t2i"], "optim.grad_accum": 2})
    tr = ReferenceTrainer(cfg, log=lambda m: None)
    batches = tr.prepare(0, StepTimes())
    assert [mb.route for mb in batches] == ["local_edit", "local_edit", "t2i", "t2i"]
    with torch.no_grad():  # each micro-batch's MSE at the weights the step starts from
        losses = [torch.mean((tr.student.field.velocity(mb.q.x, mb.q.sigma, mb.q.conditions) - mb.target.result()) ** 2).item()
                  for mb in batches]
    tr.prepared[0] = batches
    out = tr.train_step()
    assert out["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)  # divided by grad_accum x len(groups)
    assert out["route_losses"] == pytest.approx({"local_edit": sum(losses[:2]) / 2, "t2i": sum(losses[2:]) / 2}, rel=1e-5)
    with pytest.raises(ConfigError, match=r"method\.groups: unknown routes \['inpaint'\]"):
        small_config(tmp_path, **{"method.routing": "groups", "method.groups": ["inpaint"]})
    with pytest.raises(ConfigError, match=r"method\.groups is used by routing: groups"):
        small_config(tmp_path, **{"method.groups": ["t2i"]})


def test_a_run_cut_by_max_minutes_says_so_under_its_table_and_in_its_report(tmp_path, capsys):
    """A wall-clock stop makes another run than the config plans: the console says how far it got and that the cosine
    schedule did not finish, and report.json keeps steps done, steps planned and the flags (a full run: none of it)."""
    small = [f"{k}={v}" for k, v in SMALL.items()]
    quick_eval = ["eval.samples_per_capability=4", "eval.sampling_steps=2", "eval.velocity_error_samples=2"]
    rc = main(["--config", "experiments/base.yaml", *small, *quick_eval, f"output_dir={tmp_path}", "steps=40", "max_minutes=0.0001",
               "optim.lr_schedule=cosine", "--eval"])
    out = capsys.readouterr().out
    assert rc == 0
    training = json.loads((tmp_path / "demo" / "report.json").read_text())["training"]
    assert training["steps"] == 1 and training["steps_planned"] == 40
    assert training["cut_by_max_minutes"] is True and training["schedule_finished"] is False
    assert "note: cut by max_minutes=0.0001 after 1 of 40 steps, and its cosine learning-rate schedule stopped before its end" in out
    assert out.index("note: cut by") > out.rindex("global_edit")  # under the table, where the results are read

    rc = main(["--config", "experiments/base.yaml", *small, *quick_eval, f"output_dir={tmp_path}", "steps=2", "--eval", "--no-resume"])
    training = json.loads((tmp_path / "demo" / "report.json").read_text())["training"]
    assert rc == 0 and "note: cut" not in capsys.readouterr().out
    assert training["steps"] == 2 and training["steps_planned"] == 2 and not training["cut_by_max_minutes"] and training["schedule_finished"]
