"""Experiment tracking: a run's curves and sample grids, kept after the cluster is gone.

Every run writes TensorBoard event files under <run_dir>/tensorboard: `train/` (one point per log window: loss per
route, samples/s, step-time shares, learning rate, gradient norm, route mix) and `eval/` (scores per route, and the
evaluation grids as images). `tracking.wandb` / `tracking.mlflow` send the same scalars and images through those
libraries (W&B offline by default: no network; MLflow: a local file store by default). Only one process writes
(the reference trainer, or rank 0 of the distributed job; the driver for evaluations).

A resumed run continues the same curves: its writer starts with TensorBoard's purge marker at the step after the
checkpoint it resumed from, so
the points a crashed attempt logged after its last checkpoint are dropped by every TensorBoard reader instead of
being shown twice (the resumed run logs those steps again).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from danceopd.config import TrackingConfig

TRAIN, EVAL, SAMPLES = "train", "eval", "samples"  # SAMPLES: eval.every's grids and curves during training
IDS = "tracking.json"  # in the run folder: the W&B run id and MLflow run id of this run


def start_new_run(run_dir: Path) -> None:
    """A new run in this folder (not a resume): its W&B and MLflow curves start a new tracked run."""
    (Path(run_dir) / IDS).unlink(missing_ok=True)


def tensorboard_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tensorboard"


def window_scalars(rec: dict) -> dict[str, float]:
    """The scalars of one progress window (a trainer's history record)."""
    out = {f"loss/{route}": v for route, v in rec.get("loss", {}).items()}
    out["throughput/samples_per_s"] = rec["samples_per_s"]
    out.update({f"time_share/{part}": v for part, v in rec.get("time_share", {}).items()})
    for key in ("lr", "grad_norm"):
        if rec.get(key) is not None:
            out[f"optim/{key}"] = rec[key]
    out.update({f"route_mix/{route}": v for route, v in rec.get("route_mix", {}).items()})
    return {k: float(v) for k, v in out.items()}


def eval_scalars(report: dict) -> dict[str, float]:
    """Per route: velocity error against its teacher, and the suite's judge scores (student, teacher, ratio, PSNR)."""
    out = {}
    for route, e in report.get("routes", {}).items():
        if e.get("velocity_error") is not None:
            out[f"eval/{route}/velocity_error"] = e["velocity_error"]
        for who in ("student", "teacher"):
            for metric in ("score", "psnr_db"):
                if (e.get(who) or {}).get(metric) is not None:
                    out[f"eval/{route}/{who}_{metric}"] = e[who][metric]
        if e.get("score_ratio") is not None:
            out[f"eval/{route}/score_ratio"] = e["score_ratio"]
        if e.get("clip_score") is not None:
            out[f"eval/{route}/clip_score"] = e["clip_score"]
    return {k: float(v) for k, v in out.items()}


class RunTracker:
    """One writer for one part of a run (`train`, `eval` or `samples`). `replace_from`: the first step whose earlier points this
    writer replaces (train: the step after the checkpoint the attempt starts from; eval: the step evaluated)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, run_name: str, part: str = TRAIN, replace_from: int | None = None,
                 config: dict | None = None):
        self.cfg, self.part = cfg, part
        self.run_dir = Path(run_dir)
        self.tb = self.wandb = self.mlflow = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir(self.run_dir) / part), purge_step=replace_from, flush_secs=10)
        ids = self._ids()  # the W&B / MLflow run this run folder's run writes to (kept across resumes)
        if cfg.wandb is not None:
            import wandb

            w = cfg.wandb
            self.wandb = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(self.run_dir), name=run_name,
                                    id=ids.setdefault("wandb_id", f"{run_name}-{uuid.uuid4().hex[:8]}"), resume="allow",
                                    config=config, reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        if cfg.mlflow is not None:
            import mlflow

            m = cfg.mlflow
            if m.tracking_uri is None:  # MLflow 3 keeps its file store in maintenance mode, behind this opt-in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow = mlflow.MlflowClient(m.tracking_uri or (self.run_dir / "mlruns").resolve().as_uri())
            if "mlflow_run_id" not in ids:
                exp = self.mlflow.get_experiment_by_name(m.experiment)
                exp_id = exp.experiment_id if exp is not None else self.mlflow.create_experiment(m.experiment)
                ids["mlflow_run_id"] = self.mlflow.create_run(exp_id, run_name=run_name).info.run_id
            self.mlflow_run = ids["mlflow_run_id"]
            if config is not None and not ids.get("mlflow_params"):  # the run's config, once (MLflow params never change)
                from mlflow.entities import Param

                from danceopd.config import flatten

                params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes up to 100 params per batch
                    self.mlflow.log_batch(self.mlflow_run, params=params[i:i + 100])
                ids["mlflow_params"] = True
        self.ids = ids
        self._save_ids()

    def _ids(self) -> dict:
        path = self.run_dir / IDS
        return json.loads(path.read_text()) if path.exists() else {}

    def _save_ids(self) -> None:
        if self.wandb is not None or self.mlflow is not None:
            (self.run_dir / IDS).write_text(json.dumps(self.ids, indent=2))

    def _logged(self, step: int) -> bool:
        """Whether W&B / MLflow already have this step. They keep every point they are sent, so a resumed run skips
        the windows it logged before its crash (the same numbers: every draw is a function of the seed and the step),
        and evaluating a step again is not sent twice. TensorBoard's purge marker does this for its files."""
        if self.part == TRAIN:
            return step <= self.ids.get("train_logged_through", -1)
        return step in self.ids.get(f"{self.part}_steps_logged", [])

    def _mark_logged(self, step: int) -> None:
        if self.part == TRAIN:
            self.ids["train_logged_through"] = step
        elif step not in self.ids.setdefault(f"{self.part}_steps_logged", []):
            self.ids[f"{self.part}_steps_logged"].append(step)
        self._save_ids()

    def scalars(self, step: int, values: dict[str, float], images: dict[str, Path] | None = None) -> None:
        """Scalars (and images: PNG files, e.g. evaluation grids) at `step`."""
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)
        for tag, path in (images or {}).items():
            self.image(tag, step, path)
        if self._logged(step) or (self.wandb is None and self.mlflow is None):
            return
        if self.wandb is not None:
            self.wandb.log({f"{self.part}/{k}" if self.part == TRAIN else k: v for k, v in values.items()}, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric
            import time

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        self._mark_logged(step)

    def image(self, tag: str, step: int, path: Path) -> None:
        """A PNG (an evaluation grid) as an image at `step` (before its step's scalars: see scalars)."""
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(tag, pixels, step, dataformats="HWC")
        if self._logged(step):
            return
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(pixels)}, step=step)
        if self.mlflow is not None:
            self.mlflow.log_image(self.mlflow_run, pixels, key=tag, step=step)

    def window(self, rec: dict) -> None:
        self.scalars(rec["step"], window_scalars(rec))

    def evaluation(self, step: int, report: dict) -> None:
        """An evaluation's scores and its grid."""
        self.scalars(step, eval_scalars(report), {"eval/grid": Path(report["grid"])} if report.get("grid") else None)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, "FINISHED")


def log_evaluation(cfg: TrackingConfig, run_dir: Path, run_name: str, step: int, report: dict) -> None:
    """Write one evaluation (scores + grid) at `step`; evaluating the same step again replaces it."""
    tracker = RunTracker(cfg, run_dir, run_name, EVAL, replace_from=step)
    try:
        tracker.evaluation(step, report)
    finally:
        tracker.close()
