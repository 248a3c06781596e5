# The DanceOPD Serve image: Ray head, GPU workers and job drivers all run it (docker-compose.yml, KubeRay).
# CUDA torch by default; build a CPU image with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cu128"
# HF_HOME: the Hugging Face cache every container shares (a volume in docker-compose.yml, a PVC in KubeRay), filled once
# by `danceopd prefetch`; HF_TOKEN (gated models) comes from the environment at run time, never baked into the image.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/cache/huggingface
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md ./
COPY danceopd ./danceopd
COPY danceopd_cli ./danceopd_cli
COPY services ./services
COPY router ./router
COPY trainer ./trainer
COPY configs ./configs
COPY deploy ./deploy
RUN pip install -e .
# Ray: 6379 GCS, 8265 dashboard + job API, 8000 Serve HTTP (REST gateway, router), 8080 metrics, 10001 client
EXPOSE 6379 8265 8000 8080 10001
CMD ["ray", "start", "--head", "--block", "--dashboard-host=0.0.0.0", "--metrics-export-port=8080"]
