"""Distributed DanceOPD training on Ray Train: the worker loop and its launcher.

Each worker holds a student replica (DDP: gloo on CPU, nccl on GPU). Per micro-batch it takes the router's
assignment (asked ahead, in blocks of steps), draws that route's conditions, rolls out its own student without grad (each
sample only as deep as its queried state), sends the routed teacher deployment the chosen state(s) in one call,
and goes on with the next micro-batch and the student's forward while the teacher works; it waits only when
the loss needs the target. Query states, loss and learning rate come from `trainer.steps`, the same code as
the reference trainer: with one worker and the same config it computes exactly what the reference trainer
computes. `method.staleness: 1` rolls out the next step before this step's update, so that the teacher's
work overlaps the whole update.
"""

from __future__ import annotations

import contextlib
import inspect
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
from danceopd.fields.base import Conditions
import danceopd.telemetry as T
from danceopd.remote import CircuitBreaker, Resolved, ServiceUnavailable
from danceopd.telemetry import make
from danceopd.models.base import text_encoder_parameters
from danceopd.student import build_student, load_student
from danceopd.suite import CapabilitySuite
from danceopd.evaluation import write_report
from danceopd.student import save_merged_transformer
from danceopd.tracking import log_evaluation
from trainer.checkpoint import export_student, restore_checkpoint, save_checkpoint
from trainer.evaluation import BEFORE, evaluate_on_workers, final_report, sample_during_training, write_before
from trainer.job import JobConfig
from trainer.metrics import TrainerMetrics
from trainer.steps import (MicroBatch, StepTimes, format_progress, query_batch, refills, route_step_losses, routing_config, run_sigmas,
                           student_guided, window_stats)
from trainer.update import Update


def worker_loop(config: dict) -> None:
    """One Ray Train worker of the run: set up and resume (Worker), then per step prepare -> update -> report ->
    checkpoint, then finish. The update itself is trainer.update.Update, the reference trainer's too."""
    w = Worker(config)
    job, update = w.job, w.update
    finished, last = True, w.start  # last: the step the weights are at
    for step in range(w.start, job.steps):
        times = StepTimes()
        batches = w.prepared.pop(step, None) or w.prepare(step, times)
        if job.method.staleness and not refills(job, step + 1):  # before this update: the teacher works while we train
            w.prepared[step + 1] = w.prepare(step + 1, times)
        record = update(step, batches, w.train_field.velocity, w.target, times, sync=w.sync)
        w.record(step, batches, record, times)
        inject_faults(config.get("faults") or [], w.rank, step)
        if update.nonfinite.exhausted:  # every rank stops here; no checkpoint: a restart must not begin from this state
            w.stop(step)
            finished = False
            break
        done = last = step + 1
        if job.eval.every and (done % job.eval.every == 0 or done == job.steps):  # a collective: every rank evaluates
            sample_during_training(job, w.student, w.teachers, w.suite, w.data, w.sigmas, done)
        stop = w.log(done)  # at a log window: a collective, every rank agrees whether max_minutes is spent
        if done % job.checkpoint_every == 0 or done == job.steps or stop:
            w.checkpoint(done)
        if stop:
            break
    w.close()
    if finished:  # the trained student, exported and evaluated where it lives (the driver holds no model)
        finish(job, w.student, update.ema, w.teachers, w.suite, w.data, w.sigmas, w.rank, w.evaluate, last)


class Worker:
    """What a Ray Train worker holds for the run and does around each update: its student (under DDP), its share of the
    data, the teacher clients (each behind a circuit breaker), the router's assignments and loss reports, the update
    (optimizer, EMA), the progress window, metrics and tracker. Set up in the order the run's draws depend on: the
    evaluation before training and the first samples run before DDP wraps the student, the resume after it."""

    def __init__(self, config: dict):
        import ray.train
        import ray.train.torch

        self.config, self.run_id = config, config["run_id"]
        self.job = job = JobConfig.model_validate(config["job"])
        PROGRESS["queue"] = config.get("console")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(job.torch_threads or 1)
        self.device = ray.train.torch.get_device()
        self.suite = CapabilitySuite(job.suite.tier, job.suite.tau, job.suite.seed)
        text = job.text_embeddings()  # precompute: no text encoder here, prompts read from the store
        buckets = job.bucket_sizes() or ()
        self.student = (load_student(job.init_from, self.device, job.dtype, text=text, buckets=buckets) if job.init_from
                        else build_student(job.student, self.device, job.dtype, text=text, buckets=buckets))
        self.skipped_rows, self.skipped = make(T.TRAINER_DATA_SKIPPED), {r: 0 for r in job.routes}
        for r in job.routes:  # 0 until a row is skipped: the dashboard shows 0, not "no data"
            self.skipped_rows.set(0, tags={"run": self.run_id, "route": r, "rank": str(self.rank)})
        self.data = build_route_data(job, self.suite, self.student, self.on_skip)
        self.sigmas = run_sigmas(job, self.student).to(self.device)
        ckpt = ray.train.get_checkpoint()
        self.teachers = self.teacher_clients()
        self.evaluate = config.get("evaluate", False)
        if ckpt is None:
            self.first_evaluations()
        self.model = self.ddp_model()
        self.inner = self.model.module if hasattr(self.model, "module") else self.model
        self.train_field = student_guided(job, self.student.field.with_transformer(self.model))  # gradients flow through DDP
        self.roll_field = student_guided(job, self.student.field)  # no-grad rollouts skip DDP's hooks
        # under DDP the ranks' losses differ: the all-reduced gradient alone decides whether an update is applied
        self.update = Update(job, self.student.trainable_parameters(), self.inner, len(self.sigmas) - 1, check_loss=False)
        self.assignments, self.reports = self.router_calls()
        self.start, history = self.resume(ckpt)
        self.metrics, self.tracker, self.window = self.reporting(history)
        self.prepared: dict[int, list[MicroBatch]] = {}  # method.staleness: the next step, rolled out before this update

    # ----------------------------------------------------------------------------------- set-up
    def on_skip(self, route: str, why: str) -> None:
        """A large source's unreadable image, found when drawn: never silent."""
        self.skipped[route] += 1
        self.skipped_rows.set(self.skipped[route], tags={"run": self.run_id, "route": route, "rank": str(self.rank)})
        say(f"rank {self.rank}: route {route}: {why}")

    def teacher_clients(self) -> dict:
        """Each route's teacher client, behind one circuit breaker per teacher application (its state a metric)."""
        job, run_id, rank = self.job, self.run_id, self.rank
        circuit = make(T.TRAINER_TEACHER_CIRCUIT)

        def changed(app: str, is_open: bool, message: str) -> None:
            say(f"[rank {rank}] {message}")
            circuit.set(float(is_open), tags={"run": run_id, "teacher": app, "rank": str(rank)})

        breakers = {app: CircuitBreaker(f"teacher {app!r}", job.cluster.teacher_failures_to_open, job.cluster.teacher_pause_s,
                                        lambda name, is_open, msg, app=app: changed(app, is_open, msg))
                    for app in {job.teacher_app(r) for r in job.routes}}
        for app in breakers:  # every teacher healthy to begin with: the dashboard shows 0, not "no data"
            circuit.set(0.0, tags={"run": run_id, "teacher": app, "rank": str(rank)})
        return {r: job.teacher_client(r, breakers[job.teacher_app(r)]) for r in job.routes}

    def first_evaluations(self) -> None:
        """A new run: the evaluation before training (--eval, once per run), and eval.every's samples at step 0."""
        job, args = self.job, (self.student, self.teachers, self.suite, self.data, self.sigmas)
        if self.evaluate and not (job.run_dir / BEFORE).exists():
            before = evaluate_on_workers(job, *args, 0, job.run_dir / "grid-before.png")
            if before is not None:
                write_before(job.run_dir, before)
                log_evaluation(job.tracking, job.run_dir, job.run_name, 0, before)
        if job.eval.every:  # samples and velocity errors at step 0, every N steps, and the last
            sample_during_training(job, *args, 0)

    def ddp_model(self) -> torch.nn.Module:
        """The student's transformer under DDP: the unused-parameter search only where some route leaves a trainable
        parameter without gradient, no broadcast of the frozen base."""
        import ray.train.torch

        find_unused = self.job.execution.find_unused_parameters
        if find_unused is None:
            find_unused = bool(unused_parameters(self.student, {r: d.sample(1, 0) for r, d in self.data.items()}))
        skip_frozen_broadcast(self.student.transformer)
        return ray.train.torch.prepare_model(self.student.transformer, parallel_strategy_kwargs=ddp_options(find_unused))

    def router_calls(self) -> tuple["Assignments", "LossReports"]:
        """The router's assignments (hard routes asked ahead, in blocks) and the loss reports (adaptive: each delivered
        before the next assignment). A restarted in-memory router forgets the run: the client registers it again (hard
        routes are a pure function of the seed and step). Six retries back off for 31.5 s in all: a router restart or a
        Redis outage of that length is ridden out without restarting the worker group."""
        from router.client import RouterClient

        job = self.job
        router = RouterClient(job.services.router_app, timeout_s=job.cluster.timeout_s, retries=6, run=(self.run_id, job_routing_config(job)))
        ahead = job.execution.prefetch_routing and job.method.routing != "adaptive"
        return Assignments(router, self.run_id, self.rank, job.steps, ahead), LossReports(router, self.run_id, wait=not ahead)

    def resume(self, ckpt) -> tuple[int, list]:
        """(the step to start at, the progress history): raw weights, optimizer, RNGs, EMA and routing cursor from the
        latest checkpoint, or a new run's (0, [])."""
        if ckpt is None:
            return 0, []
        with ckpt.as_directory() as d:
            state = restore_checkpoint(Path(d), self.inner, self.update.optimizer, self.update.ema)
        if self.rank == 0:
            say(f"[{self.run_id}] resumed from the checkpoint at step {state['routing_cursor']}")
        return state["routing_cursor"], state.get("history", [])

    def reporting(self, history: list) -> tuple:
        """(metrics, tracker, window): Prometheus metrics and TensorBoard (+ W&B / MLflow) on rank 0, one writer (a resume
        continues the curves); the progress window on every rank, with the text-encoder parameters any worker holds."""
        job, rank = self.job, self.rank
        metrics = TrainerMetrics(self.run_id, {r: c.capability for r, c in job.routes.items()}) if rank == 0 else None
        tracker = None
        if rank == 0:
            from danceopd.tracking import RunTracker

            tracker = RunTracker(job.tracking, job.run_dir, job.run_name, replace_from=self.start + 1, config=self.config["job"])
        window = Window(job, rank, self.world, self.start, self.device, metrics,
                        record_step_losses=self.config.get("record_step_losses", False), tracker=tracker)
        window.history = history
        held = torch.tensor([float(text_encoder_parameters(self.student.pipe))], device=self.device)  # 0 under precompute
        if self.world > 1:
            torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        window.text_encoder_parameters = int(held.item())
        return metrics, tracker, window

    # ----------------------------------------------------------------------------------- around each update
    def prepare(self, step: int, times: StepTimes) -> list[MicroBatch]:
        """Roll out this step's micro-batches with the current weights; each one's teacher query goes out as soon as
        its states exist (all before any is awaited)."""
        job, out = self.job, []
        for micro, a in enumerate(self.assignments.get(step, times)):
            route = a["route"]  # the hard route of this update, and the data seed
            cond = self.data[route].sample(job.worker_batch_size, a["data_seed"])
            with times.time("rollout"):
                roller = self.roll_field if job.method.states == "on_policy" else self.teachers[route]
                q = query_batch(job, self.suite, self.sigmas, roller, route, cond, step, self.rank, micro, self.device)
            if not torch.isfinite(q.x).all():  # diverged weights: the teacher refuses NaN states, and the NaN loss
                out.append(MicroBatch(route, q, Resolved(torch.full_like(q.x, float("nan")))))  # skips the update on every rank
                continue
            with times.time("teacher"), torch.no_grad():  # all K states of every sample: one call
                send = self.teachers[route].submit(q.x, q.sigma, q.conditions)
                out.append(MicroBatch(route, q, send if job.execution.overlap_teacher else Resolved(send.result())))
        return out

    def target(self, mb: MicroBatch) -> torch.Tensor:
        return teacher_target(mb, self.teachers[mb.route], self.job.cluster.step_retries, self.rank)

    def sync(self, last: bool):
        """DDP all-reduces the gradients on the update's last backward only."""
        return contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()

    def record(self, step: int, batches: list[MicroBatch], out, times: StepTimes) -> None:
        """The update in the progress window, its loss to the router, or the note of a skipped update."""
        route = batches[-1].route
        route_losses = route_step_losses(out.parts[0], list(self.job.routes), [mb.route for mb in batches])  # groups: each group's
        if not out.applied:
            self.window.skipped[route] += 1
            if self.rank == 0:
                say(self.update.nonfinite.skipped(step, route, out.loss, out.grad_norm))
        elif self.job.method.routing == "adaptive":  # every rank reports the update's loss, the same value (the first counts)
            with times.time("router"):
                self.reports.add(step, route, mean_over_ranks(out.loss, self.device))
        elif self.rank == 0:  # hard routing and groups: the statistics feed dashboards, rank 0's losses will do
            with times.time("router"):
                for r, v in route_losses.items():
                    self.reports.add(step, r, v)
        self.window.add(route_losses if out.applied else None, times, out.grad_norm)

    def stop(self, step: int) -> None:
        """Too many non-finite updates in a row. Ray Train keeps only checkpointed metrics: the driver reads the reason
        from the run's storage."""
        if self.rank == 0:
            marker = stop_marker(self.job, self.run_id)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(self.update.nonfinite.stop_message(step))

    def log(self, done: int) -> bool:
        """At a log window: the progress line (losses all-reduced), the loss reports sent; whether max_minutes is spent."""
        if not self.window.log_due(done):
            return False
        stop = self.window.summarize(done)  # collective: every rank agrees to stop
        self.reports.send()
        return stop

    def checkpoint(self, done: int) -> None:
        """Every rank reports (a collective); rank 0 attaches the checkpoint: student/, optimizer and state."""
        import ray.train

        self.reports.flush()
        report = self.window.report_metrics(done)
        if self.rank != 0:
            ray.train.report(report)
            return
        state = {"routing_cursor": done, "run": self.run_id, "history": self.window.history, "config": self.config["job"]}
        with tempfile.TemporaryDirectory() as d:
            path = save_checkpoint(Path(d), done, self.student, self.update.ema, self.update.optimizer, state, keep=1)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        self.metrics.checkpointed()
        say(f"checkpoint: step {done} ({self.job.storage_path / self.run_id})")

    def close(self) -> None:
        self.reports.flush()
        if self.tracker is not None:
            self.tracker.close()


def finish(job: JobConfig, student, ema, teachers: dict, suite, data: dict, sigmas: torch.Tensor, rank: int, evaluate: bool,
           step: int) -> None:
    """After the last update: rank 0 writes <run_dir>/student (the EMA weights when on); with --eval every rank
    evaluates its share of the routes and rank 0 writes report.json; last (minutes on the CPU at full size), rank 0
    makes the merged export if student.save_merged asks for it."""
    if rank == 0:
        export_student(student, ema, job.run_dir / "student")
    if evaluate:
        with ema.applied(student.transformer) if ema is not None else contextlib.nullcontext():
            report = evaluate_on_workers(job, student, teachers, suite, data, sigmas, step, job.run_dir / "grid.png")
        if report is not None:
            write_report(final_report(job.run_dir, report), job.run_dir / "report.json")
            log_evaluation(job.tracking, job.run_dir, job.run_name, step, report)
    if rank == 0 and student.config.save_merged and student.config.trains_lora:
        save_merged_transformer(job.run_dir / "student", student.field.dtype)


class Assignments:
    """This rank's router assignments, one per micro-batch. Ahead: hard routes are a pure function of the step, so
    they come in blocks of BLOCK steps per call, the next block asked while this one is half used. Otherwise (and
    for adaptive routing, whose weights follow the reported losses) each step is asked when it starts."""

    BLOCK = 16

    def __init__(self, router, run_id: str, rank: int, steps: int, ahead: bool):
        self.router, self.run_id, self.rank, self.steps = router, run_id, rank, steps
        self.block = self.BLOCK if ahead else 1
        self.calls: dict[int, object] = {}  # block index -> PendingCall of its steps' assignments

    def _ask(self, b: int) -> None:
        if b not in self.calls and b * self.block < self.steps:
            first = b * self.block
            self.calls[b] = self.router.send("assign_steps", self.run_id, first, min(self.block, self.steps - first), self.rank)

    def get(self, step: int, times: StepTimes) -> list[dict]:
        b, i = divmod(step, self.block)
        self._ask(b)
        if self.block > 1 and i >= self.block // 2:
            self._ask(b + 1)
        for old in [k for k in self.calls if k < b]:
            del self.calls[old]
        with times.time("router"):
            return self.calls[b].result()[i]


class LossReports:
    """Each step's loss for the router. Batched (`wait` false, hard routing: the statistics feed dashboards), they go
    out in one call at every log window and checkpoint; otherwise (adaptive: the next assignment depends on them)
    each is delivered before the step ends."""

    def __init__(self, router, run_id: str, wait: bool):
        self.router, self.run_id, self.wait = router, run_id, wait
        self.buffered: list[tuple[int, str, float]] = []
        self.inflight = None

    def add(self, step: int, route: str, loss: float) -> None:
        self.buffered.append((step, route, loss))
        if self.wait:
            self.flush()

    def _wait(self) -> None:
        if self.inflight is not None:
            self.inflight.result()
            self.inflight = None

    def send(self) -> None:
        """Send what is buffered, without waiting (the previous batch is waited for first: reports stay in order)."""
        self._wait()
        if self.buffered:
            self.inflight = self.router.send("report_losses", self.run_id, self.buffered)
            self.buffered = []

    def flush(self) -> None:
        self.send()
        self._wait()


def teacher_target(mb: MicroBatch, teacher, retries: int, rank: int) -> torch.Tensor:
    """The teacher's velocity for a micro-batch. A query that failed after its own retries is sent again, once the
    teacher's circuit lets calls through, up to `retries` times; then the worker gives up (Ray Train restarts the
    group from the latest checkpoint)."""
    for attempt in range(retries + 1):
        try:
            return mb.target.result()
        except ServiceUnavailable as e:
            if attempt == retries:
                raise
            wait = teacher.breaker.wait_s() if teacher.breaker is not None else 0.0
            say(f"[rank {rank}] teacher query failed ({str(e).splitlines()[0][:200]}); sending it again"
                f"{f' in {wait:.0f} s' if wait else ''} ({attempt + 1}/{retries})")
            time.sleep(wait)
            mb.target = teacher.submit(mb.q.x, mb.q.sigma, mb.q.conditions)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (one all-reduce; every rank gets the same float). On `device`:
    nccl reduces CUDA tensors only."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / dist.get_world_size())


def ddp_options(find_unused_parameters: bool) -> dict:
    """DDP without the buffer broadcast before every forward: an extra collective (a sync point) per step, and the
    students' only buffers (positional embeddings) never change in training. The gradients are views into DDP's
    all-reduce buckets (gradient_as_bucket_view): no second copy of them (FLUX LoRA r128: ~2 GB per rank)."""
    from torch.nn.parallel import DistributedDataParallel

    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return {"find_unused_parameters": find_unused_parameters, no_sync: False, "gradient_as_bucket_view": True}


def skip_frozen_broadcast(model: torch.nn.Module) -> list[str]:
    """Tell DDP not to broadcast the frozen parameters and the buffers from rank 0 when it wraps the model (at start
    and at every restart): every rank loaded the same frozen base from the same files, and only the trainable
    parameters (LoRA A matrices are random per process) need rank 0's values. FLUX.1-dev: 24 GB less to send per rank
    at start-up. Returns the names skipped."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def unused_parameters(student, probes: dict[str, Conditions]) -> list[str]:
    """Trainable parameters that get no gradient on some route's forward (one sample per route). DDP needs
    find_unused_parameters (an extra graph walk every step) only if there are any. The global RNG and the prompt
    cache are left as they were, so that the run draws exactly what it would draw without the probe."""
    unused: set[str] = set()
    named = [(n, p) for n, p in student.transformer.named_parameters() if p.requires_grad]
    shape = student.field.info.sample_shape
    device = student.field.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for route, cond in probes.items():
            x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
            student.field.velocity(x, torch.full((1,), 0.5, device=device), cond.to(device)).float().square().mean().backward()
            unused |= {n for n, p in named if p.grad is None}
            for _, p in named:
                p.grad = None
    student.field.prompts.clear()
    return sorted(unused)


class Window:
    """Per-route losses and step times since the last log line, reduced over all workers."""

    def __init__(self, job: JobConfig, rank: int, world: int, start: int, device: torch.device, metrics=None,
                 record_step_losses: bool = False, tracker=None):
        self.job, self.rank, self.world, self.start, self.device = job, rank, world, start, device
        self.metrics = metrics  # TrainerMetrics on rank 0 (Prometheus), else None
        self.tracker = tracker  # RunTracker on rank 0 (TensorBoard, ...), else None
        self.grad_norms: list[float] = []  # of the window's applied updates (all-reduced gradients: alike on every rank)
        self.record_step_losses = record_step_losses
        self.routes = list(job.routes)
        self.t0 = time.perf_counter()
        self.sums: dict[str, list[float]] = defaultdict(list)
        self.since_report: dict[str, list[float]] = defaultdict(list)  # this rank's per-step losses
        self.times = StepTimes()
        self.total_times = StepTimes()
        self.history: list[dict] = []
        self.last: dict = {}
        self.skipped: dict[str, int] = defaultdict(int)  # updates skipped (non-finite) since this start
        self.text_encoder_parameters = 0  # the most any worker holds

    def add(self, losses: dict[str, float] | None, times: StepTimes, grad_norm: float) -> None:
        """A step's loss per route (one route; several under routing groups; None: the update was skipped), times and
        gradient norm."""
        if losses is not None:
            for route, loss in losses.items():
                self.sums[route].append(loss)
                self.since_report[route].append(loss)
            self.grad_norms.append(grad_norm)
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
                           + [float(over)], dtype=torch.float64, device=self.device)  # nccl: CUDA tensors only
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf)
        buf = buf.cpu()
        n = len(self.routes)
        losses = {r: float(buf[i] / buf[n + i]) for i, r in enumerate(self.routes) if buf[n + i] > 0}
        counts = {r: float(buf[n + i]) for i, r in enumerate(self.routes)}  # over all ranks: the mix is the same
        self.last = {"step": done, "loss": losses, "elapsed_s": elapsed, "time_share": self.times.shares(),
                     **window_stats(self.job, done, done - self.start, elapsed, self.job.steps, counts, self.grad_norms)}
        rate, eta = self.last["samples_per_s"], self.last["eta_s"]
        if self.metrics is not None:
            window_steps = max(1, sum(len(v) for v in self.sums.values()))
            self.metrics.window(done, losses, {r: int(buf[n + i]) // self.world for i, r in enumerate(self.routes)}, rate,
                                {k: v / window_steps for k, v in asdict(self.times).items()}, self.skipped)
        self.history.append(self.last)
        if self.tracker is not None:
            self.tracker.window(self.last)
        if self.rank == 0:
            say(format_progress(done, self.job.steps, losses, rate, self.last["time_share"], eta))
            if buf[-1] > 0:
                say(f"stopping at step {done}: max_minutes={self.job.max_minutes} reached (a checkpoint follows)")
        self.sums.clear()
        self.grad_norms.clear()
        self.times = StepTimes()
        return bool(buf[-1] > 0)

    def report_metrics(self, done: int) -> dict:
        metrics = {**self.last, "step": done, "rank": self.rank, "resumed_from": self.start, "time_share_total": self.total_times.shares(),
                   "text_encoder_parameters": self.text_encoder_parameters}
        if self.record_step_losses:  # this rank's per-step losses since the last report (tests compare them)
            metrics["step_losses"] = json.dumps(self.since_report)
        self.since_report = defaultdict(list)
        return metrics


PROGRESS = {"queue": None}  # the driver's console, when it does not take the workers' output (see trainer.main)


def say(line: str) -> None:
    """A console line from a worker (progress, skips, a failing teacher), once. Without the workers' output on the
    driver's console (the quiet default), it goes through the driver's queue; otherwise to the process's own stdout,
    which Ray forwards to the driver and the job log (Ray Train routes print() through its logger, which echoes it
    twice)."""
    if PROGRESS["queue"] is not None:
        try:
            PROGRESS["queue"].put(line, timeout=10)
            return
        except Exception:  # the driver is gone or slow: the worker log still has it
            pass
    print(line, file=sys.__stdout__, flush=True)


def inject_faults(faults: list[dict], rank: int, step: int) -> None:
    """Failure injection for tests and `make chaos`. Each fault happens once (its marker file records the step), on
    `rank`, after the update of `step`:
      exit         the worker process dies (Ray Train restarts the group from the latest checkpoint);
      kill_actor   the named actor `actor` (a Serve replica: a teacher or the router) is killed, not restarted;
      marker       only the marker is written: the test acts on it (e.g. restarts Redis);
      trace        every step, not once: `step` is appended to the file `path` (counts the steps redone)."""
    for f in faults:
        if f["action"] == "trace":
            if rank == f.get("rank", 0):
                with open(f["path"], "a") as trace:
                    trace.write(f"{step}\n")
            continue
        if rank != f.get("rank", 0) or step != f["step"] or Path(f["marker"]).exists():
            continue
        Path(f["marker"]).write_text(str(step))
        if f["action"] == "exit":
            os._exit(1)
        if f["action"] == "kill_actor":
            import ray

            ray.kill(ray.get_actor(f["actor"], namespace=f.get("namespace", "serve")), no_restart=True)


def use_gpu(job: JobConfig) -> bool:
    """device cuda: yes; auto: when the cluster has GPUs; cpu: no."""
    import ray

    if job.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return str(job.device).startswith("cuda")


def stop_marker(job: JobConfig, run_id: str) -> Path:
    """Where rank 0 says why it stopped the run early (beside the run's checkpoints)."""
    return Path(job.storage_path) / run_id / "stopped.txt"


def job_routing_config(job: JobConfig) -> dict:
    """The run's routing config as the router holds it: the driver registers it, the workers re-register it."""
    return routing_config(job, job.cluster.num_workers, job.worker_batch_size, job.teacher_app)


def run_distributed(job: JobConfig, run_id: str, crash_once: dict | None = None, record_step_losses: bool = False,
                    faults: list[dict] | None = None, console=None, evaluate: bool = False):
    """Register the run with the router and train on Ray Train; returns the Ray Train Result.

    Re-running with the same run id and storage path resumes from the run's latest checkpoint. `crash_once`
    ({rank, step, marker}: that worker dies after that step) and `faults` inject failures (see inject_faults).
    `console`: a ray.util.queue.Queue the workers' console lines go to (the driver prints them). `evaluate`: the
    workers evaluate the student before training (a new run) and after it (see trainer.evaluation)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from router.client import RouterClient

    faults = [*(faults or []), *([{**crash_once, "action": "exit"}] if crash_once else [])]
    # The workers run in Ray Train's own working directory: relative paths would name other folders there (the
    # checkpoint notices, the early-stop marker the driver reads).
    job = job.model_copy(update={"output_dir": Path(job.output_dir).expanduser().resolve(),
                                 "cluster": job.cluster.model_copy(update={"storage_path": job.storage_path})})
    job = job.with_rows_written(job.run_dir / "data")  # workers read the validated rows, not the sources again
    c = job.cluster
    RouterClient(job.services.router_app, timeout_s=job.cluster.timeout_s).register_run(run_id, job_routing_config(job))
    stop_marker(job, run_id).unlink(missing_ok=True)  # a resumed run's earlier stop
    gpu = use_gpu(job)
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"job": json.loads(job.model_dump_json()), "run_id": run_id, "faults": faults, "console": console,
                           "record_step_losses": record_step_losses, "evaluate": evaluate},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=run_id, storage_path=str(job.storage_path), failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints)),
    )
    return trainer.fit()
