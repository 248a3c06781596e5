"""Evaluation on the training workers. The job's driver holds no model (it may run on a head node without a GPU):
before training and at its end, the workers evaluate the student they already hold, on the devices Ray gave them,
each rank taking a share of the routes (route i on rank i mod world size); rank 0 joins the parts, writes the grid
and the report. A separate task could not be scheduled anyway while the workers hold every GPU.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from danceopd.evaluation import GRID_CELL, assemble_report, evaluate_routes, sample_cell, samples_path, shrink_blocks, write_report

BEFORE = "eval-before.json"  # the evaluation at step 0, in the run folder (the final report.json quotes it)


def evaluate_on_workers(job, student, teachers: dict, suite, data: dict, sigmas: torch.Tensor, step: int,
                        grid_path: Path | None, cell: int = GRID_CELL) -> dict | None:
    """This rank's routes evaluated against the served teachers; rank 0 returns the whole report (others None).
    The student is left as it was (train mode, an empty prompt cache: the run draws what it would draw without the
    evaluation) and the evaluation's memory is released."""
    import ray
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = [r for i, r in enumerate(job.routes) if i % world == rank]
    was_training = student.transformer.training
    student.transformer.eval()
    try:
        entries, blocks = evaluate_routes(student, teachers, job, suite, data, sigmas, mine, student.field.device,
                                          grid=grid_path is not None)
    finally:
        student.transformer.train(was_training)
        release_memory(student)
    where = {r: {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()} for r in mine}
    parts = [None] * world if rank == 0 else None
    if distributed:  # the grid's images at its cell size: KBs to send, not decoded 1024 px images
        dist.gather_object((entries, shrink_blocks(blocks, cell), where), parts, dst=0)
    else:
        parts = [(entries, blocks, where)]
    if rank != 0:
        return None
    entries, blocks, where = {}, [], {}
    for e, b, w in parts:
        entries.update(e)
        blocks.extend(b)
        where.update(w)
    report = assemble_report(student, job, entries, blocks, grid_path, cell)
    report["step"], report["evaluated_on"] = step, {r: where[r] for r in job.routes}
    return report


def sample_during_training(job, student, teachers: dict, suite, data: dict, sigmas: torch.Tensor, step: int) -> dict | None:
    """eval.every: the held-out samples (tiles at the training resolution) and velocity errors at `step`, on the
    workers (a collective: every rank calls it); rank 0 writes samples/step-XXXXXX.png and the TensorBoard image and
    curves (and W&B / MLflow when on) and returns the report."""
    path = samples_path(job.run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = evaluate_on_workers(job, student, teachers, suite, data, sigmas, step, path, sample_cell(job))
    if report is not None:
        log_samples(job, step, report)
    return report


def log_samples(cfg, step: int, report: dict) -> None:
    from danceopd.tracking import SAMPLES, RunTracker, eval_scalars

    tracker = RunTracker(cfg.tracking, cfg.run_dir, cfg.run_name, SAMPLES, replace_from=step)
    try:
        tracker.scalars(step, {f"samples/{k.removeprefix('eval/')}": v for k, v in eval_scalars(report).items()},
                        {"samples": Path(report["grid"])})
    finally:
        tracker.close()


def release_memory(student) -> None:
    """Drop what an evaluation left behind: the prompts it encoded and the allocator's free blocks (on CUDA)."""
    student.field.prompts.clear()
    gc.collect()
    if student.field.device.type == "cuda":
        torch.cuda.empty_cache()


def final_report(run_dir: Path, after: dict) -> dict:
    """The final evaluation with the one before training (if it ran) beside it, per route."""
    path = Path(run_dir) / BEFORE
    before = json.loads(path.read_text()) if path.exists() else None
    after["before"] = before
    after["velocity_error"] = {r: {"before": (before or {"routes": {}})["routes"].get(r, {}).get("velocity_error"),
                                   "after": e.get("velocity_error")} for r, e in after["routes"].items()}
    return after


def write_before(run_dir: Path, report: dict) -> Path:
    return write_report(report, Path(run_dir) / BEFORE)
