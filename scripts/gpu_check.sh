#!/usr/bin/env bash
# GPU check (~10 minutes on one modern GPU): the CUDA-relevant tests, one full-size SD3.5-Medium DanceOPD step
# (LoRA r128, bf16, rollout 16) at 512 and 1024 px, the training-throughput table (benchmarks/step.py: reference
# vs distributed, each speed-up alone), then a short learning benchmark on the GPU with a table of card, step
# time and scores. Usage: bash scripts/gpu_check.sh [minutes-of-training]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MIN=${1:-2}
"$PY" - <<'PYEOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu-check: no CUDA GPU visible to torch " + torch.__version__ + " (a CPU build?)")
print("card:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF
echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -m cuda tests/
echo "== one DanceOPD step on a full-size SD3.5-Medium transformer (random weights), 512 and 1024 px, teacher in process vs Serve"
timeout 300 "$PY" benchmarks/sd35_step.py --resolutions 512 1024 --steps 3
echo "== training throughput: reference vs distributed job, one speed-up at a time (student bf16, teachers on their own Serve replicas on the GPU)"
timeout 300 "$PY" benchmarks/step.py --steps 60 --cases 1,2,3,4,5,6,7,10 --out benchmarks/results/step-cuda.json \
  device=cuda dtype=bfloat16 cluster.num_workers=1 cluster.gpus_per_worker=0.5 torch_threads=4 \
  services.teacher_defaults.device=cuda services.teacher_defaults.ray_actor_options.num_gpus=0.1
echo "== learning benchmark on the GPU (${MIN} min)"
timeout $((MIN * 60 + 150)) "$PY" benchmarks/learning.py --minutes "$MIN" --device cuda torch_threads=4 log_every=100 \
  --out benchmarks/results/learning-basic-cuda.json
