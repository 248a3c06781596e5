#!/usr/bin/env bash
# GPU check (< 10 minutes on one modern GPU): the CUDA-relevant tests, one full-size SD3.5-Medium DanceOPD step
# (LoRA r128, bf16, rollout 16) at 512 and 1024 px, then a short learning benchmark on the GPU with a table of
# card, step time and scores. Usage: bash scripts/gpu_check.sh [minutes-of-training]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
MIN=${1:-3}
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
echo "== learning benchmark on the GPU (${MIN} min)"
timeout $((MIN * 60 + 150)) "$PY" benchmarks/learning.py --minutes "$MIN" --device cuda torch_threads=4 log_every=100 \
  --out benchmarks/results/learning-basic-cuda.json
