"""Distributed DanceOPD training on Ray Train: the worker loop and its launcher.

Each worker holds a student replica (DDP: gloo on CPU, nccl on GPU). Per micro-batch it asks the router
service for its assignment, draws that route's conditions, rolls out its own student without grad, queries
the routed teacher deployment at the chosen state(s) in one call, and takes the velocity MSE. Query states,
loss and learning rate come from `trainer.steps`, the same code as the reference trainer: with one worker and
the same config it draws exactly what the reference trainer draws.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from danceopd.data.routes import build_route_data
from danceopd.student import build_student, load_student
from danceopd.suite import CapabilitySuite
from trainer.checkpoint import restore_checkpoint, save_checkpoint
from trainer.ema import EMA
from trainer.job import JobConfig
from trainer.metrics import TrainerMetrics
from trainer.steps import StepTimes, distillation_loss, format_progress, lr_at, query_batch, routing_config, run_sigmas


def worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from router.client import RouterClient

    job = JobConfig.model_validate(config["job"])
    run_id = config["run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(job.torch_threads or 1)
    device = ray.train.torch.get_device()
    suite = CapabilitySuite(job.suite.tier, job.suite.tau, job.suite.seed)
    student = load_student(job.init_from, device, job.dtype) if job.init_from else build_student(job.student, device, job.dtype)
    data = build_route_data(job, suite, student)
    model = ray.train.torch.prepare_model(student.transformer, parallel_strategy_kwargs={"find_unused_parameters": True})
    inner = model.module if hasattr(model, "module") else model
    train_field = student.field.with_transformer(model)  # gradients flow through DDP
    roll_field = student.field  # no-grad rollouts skip DDP's hooks
    params = student.trainable_parameters()  # fp32 master weights (LoRA adapters, or all)
    optimizer = torch.optim.AdamW(params, lr=job.optim.lr, betas=job.optim.betas, weight_decay=job.optim.weight_decay)
    ema = EMA(inner, job.optim.ema_decay) if job.optim.ema_decay > 0 else None
    teachers = {r: job.teacher_client(r) for r in job.routes}
    router = RouterClient(job.services.router_app, timeout_s=job.cluster.timeout_s)
    sigmas = run_sigmas(job, student).to(device)
    accum = job.optim.grad_accum

    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # resume: raw weights, optimizer, RNGs, EMA, routing cursor, progress history
        with ckpt.as_directory() as d:
            state = restore_checkpoint(Path(d), inner, optimizer, ema)
        start, history = state["routing_cursor"], state.get("history", [])
        if rank == 0:
            say(f"[{run_id}] resumed from the checkpoint at step {start}")

    metrics = TrainerMetrics(run_id, {r: c.capability for r, c in job.routes.items()}) if rank == 0 else None
    window = Window(job, rank, world, start, metrics, record_step_losses=config.get("record_step_losses", False))
    window.history = history
    for step in range(start, job.steps):
        times = StepTimes()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(accum):
            with times.time("router"):
                a = router.assign(run_id, step, rank, micro)  # the hard route of this update, and the data seed
            route = a["route"]
            cond = data[route].sample(job.worker_batch_size, a["data_seed"])
            with times.time("rollout"):
                roller = roll_field if job.method.states == "on_policy" else teachers[route]
                q = query_batch(job, suite, sigmas, roller, route, cond, step, rank, micro, device)
            with times.time("teacher"), torch.no_grad():
                target = teachers[route].velocity(q.x, q.sigma, q.conditions)  # all K states of every sample: one call
            sync = contextlib.nullcontext() if micro == accum - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with times.time("forward_backward"), sync:
                pred = train_field.velocity(q.x, q.sigma, q.conditions)
                loss = distillation_loss(job, pred, target, q, len(sigmas) - 1) / accum
                loss.backward()  # the last micro-batch all-reduces the gradients across workers
            step_loss += loss.item()
        with times.time("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, job.optim.grad_clip)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(job, step)
            optimizer.step()
            if ema is not None:
                ema.update(inner, step)
        with times.time("router"):
            router.report_loss(run_id, step, route, step_loss)
        window.add(route, step_loss, times)
        _maybe_crash(config.get("crash_once"), rank, step)

        done = step + 1
        stop = window.log_due(done) and window.summarize(done)  # collective: every rank agrees to stop
        if done % job.checkpoint_every == 0 or done == job.steps or stop:
            report = window.report_metrics(done)
            if rank == 0:  # one writer; every rank calls report (a collective)
                state = {"routing_cursor": done, "run": run_id, "history": window.history, "config": config["job"]}
                with tempfile.TemporaryDirectory() as d:
                    path = save_checkpoint(Path(d), done, student, ema, optimizer, state, keep=1)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
                metrics.checkpointed()
            else:
                ray.train.report(report)
        if stop:
            break


class Window:
    """Per-route losses and step times since the last log line, reduced over all workers."""

    def __init__(self, job: JobConfig, rank: int, world: int, start: int, metrics=None, record_step_losses: bool = False):
        self.job, self.rank, self.world, self.start = job, rank, world, start
        self.metrics = metrics  # TrainerMetrics on rank 0 (Prometheus), else None
        self.record_step_losses = record_step_losses
        self.routes = list(job.routes)
        self.t0 = time.perf_counter()
        self.sums: dict[str, list[float]] = defaultdict(list)
        self.since_report: dict[str, list[float]] = defaultdict(list)  # this rank's per-step losses
        self.times = StepTimes()
        self.total_times = StepTimes()
        self.history: list[dict] = []
        self.last: dict = {}

    def add(self, route: str, loss: float, times: StepTimes) -> None:
        self.sums[route].append(loss)
        self.since_report[route].append(loss)
        self.times.add(times)
        self.total_times.add(times)

    def log_due(self, done: int) -> bool:
        return done % self.job.log_every == 0 or done == self.job.steps or done % self.job.checkpoint_every == 0

    def summarize(self, done: int) -> bool:
        """All-reduce the window's losses (mean over workers and steps), print progress on rank 0, and decide
        together whether max_minutes is spent. Returns the stop decision."""
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.t0
        over = self.job.max_minutes is not None and elapsed > self.job.max_minutes * 60 and done < self.job.steps
        buf = torch.tensor([sum(self.sums.get(r, [])) for r in self.routes] + [len(self.sums.get(r, [])) for r in self.routes]
                           + [float(over)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf)
        n = len(self.routes)
        losses = {r: float(buf[i] / buf[n + i]) for i, r in enumerate(self.routes) if buf[n + i] > 0}
        steps_done = done - self.start
        rate = steps_done * self.job.optim.batch_size * self.job.optim.grad_accum / max(elapsed, 1e-9)
        eta = elapsed / max(steps_done, 1) * (self.job.steps - done)
        if self.job.max_minutes is not None:
            eta = min(eta, max(0.0, self.job.max_minutes * 60 - elapsed))
        self.last = {"step": done, "loss": losses, "samples_per_s": rate, "elapsed_s": elapsed,
                     "time_share": self.times.shares(), "eta_s": eta}
        if self.metrics is not None:
            window_steps = max(1, sum(len(v) for v in self.sums.values()))
            self.metrics.window(done, losses, {r: int(buf[n + i]) // self.world for i, r in enumerate(self.routes)}, rate,
                                {k: v / window_steps for k, v in asdict(self.times).items()})
        self.history.append(self.last)
        if self.rank == 0:
            say(format_progress(done, self.job.steps, losses, rate, self.last["time_share"], eta))
            if buf[-1] > 0:
                say(f"stopping at step {done}: max_minutes={self.job.max_minutes} reached (a checkpoint follows)")
        self.sums.clear()
        self.times = StepTimes()
        return bool(buf[-1] > 0)

    def report_metrics(self, done: int) -> dict:
        metrics = {**self.last, "step": done, "rank": self.rank, "resumed_from": self.start, "time_share_total": self.total_times.shares()}
        if self.record_step_losses:  # this rank's per-step losses since the last report (tests compare them)
            metrics["step_losses"] = json.dumps(self.since_report)
        self.since_report = defaultdict(list)
        return metrics


def say(line: str) -> None:
    """A progress line, once: Ray Train routes print() through its logger (which echoes it twice); the process's
    own stdout is what Ray forwards to the driver and the job log."""
    print(line, file=sys.__stdout__, flush=True)


def _maybe_crash(spec: dict | None, rank: int, step: int) -> None:
    """Failure injection for tests: the worker process of `rank` dies at `step`, once (a marker file)."""
    if spec and rank == spec["rank"] and step == spec["step"] and not Path(spec["marker"]).exists():
        Path(spec["marker"]).write_text(str(step))
        os._exit(1)


def use_gpu(job: JobConfig) -> bool:
    """device cuda: yes; auto: when the cluster has GPUs; cpu: no."""
    import ray

    if job.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return str(job.device).startswith("cuda")


def run_distributed(job: JobConfig, run_id: str, crash_once: dict | None = None, record_step_losses: bool = False):
    """Register the run with the router and train on Ray Train; returns the Ray Train Result.

    Re-running with the same run id and storage path resumes from the run's latest checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from router.client import RouterClient

    c = job.cluster
    RouterClient(job.services.router_app, timeout_s=job.cluster.timeout_s).register_run(run_id, routing_config(job, c.num_workers, job.worker_batch_size, job.teacher_app))
    gpu = use_gpu(job)
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"job": json.loads(job.model_dump_json()), "run_id": run_id, "crash_once": crash_once,
                           "record_step_losses": record_step_losses},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_id, storage_path=str(job.storage_path), failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    return trainer.fit()
