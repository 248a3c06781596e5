# DanceOPD Serve: the two commands are `make demo` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU install path pins torch (a local CPU wheel on these machines). A venv that already holds a torch
# (e.g. a CUDA build on a GPU box) keeps it: pyproject only asks for torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install os-deps deploy-files docs docs-reference pixel-base demo demo-reference demo-diffusers tiny-models results test test-recipes test-fast chaos bench-learning bench-teachers bench-step gpu-check gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## os-deps: what the tests run for real (Debian packages): redis-server, prometheus, and docker-compose
## (validates docker-compose.yml with `docker-compose config`; no Docker engine needed)
os-deps:
	@if command -v redis-server >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then :; else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server prometheus docker-compose >/dev/null; \
	fi

## demo: the distributed job on a local Ray: suite teachers on Serve, router, 2 Ray Train workers; a pre-trained T2I
## student (assets/pixel-t2i-base) gains local and global editing; eval: base vs student vs teachers, report.json + grid.png
demo: install
	$(BIN)/danceopd train --config configs/demo.yaml --no-resume --eval

## demo-reference: the same run config on the single-process reference trainer (2 torch threads)
demo-reference: install
	$(BIN)/danceopd train --reference --config configs/demo.yaml --no-resume --eval torch_threads=2

## pixel-base: the demo's pre-trained T2I student, remade: configs/pretrain-t2i.yaml (plain flow matching on the suite's
## T2I data, reference trainer, 2 threads: the same bytes on the same machine) into assets/pixel-t2i-base (committed)
PIXEL_BASE := assets/pixel-t2i-base
pixel-base: install
	$(BIN)/python -m trainer.reference --config configs/pretrain-t2i.yaml --no-resume output_dir=runs/pixel-base student.save_dtype=bfloat16
	rm -rf $(PIXEL_BASE) && mkdir -p $(dir $(PIXEL_BASE)) && cp -r runs/pixel-base/pretrain-t2i/student $(PIXEL_BASE)
	@du -sh $(PIXEL_BASE)

## tiny-models: random tiny FLUX / FLUX Kontext pipelines and LoRA "capabilities" (offline), for demo-diffusers
TINY := runs/tiny-models
$(TINY)/.done: $(STAMP)
	$(BIN)/danceopd tiny-pipeline --family flux --out $(TINY)/flux --seed 0 >/dev/null
	$(BIN)/danceopd tiny-pipeline --family flux-kontext --out $(TINY)/flux-kontext --seed 0 >/dev/null
	$(BIN)/danceopd tiny-lora --base $(TINY)/flux --out $(TINY)/flux-t2i-lora --rank 4 --seed 1 >/dev/null
	$(BIN)/danceopd tiny-lora --base $(TINY)/flux-kontext --out $(TINY)/kontext-edit-lora --rank 4 --seed 2 >/dev/null
	touch $@
tiny-models: $(TINY)/.done

## demo-diffusers: the distributed job on tiny FLUX-family pipelines: LoRA student, LoRA + CFG T2I teachers, Kontext edits
demo-diffusers: install tiny-models
	$(BIN)/python -m trainer.main --config configs/demo-diffusers.yaml --no-resume --eval

# The experiment report: every claim, 3 seeds each (finished runs under runs/experiments are reused).
EXPERIMENTS = composition composition-sd3 edit-pair states routing query-position query-k rollout-steps cfg-absorption \
	cfg-absorption-uniform realism diversity-remedies adaptive-routing distributed-stack staleness
results: install
	$(BIN)/danceopd experiment $(EXPERIMENTS:%=experiments/specs/%.yaml) --out runs/experiments --report docs/results.md

## docs: the documentation site (MkDocs Material) into site/, --strict: a broken link or anchor fails the build
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

## docs-reference: regenerate the configuration and REST API reference pages from the code (a test fails when stale)
docs-reference: install
	$(BIN)/python -m danceopd_cli.docs_reference

## test: the documentation site, then the whole suite (CPU; CUDA tests skip without a GPU) and its 25 slowest tests; one
## shipped recipe trains from hub ids here, the others in test-recipes
test: install os-deps docs
	$(BIN)/python -m pytest -q -m "not chaos and not recipes" --durations=25

## test-recipes: every shipped recipe as users run it: a tiny hub under the recipes' hub ids (danceopd tiny-hub), prefetch,
## plan, the documented `ray job submit` lines and the RayJob entrypoint with configs/smoke.yaml, the students loaded
## from the hub ids in diffusers (~2 min a recipe on 2 cores; times in runs/test-recipes.json)
test-recipes: install os-deps
	$(BIN)/python -m pytest -q -m recipes tests/test_recipes.py
	@$(BIN)/python -c "import json; s = json.load(open('runs/test-recipes.json')); print('recipe                 job (s)  prefetch+plan (s)  student loads (s)'); [print(f\"{r:<22} {v['job_s']:>7}  {v['prefetch_plan_s']:>17}  {v['student_loads']['seconds']:>17}\") for r, v in s['recipes'].items()]"

## chaos: the seeded chaos table: a teacher replica, a train worker, the router replica and Redis killed mid-run,
## each alone and all at once; final weights and routing log against an uninterrupted run (runs/chaos/chaos.json)
chaos: install os-deps
	$(BIN)/python -m pytest -q -s tests/test_chaos.py

test-fast: install os-deps
	$(BIN)/python -m pytest -q -m "not slow and not chaos"

## bench-learning: train from scratch for --minutes, print per-capability scores against the teachers
bench-learning: install
	$(BIN)/python benchmarks/learning.py --minutes 10

## bench-teachers: teacher query cost (in-process vs handle vs REST) and batched throughput
bench-teachers: install
	$(BIN)/python benchmarks/teacher_query.py

## bench-step: samples/s of the reference trainer and the distributed job, one speed-up at a time (table + benchmarks/results/step.json)
bench-step: install
	$(BIN)/python benchmarks/step.py --repeats 3

## gpu-check: full-size SD3.5-Medium and FLUX.1-dev DanceOPD steps beside the memory plan (< 8 minutes on one GPU;
## runs on a bare CUDA machine: no install, no Ray; diffusers and pydantic come from .gpu-wheels, see gpu-wheels)
gpu-check:
	bash scripts/gpu_check.sh

## gpu-wheels: the wheels the GPU check needs beyond torch/transformers/peft (CPython 3.12, manylinux x86_64), at the
## versions this venv resolved, into .gpu-wheels/ (ignored; sent with the tree)
GPU_PACKAGES := diffusers pydantic pydantic-core annotated-types typing-inspection
gpu-wheels: install
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
	  -d .gpu-wheels $$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(p + '==' + m.version(p) for p in '$(GPU_PACKAGES)'.split()))")
	@du -sh .gpu-wheels

## deploy-files: regenerate what deploy/ derives from configs and the metrics contract (tests check they are current)
deploy-files: install
	$(BIN)/danceopd serve-config configs/teachers.yaml > deploy/serve-teachers.yaml
	$(BIN)/python deploy/grafana/generate.py
	$(BIN)/python deploy/kuberay/generate.py

clean:
	rm -rf runs site .pytest_cache benchmarks/results/*.tmp
