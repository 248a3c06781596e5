"""Distributed DanceOPD training on Ray Train (groundwork for issue 5: the worker loop and its launcher).

Each worker rolls out its own student replica (DDP: gloo on CPU, nccl on GPU), asks the router service for
its assignment, fetches teacher velocities from the Serve deployments, and trains with the same query
states and loss as the reference trainer (`trainer.steps`). With one worker and the same config it draws
exactly what the reference trainer draws.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from danceopd.config import TrainConfig
from danceopd.flow import sigma_schedule
from danceopd.student import build_student, with_transformer
from danceopd.suite import CapabilitySuite
from trainer.ema import EMA
from trainer.steps import distillation_loss, lr_at, query_batch


def routing_config(cfg: TrainConfig, num_workers: int, teacher_apps: dict[str, str]) -> dict:
    if cfg.method.routing != "hard":
        raise ValueError(f"method.routing {cfg.method.routing!r}: the distributed trainer routes 'hard' for now")
    return {"policy": "hard", "seed": cfg.seed, "world_size": num_workers, "micro_batches": cfg.optim.grad_accum,
            "batch_size": cfg.optim.batch_size,
            "routes": {n: {"teacher": teacher_apps[n], "bucket": r.capability, "weight": r.weight} for n, r in cfg.routes.items()}}


def worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from router.client import RouterClient
    from services.teachers.client import TeacherClient

    cfg = TrainConfig.model_validate(config["train"])
    run_id, report_every = config["run_id"], config["report_every"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    suite = CapabilitySuite(cfg.suite.tier, cfg.suite.tau, cfg.suite.seed)
    student = build_student(cfg.student, device=device, dtype=cfg.dtype)
    model = ray.train.torch.prepare_model(student.transformer, parallel_strategy_kwargs={"find_unused_parameters": True})
    inner = model.module if hasattr(model, "module") else model
    train_field = with_transformer(student, model).field  # gradients flow through DDP
    roll_field = with_transformer(student, inner).field  # no-grad rollouts skip DDP's hooks
    optimizer = torch.optim.AdamW(inner.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    ema = EMA(inner, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    teachers = {name: TeacherClient(app, app_prefix="") for name, app in config["teacher_apps"].items()}
    router = RouterClient(config["router_app"])
    sigmas = sigma_schedule(cfg.method.rollout_steps, cfg.method.schedule, cfg.method.shift).to(device)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume: raw weights, optimizer, EMA, next step
        with ckpt.as_directory() as d:
            blob = torch.load(Path(d) / "state.pt", weights_only=False, map_location=device)
        inner.load_state_dict(blob["weights"])
        optimizer.load_state_dict(blob["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(blob["ema"])
        start = blob["step"]

    losses: dict[str, list[float]] = {}
    t_start = time.perf_counter()
    for step in range(start, cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        route_loss = 0.0
        for micro in range(cfg.optim.grad_accum):
            a = router.assign(run_id, step, rank, micro)  # hard route, data seed
            route = a["route"]
            cond = suite.bucket(cfg.routes[route].capability).sample(cfg.optim.batch_size, a["data_seed"])
            roller = roll_field if cfg.method.states == "on_policy" else teachers[route]
            q = query_batch(cfg, suite, sigmas, roller, route, cond, step, rank, micro, device)
            with torch.no_grad():
                target = teachers[route].velocity(q.x, q.sigma, q.conditions)
            last = micro == cfg.optim.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                pred = train_field.velocity(q.x, q.sigma, q.conditions)
                loss = distillation_loss(cfg, pred, target, q, len(sigmas) - 1) / cfg.optim.grad_accum
                loss.backward()
            route_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(inner.parameters(), cfg.optim.grad_clip)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        optimizer.step()
        if ema is not None:
            ema.update(inner, step)
        router.report_loss(run_id, step, route, route_loss)
        losses.setdefault(route, []).append(route_loss)
        _maybe_crash(config.get("crash_once"), rank, step)
        if (step + 1) % report_every == 0 or step + 1 == cfg.steps:
            metrics = {"step": step + 1, "rank": rank, "resumed_from": start, "loss": {r: sum(v) / len(v) for r, v in losses.items()},
                       "step_losses": json.dumps(losses), "seconds": time.perf_counter() - t_start}
            losses = {}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save({"weights": inner.state_dict(), "optimizer": optimizer.state_dict(),
                                "ema": None if ema is None else ema.model.state_dict(), "step": step + 1}, Path(d) / "state.pt")
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


def _maybe_crash(spec: dict | None, rank: int, step: int) -> None:
    """Failure injection for tests: the worker process of `rank` dies at `step`, once (a marker file)."""
    if spec and rank == spec["rank"] and step == spec["step"] and not Path(spec["marker"]).exists():
        Path(spec["marker"]).write_text(str(step))
        os._exit(1)


def run_distributed(cfg: TrainConfig, run_id: str, num_workers: int, storage_path: str, teacher_apps: dict[str, str],
                    router_app: str = "router", report_every: int = 10, cpus_per_worker: float = 1.0, torch_threads: int = 1,
                    max_failures: int = 1, crash_once: dict | None = None):
    """Register the run with the router and train on Ray Train; returns the Ray Train Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from router.client import RouterClient

    RouterClient(router_app).register_run(run_id, routing_config(cfg, num_workers, teacher_apps))
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"train": json.loads(cfg.model_dump_json()), "run_id": run_id, "report_every": report_every,
                           "teacher_apps": teacher_apps, "router_app": router_app, "torch_threads": torch_threads,
                           "crash_once": crash_once},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=str(cfg.device).startswith("cuda"),
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=run_id, storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()
