"""The GPU check's code path, on the CPU with tiny pipelines, in an interpreter where Ray, FastAPI and Redis cannot be
imported (as on the bare CUDA machine): it runs scripts/gpu_check.sh --tiny, which writes one JSON per part."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_without_ray_and_reports_every_part_beside_the_plan(tmp_path):
    absent = tmp_path / "absent"
    for name in ("ray", "fastapi", "redis", "prometheus_client"):  # importing any of them fails, as there
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(absent)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    parts = sorted(p.stem for p in out.glob("*.json"))
    cases = [f"{m}-{r}-{e}" for m in ("sd3.5-medium", "flux.1-dev") for r in (32, 16) for e in ("precompute", "on_device")]
    assert parts == sorted(["environment", "summary", "sd3.5-medium-text_encoding", "flux.1-dev-text_encoding", *cases])
    for case in cases:
        row = json.loads((out / f"{case}.json").read_text())
        assert all(row["seconds"][k] > 0 for k in ("rollout", "teacher", "forward_backward", "optimizer")), row
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        precompute = row["text_embeddings"] == "precompute"
        # precompute: neither the worker nor the teacher holds a text encoder, and the plan counts none
        assert (row["worker_text_encoder_parameters"] == 0) == precompute and (row["teacher_text_encoder_parameters"] == 0) == precompute
        planned = row["planned_parts"]["train_worker"]
        assert any(k.startswith("text_encoder") for k in planned) != precompute, planned
        assert row["planned_gib"]["train_worker"] > 0 and row["measured_gib"]["train_worker"] is None  # no allocator stats on a CPU
    encoding = json.loads((out / "flux.1-dev-text_encoding.json").read_text())
    assert encoding["prompts"] == 9 and set(encoding["planned_parts"]) >= {"text_encoder (float32)", "text_encoder_2 (float32)"}
    assert "sd3.5-medium    32 precompute" in run.stdout and "gpu-check done" in run.stdout
