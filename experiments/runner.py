"""Run an experiment: every (arm, seed) trains at the spec's budget and is scored by the suite's judges.

Resumable: a finished run leaves result.json and is skipped next time; an interrupted run resumes from its
own latest checkpoint. `danceopd experiment <spec.yaml> [--out DIR] [--smoke]`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from danceopd.config import load_config
from experiments.spec import ExperimentSpec
from trainer.job import JobConfig

# A smoke run checks the whole pipeline in seconds; its numbers mean nothing.
SMOKE = {"steps": 4, "log_every": 2, "checkpoint_every": 2, "eval.samples_per_capability": 8, "eval.sampling_steps": 4,
         "student.num_layers": 1, "method.rollout_steps": 4}


def run_config(spec: ExperimentSpec, arm: str, seed: int, out: Path, smoke: bool) -> JobConfig:
    over = {**spec.budget, **spec.arms[arm], **(SMOKE if smoke else {}), "seed": seed, "student.seed": seed,
            "run_name": f"seed{seed}", "output_dir": str(out / arm), "max_minutes": None}
    return load_config(spec.base, over, model=JobConfig)


def scores(report: dict) -> dict:
    out = {}
    for route, e in report["routes"].items():
        s = e["student"]
        out[route] = {"score": s["score"], "teacher_score": e["teacher"]["score"]}
        if "psnr_db" in s:
            out[route]["psnr_db"] = s["psnr_db"]
        if "diversity" in e:
            out[route]["modes_hit"] = e["diversity"]["student"]["modes_hit"]
            out[route]["coverage"] = e["diversity"]["coverage_vs_teacher"]
    return out


def run_one(spec: ExperimentSpec, arm: str, seed: int, out: Path, smoke: bool, log=print) -> dict:
    cfg = run_config(spec, arm, seed, out, smoke)
    result_path = cfg.run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    if spec.trainer == "reference":
        from danceopd.evaluation import evaluate
        from trainer.reference import ReferenceTrainer

        tr = ReferenceTrainer(cfg, log=lambda m: None)
        tr.resume()  # an interrupted run continues from its checkpoint
        tr.fit()
        report = evaluate(tr.final_student.field, tr.teachers, cfg.routes, tr.suite, cfg.eval, device=tr.device,
                          grid_path=cfg.run_dir / "grid.png")
        history, steps = tr.history, tr.step
    else:  # the distributed job, one Ray job per run (it resumes by itself: run.json + Ray Train storage)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        job_file = cfg.run_dir / "job.yaml"
        job_file.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
        proc = subprocess.run([sys.executable, "-m", "trainer.main", "--config", str(job_file), "--eval"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{arm}/seed{seed}: trainer.main failed ({proc.returncode}): {proc.stderr[-2000:]}")
        report = json.loads((cfg.run_dir / "report.json").read_text())
        history, steps = report["training"].get("history", []), report["training"]["steps"]
    result = {"arm": arm, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t0, "routes": scores(report),
              "history": [{"step": h["step"], "loss": h["loss"]} for h in history]}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(result_path)  # atomic: a crash never leaves a half-written result
    log(f"{spec.name}: {arm} seed {seed}: " + " ".join(f"{r}={v['score']:.3f}" for r, v in result["routes"].items())
        + f" ({result['seconds']:.0f} s)")
    return result


def run_experiment(spec: ExperimentSpec, out: Path, smoke: bool = False, log=print) -> list[dict]:
    seeds = spec.seeds[:2] if smoke else spec.seeds
    return [run_one(spec, arm, seed, out / spec.name, smoke, log) for arm in spec.arms for seed in seeds]
