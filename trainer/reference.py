"""The reference DanceOPD trainer: one process, no Ray. The distributed trainer must reproduce this loop.

    python -m trainer.reference --config configs/demo.yaml [key.path=value ...]
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from danceopd.config import TrainConfig, load_config
from danceopd.data.routes import build_route_data
from danceopd.fields.base import Conditions
from danceopd.fields.operators import SoftMixField
from danceopd.flow import velocity_target
from danceopd.routes import build_route_fields
from danceopd.routing import HardRouter
from danceopd.seeding import derive_seed
from danceopd.models.base import dtype_name, resolve_device, resolve_dtype
from danceopd.student import build_student, load_student, save_merged_transformer
from danceopd.text_embeddings import precompute
from danceopd.suite import CapabilitySuite
from danceopd.tracking import RunTracker, log_evaluation, start_new_run, tensorboard_dir
from trainer.checkpoint import export_student, latest_checkpoint, restore_checkpoint, save_checkpoint
from danceopd.remote import Resolved
from trainer.steps import (MicroBatch, QueryBatch, StepTimes, format_progress, lr_at, query_batch, cut_note, refills,
                           route_step_losses, routing_config, run_sigmas, step_routes, student_guided, training_extent, window_stats)
from trainer.update import Update
from trainer.cli import load_or_report, parse_args, resume_config_or_report
from trainer.console import ConsolePrinter
from trainer.job import JobConfig


RUN = "reference"  # the run id of the in-process adaptive router


class ReferenceTrainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, log=print, world_size: int = 1):
        """world_size > 1: one process computes what `world_size` Ray Train workers do (ranks 0..W-1 each draw their
        share of optim.batch_size per micro-batch; the gradient is their mean, as DDP's all-reduce makes it): the
        distributed job's reference."""
        self.cfg, self.rank, self.log, self.world_size = cfg, rank, log, world_size
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.suite = CapabilitySuite(cfg.suite.tier, cfg.suite.tau, cfg.suite.seed)
        text = cfg.text_embeddings()
        if text.mode == "precompute":  # encoded here, once; then neither the student nor the teachers load text encoders
            dev = resolve_device(cfg.device)
            dt = dtype_name(resolve_dtype(cfg.dtype, dev))
            precompute(text.store, cfg.text_encoder_keys(dt, dict.fromkeys(cfg.routes, dt)), cfg.run_prompts(), device=dev)
        if cfg.init_from is not None:
            self.student = load_student(cfg.init_from, device=cfg.device, dtype=cfg.dtype, text=text, buckets=cfg.bucket_sizes() or ())
        else:
            self.student = build_student(cfg.student, device=cfg.device, dtype=cfg.dtype, text=text, buckets=cfg.bucket_sizes() or ())
        self.device = self.student.field.device
        self.teachers = build_route_fields(cfg, self.suite, device=self.device, dtype=cfg.dtype, text=text)
        self.data = build_route_data(cfg, self.suite, self.student, lambda route, why: self.log(f"route {route}: {why}"))
        self.router = HardRouter({n: r.weight for n, r in cfg.routes.items()}, cfg.seed)
        self.adaptive = None
        if cfg.method.routing == "adaptive":  # the router service's policy, in process (its state is checkpointed)
            from router.core import Router

            self.adaptive = Router()
            self.adaptive.register_run(RUN, routing_config(cfg, world_size=1, batch_size=cfg.optim.batch_size))
        if cfg.method.routing == "soft":
            self.soft_target = SoftMixField(list(self.teachers.values()), [r.weight for r in cfg.routes.values()])
        self.sigmas = run_sigmas(cfg, self.student).to(self.device)
        self.params = self.student.trainable_parameters()  # fp32 master weights (LoRA adapters, or all)
        # the update (AdamW, clipping, the non-finite check, EMA): the distributed workers' own; this process stands for
        # world_size ranks, each a slot of the loss's shares
        self.update = Update(cfg, self.params, self.student.transformer, len(self.sigmas) - 1, slots=world_size)
        self.optimizer, self.ema, self.nonfinite = self.update.optimizer, self.update.ema, self.update.nonfinite
        self.step = 0
        self.prepared: dict[int, list[MicroBatch]] = {}  # method.staleness: the next step, rolled out before this update
        self.route_log: list[str] = []
        self.history: list[dict] = []

    # ----------------------------------------------------------------------------------- one update
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        times = StepTimes()
        batches = self.prepared.pop(step, None) or self.prepare(step, times)
        if cfg.method.staleness and not refills(cfg, step + 1):  # the next step's states, before this update
            self.prepared[step + 1] = self.prepare(step + 1, times)
        out = self.update(step, batches, student_guided(cfg, self.student.field).velocity, lambda mb: mb.target.result(), times,
                          slot=lambda mb: mb.rank - self.rank)
        route = batches[-1].route
        if not out.applied:
            self.log(self.nonfinite.skipped(step, route, out.loss, out.grad_norm))
        elif self.adaptive:
            self.adaptive.report_loss(RUN, step, route, out.loss)
        self.route_log.append(route)
        self.step += 1
        names, routes = list(cfg.routes), [mb.route for mb in batches]  # each route's mean loss (groups: each group's)
        mean_parts = [sum(p[i] for p in out.parts) / self.world_size for i in range(len(names))]  # of all ranks, and of each
        return {"step": step, "route": route, "loss": out.loss, "grad_norm": out.grad_norm, "times": times, "applied": out.applied,
                "route_losses": route_step_losses(mean_parts, names, routes),
                "rank_losses": [sum(p) for p in out.parts],  # per rank: what each worker logs
                "rank_route_losses": [route_step_losses(p, names, routes) for p in out.parts]}

    def prepare(self, step: int, times: StepTimes) -> list[MicroBatch]:
        """The micro-batches of `step`: hard route (one field for every micro-batch of the update), conditions,
        query states from a no-grad rollout of the current student, and the frozen field's velocity there."""
        groups = self.cfg.group_routes()
        route = None if groups else self.adaptive.assign(RUN, step)["route"] if self.adaptive else self.router.route(step)
        out = []
        batch = self.cfg.optim.batch_size // self.world_size  # optim.batch_size is global: each worker draws its share
        for rank in range(self.rank, self.rank + self.world_size):
            for micro, r in enumerate(step_routes(self.cfg, route)):
                cond = self.data[r].sample(batch, derive_seed(self.cfg.seed, "batch", step, rank, micro))
                with times.time("rollout"):
                    q = self.query_batch(r, cond, step, micro, rank)
                with times.time("teacher"), torch.no_grad():
                    out.append(MicroBatch(r, q, Resolved(self.target_velocity(r, q)), rank))
        return out

    def query_batch(self, route: str, cond: Conditions, step: int, micro: int, rank: int | None = None) -> QueryBatch:
        roller = student_guided(self.cfg, self.student.field) if self.cfg.method.states == "on_policy" else self.teachers[route]
        return query_batch(self.cfg, self.suite, self.sigmas, roller, route, cond, step, self.rank if rank is None else rank, micro,
                           self.device)

    def target_velocity(self, route: str, q: QueryBatch) -> torch.Tensor:
        if self.cfg.method.target == "data":
            return velocity_target(q.x0, q.eps)
        field = self.soft_target if self.cfg.method.routing == "soft" else self.teachers[route]
        return field.velocity(q.x, q.sigma, q.conditions)

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg, step)

    # ----------------------------------------------------------------------------------- the run
    def state(self) -> dict:
        return {"routing_cursor": self.step, "route_log": self.route_log, "history": self.history,
                "adaptive_loss_stats": self.adaptive.store.get_loss_stats(RUN) if self.adaptive else None,
                "config": json.loads(self.cfg.model_dump_json())}

    def final_weights(self):
        """Inside the block the student holds what is evaluated, saved as the checkpoint's student/ and served:
        the EMA weights (if on); the training weights again after it."""
        return self.ema.applied(self.student.transformer) if self.ema is not None else contextlib.nullcontext()

    def save(self) -> Path:
        return save_checkpoint(self.cfg.run_dir, self.step, self.student, self.ema, self.optimizer, self.state(),
                               self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint if there is one (weights, optimizer, step, RNG, routing)."""
        ckpt = latest_checkpoint(self.cfg.run_dir)
        if ckpt is None:
            return False
        state = restore_checkpoint(ckpt, self.student.transformer, self.optimizer, self.ema)
        self.step = state["routing_cursor"]
        self.route_log, self.history = state["route_log"], state["history"]
        for route, stats in (state.get("adaptive_loss_stats") or {}).items():  # the adaptive weights continue exactly
            self.adaptive.store.update_loss_stats(RUN, route, lambda _, s=stats: s)
        self.log(f"resumed from {ckpt} at step {self.step}")
        return True

    def evaluate(self, grid_path: Path | None = None, cell: int | None = None) -> dict:
        """Score the student as it is now (inside final_weights() for the EMA) against the in-process teachers."""
        from danceopd.evaluation import GRID_CELL, evaluate_run

        return evaluate_run(self.student, self.teachers, self.cfg, self.suite, self.data, self.sigmas, self.device, grid_path,
                            cell or GRID_CELL)

    def sample(self) -> dict:
        """eval.every: held-out samples (teacher | student tiles at the training resolution) and velocity errors at this
        step, into samples/step-XXXXXX.png and the tracker's `samples` part."""
        from danceopd.evaluation import sample_cell, samples_path
        from trainer.evaluation import log_samples, release_memory

        path = samples_path(self.cfg.run_dir, self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        was_training = self.student.transformer.training
        self.student.transformer.eval()
        try:
            report = self.evaluate(path, sample_cell(self.cfg))
        finally:
            self.student.transformer.train(was_training)
            release_memory(self.student)
        log_samples(self.cfg, self.step, report)
        return report

    def fit(self, steps: int | None = None) -> dict:
        cfg = self.cfg
        end = steps if steps is not None else cfg.steps
        start_step, start = self.step, time.perf_counter()
        window: dict[str, list[float]] = defaultdict(list)  # this log window's losses per route
        grad_norms: list[float] = []
        acc = StepTimes()
        tracker = self.tracker()
        try:
            if cfg.eval.every and self.step == 0:
                self.sample()
            while self.step < end:
                out = self.train_step()
                if out["applied"]:
                    for r, v in out["route_losses"].items():  # one route per update; under groups, each group's part
                        window[r].append(v)
                    grad_norms.append(out["grad_norm"])
                elif self.nonfinite.exhausted:  # no checkpoint: a resume must not start from this state
                    return {"steps": self.step - start_step, "seconds": time.perf_counter() - start,
                            "stopped": self.nonfinite.stop_message(out["step"])}
                acc.add(out["times"])
                if cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.steps):
                    self.sample()
                elapsed = time.perf_counter() - start
                if self.step % cfg.log_every == 0 or self.step == end:
                    rec = {"step": self.step, "loss": {r: sum(v) / len(v) for r, v in window.items()}, "elapsed_s": elapsed,
                           "time_share": acc.shares(), **window_stats(cfg, self.step, self.step - start_step, elapsed, end,
                                                                       {r: len(v) for r, v in window.items()}, grad_norms)}
                    self.history.append(rec)
                    tracker.window(rec)
                    self.log(format_progress(self.step, end, rec["loss"], rec["samples_per_s"], rec["time_share"], rec["eta_s"]))
                    window.clear()
                    grad_norms.clear()
                if self.step % cfg.checkpoint_every == 0:
                    self.log(f"checkpoint: {self.save()}")
                if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
                    self.log(f"stopping at step {self.step}: max_minutes={cfg.max_minutes} reached")
                    break
        finally:
            tracker.close()
        if self.step % cfg.checkpoint_every != 0:
            self.log(f"checkpoint: {self.save()}")
        return {"steps": self.step - start_step, "seconds": time.perf_counter() - start}

    def tracker(self) -> RunTracker:
        """The run's TensorBoard (+ W&B / MLflow) writer; a resumed run continues its curves from this step."""
        cfg = self.cfg
        return RunTracker(cfg.tracking, cfg.run_dir, cfg.run_name, replace_from=self.step + 1, config=json.loads(cfg.model_dump_json()))


DESCRIPTION = "Reference (single-process) DanceOPD training."


def main(argv: list[str] | None = None) -> int:
    return run(parse_args("python -m trainer.reference", DESCRIPTION, argv))


def run(args) -> int:
    """The command, from parsed arguments (trainer.cli.add_train_arguments; also `danceopd train`)."""
    cfg = load_or_report(lambda path, over: load_config(path, over, model=JobConfig), args)  # a job file works too
    if cfg is None:
        return 2
    if not resume_config_or_report(cfg, args):  # before the model loads: a resumed run must train what it trained
        return 2
    console = ConsolePrinter()
    trainer = ReferenceTrainer(cfg, log=console)
    if args.no_resume or not trainer.resume():
        start_new_run(cfg.run_dir)  # W&B / MLflow: a new tracked run (TensorBoard: the curves start over at step 1)
    before = trainer.evaluate(grid_path=cfg.run_dir / "grid-before.png") if args.eval and trainer.step == 0 else None
    if before is not None:
        log_evaluation(cfg.tracking, cfg.run_dir, cfg.run_name, 0, before)
    stopped = trainer.fit().get("stopped")
    console.end()
    if stopped:
        print(f"error: training failed: {stopped}", file=sys.stderr)
        return 1
    final = export_student(trainer.student, trainer.ema, cfg.run_dir / "student")  # EMA weights: for init_from, eval, serving
    if cfg.student.save_merged and cfg.student.trains_lora:  # once, at the end, on the CPU
        save_merged_transformer(final, trainer.student.field.dtype)
    print(f"student: {final}")
    cut = cut_note(cfg, trainer.step)
    if cut is not None and not args.eval:
        print(cut)
    if cfg.tracking.tensorboard:
        print(f"tensorboard: {tensorboard_dir(cfg.run_dir)} (tensorboard --logdir {cfg.run_dir})")
    if args.eval:
        from danceopd.evaluation import summary_table, write_report

        with trainer.final_weights():
            report = trainer.evaluate(grid_path=cfg.run_dir / "grid.png")
        report["before"] = before
        report["training"] = {**training_extent(cfg, trainer.step), "history": trainer.history[-1:] if trainer.history else []}
        path = write_report(report, cfg.run_dir / "report.json")
        log_evaluation(cfg.tracking, cfg.run_dir, cfg.run_name, trainer.step, report)
        print(summary_table(report))
        if cut is not None:  # under the table it qualifies
            print(cut)
        print(f"report: {path}\ngrid:   {report['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
