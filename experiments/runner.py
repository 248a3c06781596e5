"""Run an experiment: every (arm, seed) trains at the spec's budget and is scored by the suite's judges.

Resumable: a finished run leaves result.json and is skipped next time; an interrupted run resumes from its
own latest checkpoint. `danceopd experiment <spec.yaml> [--out DIR] [--smoke]`.
"""

from __future__ import annotations

import hashlib
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


def substitute(value, root: Path):
    """'{out}' -> the experiments folder, in strings nested anywhere in an override value."""
    if isinstance(value, str):
        return value.replace("{out}", str(root))
    if isinstance(value, dict):
        return {k: substitute(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, root) for v in value]
    return value


def run_config(spec: ExperimentSpec, arm: str, seed: int, out: Path, smoke: bool) -> JobConfig:
    # No wall-clock stop unless the spec's budget is one (equal wall time): a step budget stays reproducible.
    over = {"max_minutes": None, **spec.budget, **spec.arms[arm], **(SMOKE if smoke else {}), "seed": seed, "student.seed": seed,
            "run_name": f"seed{seed}", "output_dir": str(out / arm)}
    return load_config(spec.base, substitute(over, out.parent), model=JobConfig)


def prepare(spec: ExperimentSpec, root: Path, smoke: bool, log=print) -> None:
    for step in spec.prepare:
        target = Path(substitute(step.creates, root))
        if target.exists():
            continue
        argv = [sys.executable if a == "python" else substitute(a, root) for a in step.run]
        if smoke:
            argv += [f"{k}={v}" for k, v in SMOKE.items()]
        log(f"{spec.name}: preparing {target}: {' '.join(argv[1:])}")
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0 or not target.exists():
            raise RuntimeError(f"{spec.name}: preparing {target} failed ({proc.returncode}): {proc.stderr[-2000:]}")


def scores(report: dict) -> dict:
    out = {}
    for route, e in report["routes"].items():
        s = e["student"]
        out[route] = {"score": s["score"], "teacher_score": e["teacher"]["score"]}
        if "psnr_db" in s:
            out[route]["psnr_db"] = s["psnr_db"]
        if "reward" in s:
            out[route]["reward"] = s["reward"]
            out[route]["teacher_reward"] = e["teacher"]["reward"]
        if "diversity" in e:
            out[route]["modes_hit"] = e["diversity"]["student"]["modes_hit"]
            out[route]["coverage"] = e["diversity"]["coverage_vs_teacher"]
    return out


def run_probes(spec: ExperimentSpec, cfg: JobConfig, student_field, suite, device) -> dict:
    if spec.probe is None:
        return {}
    from experiments.probes import effective_guidance

    alpha = (cfg.routes["t2i"].cfg_alpha or 1.0) if "t2i" in cfg.routes else 1.0
    return effective_guidance(student_field, suite, alpha, spec.probe.betas, spec.probe.samples, seed=cfg.eval.seed, device=device)


# Settings added after results were recorded: left out of the key while at their default, so that adding a knob
# does not make every finished run stale (a run that sets the knob gets its own key).
KEY_OMITTED_AT_DEFAULT = {("method", "off_policy_share"): 0.0, ("method", "staleness"): 0, ("optim", "states_per_backward"): None,
                          ("services", "teacher_defaults", "simulated_call_s"): None, ("eval", "velocity_error_samples"): 16, ("eval", "clip_model"): None,
                          **{("student", k): v for k, v in {"family": None, "base": None, "resolution": 32, "adapter": "auto",
                                                            "lora": {"rank": 128, "alpha": 128.0, "target_modules": None, "dropout": 0.0},
                                                            "guidance": None, "gradient_checkpointing": False, "save_merged": False, "edit_input": False,
                                                            "max_sequence_length": None, "prompt_cache_size": 512}.items()}}
SECTION_OMITTED_AT_DEFAULT = {"data": {"manifest": None, "latent_cache": None}}


def run_key(spec: ExperimentSpec, cfg: JobConfig, arm: str) -> str:
    """What makes a run's result: its config (without where it is written), its probes and its trainer."""
    data = json.loads(cfg.model_dump_json())
    data.pop("output_dir"), data.pop("run_name")
    data.pop("execution")  # how a run executes never changes what it computes (tested bit for bit)
    for (*sections, name), default in KEY_OMITTED_AT_DEFAULT.items():
        node = data
        for section in sections:
            node = node[section]
        if node.get(name) == default:
            node.pop(name)
    for section, default in SECTION_OMITTED_AT_DEFAULT.items():
        if data.get(section) == default:
            data.pop(section)
    data["_experiment"] = {"probe": spec.probe.model_dump() if spec.probe else None, "eval_before": spec.eval_before,
                           "trainer": spec.trainer_for(arm)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_one(spec: ExperimentSpec, arm: str, seed: int, out: Path, smoke: bool, log=print) -> dict:
    cfg = run_config(spec, arm, seed, out, smoke)
    key = run_key(spec, cfg, arm)
    result_path, marker = cfg.run_dir / "result.json", cfg.run_dir / "run.key"
    if result_path.exists() and not marker.exists():  # a result from a runner without keys: same spec, keep it
        marker.write_text(key)
    if marker.exists() and marker.read_text() != key:  # the spec changed: never reuse or resume a stale run
        stale = cfg.run_dir.with_name(f"{cfg.run_dir.name}.stale-{int(time.time())}")
        cfg.run_dir.rename(stale)
        log(f"{spec.name}: {arm} seed {seed}: config changed, previous run moved to {stale}")
    if result_path.exists():
        return json.loads(result_path.read_text())
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    twin = next((k.parent for k in sorted(out.parent.glob("*/*/seed*/run.key"))
                 if k.read_text() == key and (k.parent / "result.json").exists()), None)
    if twin is not None:  # the same run (same config, probes, trainer) finished in another experiment: reuse it
        result = {**json.loads((twin / "result.json").read_text()), "arm": arm, "seed": seed, "reused_from": str(twin)}
        result_path.write_text(json.dumps(result, indent=2))
        log(f"{spec.name}: {arm} seed {seed}: same run as {twin}, reused")
        return result
    t0 = time.perf_counter()
    if spec.trainer_for(arm) == "reference":
        from danceopd.evaluation import evaluate
        from trainer.reference import ReferenceTrainer

        tr = ReferenceTrainer(cfg, log=lambda m: None)
        tr.resume()  # an interrupted run continues from its checkpoint
        before_path = cfg.run_dir / "before.json"  # scored once, before the first step (kept across a resume)
        if spec.eval_before and not before_path.exists() and tr.step == 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            with tr.final_weights():
                before_path.write_text(json.dumps(scores(evaluate(tr.student.field, tr.teachers, cfg.routes, tr.suite, cfg.eval,
                                                                  device=tr.device))))
        stopped = tr.fit().get("stopped")
        if stopped:  # an arm that diverged has no result to compare
            raise RuntimeError(f"{arm}/seed{seed}: training failed: {stopped}")
        with tr.final_weights():
            report = evaluate(tr.student.field, tr.teachers, cfg.routes, tr.suite, cfg.eval, device=tr.device,
                              grid_path=cfg.run_dir / "grid.png")
            probes = run_probes(spec, cfg, tr.student.field, tr.suite, tr.device)
        before = json.loads(before_path.read_text()) if before_path.exists() else None
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
        before = scores(report["before"]) if spec.eval_before and report.get("before") else None
        if spec.probe is not None:
            from danceopd.student import load_student
            from danceopd.suite import CapabilitySuite

            probes = run_probes(spec, cfg, load_student(cfg.run_dir / "student").field,
                                CapabilitySuite(cfg.suite.tier, cfg.suite.tau, cfg.suite.seed), "cpu")
        else:
            probes = {}
    result = {"arm": arm, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t0, "routes": scores(report),
              "before": before, "probes": probes, "history": [{"step": h["step"], "loss": h["loss"]} for h in history]}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.rename(result_path)  # atomic: a crash never leaves a half-written result
    log(f"{spec.name}: {arm} seed {seed}: " + " ".join(f"{r}={v['score']:.3f}" for r, v in result["routes"].items())
        + f" ({result['seconds']:.0f} s)")
    return result


def run_experiment(spec: ExperimentSpec, out: Path, smoke: bool = False, log=print) -> list[dict]:
    seeds = spec.seeds[:2] if smoke else spec.seeds
    prepare(spec, out, smoke, log)
    return [run_one(spec, arm, seed, out / spec.name, smoke, log) for arm in spec.arms for seed in seeds]
