"""Per model family, LoRA distillation on the distributed job: a teacher that is a tiny random base plus a random
LoRA delta (its "capability"), one LoRA student of the same base, trained by `python -m trainer.main` (2 Ray Train
workers x 2 micro-batches, the teacher on Ray Serve). Prints each route's velocity error before and after, and
writes benchmarks/results/families.json.

    python benchmarks/families.py [--steps 60] [--families sd3 flux flux-kontext flux2 flux2-klein z-image qwen-image
                                   qwen-image-edit qwen-image-edit-plus flux2-klein<flux2]

`flux2-klein<flux2` is composition across models: a tiny FLUX.2 [klein] student (fully trained: a random klein cannot
reach a random [dev] through a low-rank delta) learns from a tiny FLUX.2 [dev] teacher, a larger transformer with its
own Mistral-3 text encoder, in the same latent space (the same VAE).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline  # noqa: E402


EDITS = ("flux-kontext", "flux2", "flux2-klein", "qwen-image-edit", "qwen-image-edit-plus")  # source as tokens: an edit route
SIZE = {"flux2": 64, "flux2-klein": 64}  # the FLUX.2 pipelines take reference images of 64 px and more
CROSS = {"flux2-klein<flux2": ("flux2-klein", "flux2")}  # name: (student family, teacher family)


def job(family: str, models: Path, out: Path, steps: int) -> dict:
    student, teacher = CROSS.get(family, (family, family))
    if family in CROSS:  # the other model itself is the teacher; the student is trained in full
        route, adapter = {"capability": "t2i", "teacher": {"base": str(models / teacher)}}, {"adapter": "full"}
    else:
        route = {"capability": "global_edit" if family in EDITS else "t2i", "teacher": {"loras": [{"path": str(models / f"{family}-lora")}]}}
        adapter = {"lora": {"rank": 4, "alpha": 4}}
    return {"run_name": f"family-{family.replace('<', '-from-')}", "output_dir": str(out), "steps": steps, "torch_threads": 1,
            "student": {"base": str(models / student), "resolution": SIZE.get(student, 32), **adapter},
            "routes": {"capability": route},
            "method": {"rollout_steps": 8, "schedule": "family"},
            "optim": {"lr": 2e-3 if family in CROSS else 1e-2, "batch_size": 8, "grad_accum": 2, "warmup_steps": 0, "ema_decay": 0.0},
            "eval": {"sampling_steps": 8, "schedule": "family", "velocity_error_samples": 16, "samples_per_condition_in_grid": 2},
            "log_every": 20, "checkpoint_every": steps,
            "cluster": {"num_workers": 2, "cpus_per_worker": 0.5},
            "services": {"gateway": False, "teacher_defaults": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--families", nargs="+", default=["sd3", "flux", "flux-kontext", "flux2", "flux2-klein", "z-image", "qwen-image",
                                                      "qwen-image-edit", "qwen-image-edit-plus", *CROSS])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "families")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "families.json")
    a = ap.parse_args(argv)
    models = a.work / "models"
    rows = []
    for family in a.families:
        for f in CROSS.get(family, (family,)):
            if not (models / f / "model_index.json").exists():
                build_tiny_pipeline(f, models / f, seed=0, sample_size=SIZE.get(f, 32))
                build_random_lora(models / f, models / f"{f}-lora", rank=4, std=0.1, seed=1)
        cfg = a.work / f"{family.replace('<', '-from-')}.yaml"
        cfg.write_text(yaml.safe_dump(job(family, models, a.work / "runs", a.steps)))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "trainer.main", "--config", str(cfg), "--no-resume", "--eval"], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        report = json.loads((a.work / "runs" / f"family-{family.replace('<', '-from-')}" / "report.json").read_text())
        err = report["velocity_error"]["capability"]
        rows.append({"family": family, "steps": report["training"]["steps"], "before": err["before"], "after": err["after"],
                     "reduction": 1 - err["after"] / err["before"], "samples_per_s": report["training"]["samples_per_s"],
                     "job_seconds": time.perf_counter() - t0})
        print(f"{family}: velocity error {err['before']:.5f} -> {err['after']:.5f}", flush=True)
    print(f"\n{'family':<20}{'steps':>6}{'before':>10}{'after':>10}{'reduction':>11}{'samples/s':>11}{'job s':>8}")
    for r in rows:
        print(f"{r['family']:<20}{r['steps']:>6}{r['before']:>10.5f}{r['after']:>10.5f}{r['reduction']:>10.1%}"
              f"{r['samples_per_s']:>11.1f}{r['job_seconds']:>8.0f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    import os
    import platform

    import torch

    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, CUDA {torch.cuda.is_available()}"
    kept = json.loads(a.out.read_text())["rows"] if a.out.exists() else []  # the other families' rows stay
    rows = [r for r in kept if r["family"] not in a.families] + rows
    a.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"json: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
