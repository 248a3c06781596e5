#!/usr/bin/env bash
# GPU check on a bare CUDA machine: python3 with torch, transformers, peft, accelerate, safetensors, tokenizers; no Ray,
# no network. diffusers and pydantic travel as wheels (`make gpu-wheels` downloads them into .gpu-wheels/ on a machine
# with PyPI) and are installed here into .gpu-site/. Runs scripts/gpu_check.py: one full-size DanceOPD step of
# SD3.5-Medium and FLUX.1-dev at 1024 and 512 px, text embeddings precomputed and on the device, beside the memory
# plan; a JSON per part in benchmarks/results/gpu-check/ (or --out DIR). Arguments go to gpu_check.py (--tiny: CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import diffusers, pydantic" 2>/dev/null; then
  if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    echo "gpu-check: diffusers/pydantic are not installed and .gpu-wheels/ is empty: run 'make gpu-wheels' where PyPI is reachable" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --target .gpu-site .gpu-wheels/*.whl
  export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout "${GPU_CHECK_TIMEOUT_S:-470}" "$PY" scripts/gpu_check.py "$@"
