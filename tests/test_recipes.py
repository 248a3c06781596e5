"""Every shipped recipe as users run it: models named by hub id and resolved from an offline Hugging Face cache of tiny
models under the real names (`danceopd tiny-hub`), the smoke overlay (configs/smoke.yaml: sizes, devices, services),
and the command lines the documentation prints, read from the files themselves:

- the `ray job submit` line in each recipe's header comment and in docs/cluster.md's GPU-cluster section, and the
  KubeRay RayJob's entrypoint (deploy/kuberay/rayjob-train.yaml), submitted to a local `ray start` cluster with
  `--config configs/smoke.yaml` after the recipe and an output_dir of the test's own;
- before each, `danceopd prefetch` (ready from the cache) and `danceopd plan` of the recipe;
- after all, each student loaded the way a diffusers user loads it, `Pipeline.from_pretrained(<hub id>)` then
  `load_lora_weights(<student>)`, and made to generate.

`make test-recipes` runs all of it (about 2 minutes a recipe on 2 cores); `make test` runs one recipe with
`danceopd train` (test_a_recipe_trains_from_hub_ids_with_danceopd_train). The runs happen in a copy of the repository's
tracked files (a user's clone), where the your-loras recipe's local files are made at the paths it names.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import RayHead

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("sd35-medium-lora", "gpu-cluster", "flux-kontext-lora", "flux2-klein-from-dev", "qwen-image-edit-lora", "z-image-lora",
           "your-loras")
SMOKE = "configs/smoke.yaml"
IN_MAKE_TEST = "flux-kontext-lora"  # `make test` trains this one from hub ids (with `danceopd train`)
SUMMARY = ROOT / "runs" / "test-recipes.json"  # per recipe: what ran and how long (docs/real-models.md's table)


# ----------------------------------------------------------------------------------------------- the documented lines
@dataclass
class DocumentedJob:
    source: str  # where the line is written
    line: str  # the shell line that submits it (the RayJob's: as KubeRay's submitter writes it)
    commands: list[list[str]]  # what the job runs: its entrypoint's commands (`bash -c '... && ...'` opened up)
    env: dict = field(default_factory=dict)  # the job's runtime env_vars (the RayJob's runtimeEnvYAML)

    @property
    def config(self) -> str:
        return [c[i + 1] for c in self.commands for i, t in enumerate(c) if t == "--config"][-1]

    def key(self) -> tuple:
        """What the job runs, output_dir aside (every run gets one of the test's own)."""
        return tuple(tuple(t for t in c if not t.startswith("output_dir=")) for c in self.commands)


def _joined(lines: list[str], start: int) -> str:
    """A shell command from `start` on, continuation lines (ending in a backslash) joined."""
    out = ""
    for line in lines[start:]:
        out += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(out.split())


def entrypoint_commands(tokens: list[str]) -> list[list[str]]:
    """The commands an entrypoint runs: itself, or the `&&`-joined ones of a `bash -c` / `sh -c` script."""
    if tokens[:2] in (["bash", "-c"], ["sh", "-c"]) and len(tokens) == 3:
        return [shlex.split(part) for part in tokens[2].split("&&")]
    if "&&" in tokens:
        raise AssertionError(f"a bare && in a shell line ends the submission, and what follows runs outside the job: {tokens}")
    return [tokens]


def _job(line: str, source: str, env: dict | None = None) -> DocumentedJob:
    tokens = shlex.split(line)
    return DocumentedJob(source, line, entrypoint_commands(tokens[tokens.index("--") + 1:]), env or {})


SUBMIT = re.compile(r"^([A-Z_][A-Z0-9_]*=\S*\s+)*ray job submit\s")  # a command line, not prose that names it


def documented_jobs() -> list[DocumentedJob]:
    """Every `ray job submit` line the recipes' headers and docs/cluster.md's GPU-cluster section print, and the RayJob's
    entrypoint as KubeRay submits it (`ray job submit --address A --runtime-env-json J -- <entrypoint>`, a shell line)."""
    jobs = []
    for recipe in RECIPES:
        path = ROOT / "configs" / f"{recipe}.yaml"
        header = [ln.removeprefix("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        found = [i for i, ln in enumerate(header) if SUBMIT.match(ln)]
        assert found, f"{path}: its header comment names no `ray job submit` line"
        jobs += [_job(_joined(header, i), f"configs/{recipe}.yaml") for i in found]
    doc = (ROOT / "docs/cluster.md").read_text()
    lines = doc.split("## Running on a GPU cluster", 1)[1].split("\n## ", 1)[0].splitlines()
    found = [i for i, ln in enumerate(lines) if SUBMIT.match(ln.strip())]
    assert found, "docs/cluster.md's GPU-cluster section prints no `ray job submit` line"
    jobs += [_job(_joined(lines, i), "docs/cluster.md (Running on a GPU cluster)") for i in found]
    spec = yaml.safe_load((ROOT / "deploy/kuberay/rayjob-train.yaml").read_text())["spec"]
    env = (yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}).get("env_vars") or {}
    line = f"ray job submit --address http://<head>:8265 --runtime-env-json {shlex.quote(json.dumps({'env_vars': env}))} " \
           f"--working-dir . -- {spec['entrypoint'].strip()}"  # working_dir: the image's /app there, this clone here
    jobs.append(_job(line, "deploy/kuberay/rayjob-train.yaml (entrypoint, as KubeRay submits it)", env))
    return jobs


def localized(job: DocumentedJob, address: str, out: Path, redis_url: str) -> str:
    """The documented line for this machine: the local cluster's address, the smoke overlay after each recipe config, this
    test's output_dir (a recipe's own is a cluster path) and the tests' Redis for the RayJob's `redis://redis:...`."""
    line = re.sub(r"--address\s+\S+", f"--address {address}", job.line)
    line = re.sub(r"(--config\s+configs/[\w.-]+\.yaml)", rf"\1 --config {SMOKE}", line)
    line = re.sub(r"redis://redis:\d+/\d+", redis_url, line)
    if "output_dir=" in line:
        return re.sub(r"output_dir=[^\s'\"]+", f"output_dir={out}", line)
    return f"{line} output_dir={out}"


def runs_to_make(jobs: list[DocumentedJob]) -> dict[tuple, list[DocumentedJob]]:
    """Distinct jobs to run, each with the documented jobs it stands for: a job whose commands are those of another job
    with more commands (the RayJob's prefetch && train covers the same train line elsewhere) runs as part of that one."""
    keys = {j.key() for j in jobs}
    runs: dict[tuple, list[DocumentedJob]] = {}
    for job in jobs:
        k = job.key()
        wider = [o for o in keys if o != k and all(c in o for c in k)]
        runs.setdefault(max(wider, key=len) if wider else k, []).append(job)
    return runs


def test_the_documented_lines_are_read_from_the_files():
    """The generated test's input: every recipe's header line, the cluster guide's GPU line and the RayJob, each training a
    recipe with --eval; the header lines submit with token authentication, as a `ray start --head` cluster requires; the
    RayJob's two commands both run inside the job (one `bash -c`, not a bare `&&` that KubeRay's shell line would split)."""
    jobs = documented_jobs()
    assert {j.config for j in jobs} == {f"configs/{r}.yaml" for r in RECIPES}
    for job in jobs:
        assert job.commands[-1][:3] == ["python", "-m", "trainer.main"] and "--eval" in job.commands[-1], job
        assert re.search(r"--working-dir \.( |$)", job.line), job
        assert job.line.startswith("RAY_AUTH_MODE=token ") or not job.source.startswith("configs/"), job
    rayjob = next(j for j in jobs if j.source.startswith("deploy/"))
    assert [c[:2] for c in rayjob.commands] == [["danceopd", "prefetch"], ["python", "-m"]]
    assert len(runs_to_make(jobs)) == len(RECIPES)  # the GPU-cluster lines of the header and the guide run in the RayJob's
    with pytest.raises(AssertionError, match="a bare &&"):  # what the RayJob's entrypoint was before
        _job("ray job submit --address A -- danceopd prefetch --config c.yaml && python -m trainer.main --config c.yaml", "old")


# ----------------------------------------------------------------------------------------------- the environment
def _env(hf_home: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The tiny hub of every recipe (the CLI, as the docs give it), and a copy of the repository (a user's clone) holding the
    your-loras recipe's local files."""
    home = tmp_path_factory.mktemp("hf")
    env = _env(home)
    configs = [a for r in RECIPES for a in ("--config", f"configs/{r}.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "danceopd_cli", "tiny-hub", *configs, "--out", str(home)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub_seconds = time.perf_counter() - t0
    project = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # what a clone holds (and what is about to be committed)
    for f in files:
        (project / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, project / f)
    from danceopd.testing.tiny_hub import snapshot_dir
    from recipe_files import make_your_loras_files

    make_your_loras_files(project, snapshot_dir(home, "black-forest-labs/FLUX.1-dev"))
    return {"home": home, "env": env, "project": project, "tiny_hub_seconds": hub_seconds, "log": proc.stdout}


def test_tiny_hub_holds_every_hub_id_in_the_real_layout(hub, monkeypatch):
    """One tiny model per hub id the recipes name, in the cache layout; pipelines of the real class and components
    (SD3.5 with T5), Flow-GRPO's LoRAs as PEFT adapters (their real file name and config), placeholders as diffusers LoRAs."""
    from danceopd.models.hub import cached_snapshot, is_hub_id
    from danceopd.prefetch import settings_of, sources_in

    names = {s.source for r in RECIPES for s in sources_in(settings_of(ROOT / "configs" / f"{r}.yaml")) if is_hub_id(s.source)}
    assert len(names) >= 14
    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    folders = {n: cached_snapshot(n) for n in names}
    assert all(folders.values()), [n for n, f in folders.items() if f is None]
    sd35 = json.loads((folders["stabilityai/stable-diffusion-3.5-medium"] / "model_index.json").read_text())
    assert sd35["_class_name"] == "StableDiffusion3Pipeline" and sd35["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    flux2 = json.loads((folders["black-forest-labs/FLUX.2-dev"] / "model_index.json").read_text())
    assert flux2["tokenizer"] == ["danceopd.models.processors", "TextOnlyPixtralProcessor"]
    qwen = json.loads((folders["Qwen/Qwen-Image-Edit-2509"] / "model_index.json").read_text())
    assert qwen["_class_name"] == "QwenImageEditPlusPipeline" and qwen["processor"][1] == "ImageOnlyQwen2VLProcessor"
    grpo = folders["jieliu/SD3.5M-FlowGRPO-Text"]
    assert sorted(p.name for p in grpo.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((grpo / "adapter_config.json").read_text())["lora_alpha"] == 64
    assert (folders["your-org/z-image-geneval-lora"] / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def ray_head(hub, tmp_path_factory):
    """A local Ray cluster started the way the docs start one (`ray start --head`, token authentication on), its own
    process group and ports (conftest.RayHead), with the tiny hub as its cache."""
    head = RayHead(tmp_path_factory.mktemp("head"), hub["env"])
    if not head.wait():
        head.stop()
        pytest.fail(f"ray head did not come up: {head.log_file.read_text()[-2000:]}")
    yield {"address": head.address, "env": head.env}
    head.stop()


def _cli(args: list[str], hub, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "danceopd_cli", *args], cwd=hub["project"], env=hub["env"], capture_output=True,
                          text=True, timeout=timeout)


def prefetch_and_plan(config: str, hub) -> dict:
    """`danceopd prefetch` (every model ready from the cache) and `danceopd plan` of a recipe with the overlay."""
    t0 = time.perf_counter()
    proc = _cli(["prefetch", "--config", config, "--config", SMOKE], hub)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    n = len(re.findall(r"^  \S", proc.stdout, re.M))
    assert re.search(rf"^{n} of {n} models ready", proc.stdout, re.M), proc.stdout
    plan = _cli(["plan", "--config", config, "--config", SMOKE], hub)
    assert plan.returncode == 0 and plan.stdout.startswith("memory plan"), plan.stdout[-2000:] + plan.stderr[-3000:]
    return {"models": n, "prefetch_plan_s": round(time.perf_counter() - t0, 1)}


def check_run(run_dir: Path, output: str, recipe: str) -> dict:
    """What a finished smoke run must have: trained to the end, evaluated, exported."""
    assert "deployed teachers" in output and "trained to step 4" in output and "report:" in output, output[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["steps"] == report["training"]["steps_planned"] == 4
    for route, r in report["routes"].items():
        assert r["velocity_error"] >= 0, (recipe, route)
    if report["text_embeddings"]["mode"] == "precompute":
        assert "text embeddings:" in output
    student = run_dir / "student"
    assert (student / "pytorch_lora_weights.safetensors").is_file()
    if recipe == "your-loras":  # export_formats: [diffusers, comfyui]; eval.every: sample grids from step 0 on
        assert (student / "comfyui_lora.safetensors").is_file() and (run_dir / "samples" / "step-000000.png").is_file()
    return {"text_embeddings": report["text_embeddings"]["mode"], "routes": sorted(report["routes"])}


@pytest.mark.recipes
def test_every_documented_line_trains_its_recipe_from_hub_ids(hub, ray_head, redis_server, tmp_path):
    """Each distinct documented job, submitted as written (address: the local cluster; plus the smoke overlay and an
    output_dir), after prefetch and plan of its recipe; then every student loaded from its base's hub id in diffusers."""
    runs = runs_to_make(documented_jobs())
    summary = {"tiny_hub_s": round(hub["tiny_hub_seconds"], 1), "recipes": {}}
    students = {}
    for key, jobs in runs.items():
        job = next(j for j in jobs if j.key() == key)
        recipe = Path(job.config).stem
        row = prefetch_and_plan(job.config, hub)
        out = tmp_path / recipe
        line = localized(job, ray_head["address"], out, redis_server.url)
        subprocess.run(["serve", "shutdown", "-y", "--address", ray_head["address"]], env=ray_head["env"], capture_output=True,
                       timeout=120)
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", line], cwd=hub["project"], env=ray_head["env"], capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, f"{job.source}: {line}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
        assert re.search(r"Job 'raysubmit_\w+' succeeded", proc.stdout + proc.stderr), proc.stdout[-2000:]
        if "DANCEOPD_REDIS_URL" in job.env:  # the RayJob's runtime env reached the job's driver: the training ran in the job
            assert "deployed router (store: redis)" in proc.stdout, proc.stdout[-3000:]
        config = yaml.safe_load((hub["project"] / job.config).read_text())
        row.update(check_run(out / config["run_name"], proc.stdout, recipe), job_s=round(seconds, 1),
                   lines=[j.source for j in jobs], command=line)
        summary["recipes"][recipe] = row
        students[recipe] = {"base": config["student"]["base"], "student": str(out / config["run_name"] / "student")}
    loaded = load_students(students, hub)
    for recipe, result in loaded.items():
        summary["recipes"][recipe]["student_loads"] = result
        assert result["class"] == result["expected_class"] and result["adapters"] and result["finite"], (recipe, result)
    SUMMARY.parent.mkdir(exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=2))
    assert set(summary["recipes"]) == set(RECIPES)


LOAD = r'''
import json, sys, time
import numpy as np
import danceopd.models  # the tiny stand-ins' processor classes (danceopd.models.processors), as a diffusers user imports them
import diffusers
from PIL import Image
from danceopd.models import family_of_folder
from danceopd.testing.tiny_qwen import tiny_edit_image_area

out = {}
for recipe, s in json.loads(sys.argv[1]).items():
    t0 = time.perf_counter()
    expected = family_of_folder(s["base"]).pipeline_classes[0]
    pipe = getattr(diffusers, expected).from_pretrained(s["base"])   # the hub id, resolved from the cache
    pipe.load_lora_weights(s["student"])
    kwargs = dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="np")
    if "Edit" in expected or "Kontext" in expected:
        kwargs["image"] = Image.new("RGB", (64, 64), (200, 30, 30))
    if "Kontext" in expected:
        kwargs.update(max_area=64 * 64, _auto_resize=False)
    with tiny_edit_image_area(64 * 64):
        image = pipe(**kwargs).images
    out[recipe] = {"class": type(pipe).__name__, "expected_class": expected, "adapters": pipe.get_list_adapters(),
                   "finite": bool(np.isfinite(image).all()), "shape": list(image.shape), "seconds": round(time.perf_counter() - t0, 1)}
print(json.dumps(out))
'''


def load_students(students: dict, hub) -> dict:
    """Each student loaded as a diffusers user would: its base's pipeline class from the hub id, then load_lora_weights."""
    proc = subprocess.run([sys.executable, "-c", LOAD, json.dumps(students)], cwd=hub["project"], env=hub["env"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_recipe_trains_from_hub_ids_with_danceopd_train(hub, tmp_path):
    """`make test`'s hub-id run: prefetch, plan and `danceopd train --config RECIPE --config configs/smoke.yaml --no-resume
    --eval` (a local Ray of its own), then the student loaded from the base's hub id in diffusers."""
    config = f"configs/{IN_MAKE_TEST}.yaml"
    prefetch_and_plan(config, hub)
    out = tmp_path / "runs"
    proc = _cli(["train", "--config", config, "--config", SMOKE, "--no-resume", "--eval", f"output_dir={out}"], hub, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    settings = yaml.safe_load((hub["project"] / config).read_text())
    check_run(out / settings["run_name"], proc.stdout, IN_MAKE_TEST)
    loaded = load_students({IN_MAKE_TEST: {"base": settings["student"]["base"], "student": str(out / settings["run_name"] / "student")}}, hub)
    result = loaded[IN_MAKE_TEST]
    assert result["class"] == "FluxKontextPipeline" and result["adapters"] and result["finite"]
