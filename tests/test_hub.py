"""Models named by hub id, resolved from an offline Hugging Face cache of tiny models under the real names: one family
rule for the student and every teacher, the offline checks read from the cache, config overlays, what validation
catches before a cluster would, the plan without data, and a student that starts from an existing LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from danceopd.config import ConfigError, load_config
from trainer.job import load_job_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A tiny hub of the SD3.5-Medium and FLUX.1 Kontext recipes' hub ids."""
    from danceopd.prefetch import settings_of, sources_in
    from danceopd.testing.tiny_hub import build_tiny_hub

    out = tmp_path_factory.mktemp("hf")
    sources = [s for r in ("sd35-medium-lora", "flux-kontext-lora") for s in sources_in(settings_of(ROOT / "configs" / f"{r}.yaml"))]
    build_tiny_hub(sources, out, say=lambda m: None)
    return out


@pytest.fixture
def cached(home, monkeypatch):
    """This process resolves hub ids from the tiny hub (danceopd.models.hub reads the environment at each call)."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def run_python(code: str, home: Path, *args: str) -> dict:
    """`code` in a fresh interpreter that sees the tiny hub as its Hugging Face cache (offline); its last line is JSON."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- the family rule
def test_a_teacher_on_the_students_hub_base_gets_the_students_family_in_the_jobs_teachers():
    """Before: the job's teachers config carried family None for a teacher inheriting the student's hub-id base (every GPU
    recipe), and each Serve replica stopped with "is a hub id: set the teacher's family". One rule now decides it, and the
    job writes it into every model teacher's spec. No cache needed: the recipe gives student.family."""
    for recipe, route, family in (("flux-kontext-lora", "edit", "flux-kontext"), ("sd35-medium-lora", "text", "sd3"),
                                  ("qwen-image-edit-lora", "local_edit", "qwen-image-edit-plus"), ("flux-kontext-lora", "t2i", "flux")):
        job = load_job_config(ROOT / "configs" / f"{recipe}.yaml")
        assert job.teacher_family(route).name == family
        t = job.teachers_config().teacher(route)
        field = t.field if t.field.kind != "cfg" else job.teachers_config().teacher(t.field.base).field
        assert field.family == family, (recipe, route)


def test_the_family_is_read_through_the_cache_and_refused_naming_the_key_when_it_cannot_be(cached, monkeypatch):
    base = {"student.base": "black-forest-labs/FLUX.1-Kontext-dev", "student.lora.rank": 4, "device": "cpu", "student.resolution": 64,
            "routes": {"t2i": {"capability": "t2i", "teacher": {"base": "black-forest-labs/FLUX.1-dev"}}}}
    cfg = load_config(None, base)  # no family key anywhere: both from their cached model_index.json
    assert cfg.student.model_family.name == "flux-kontext" and cfg.teacher_family("t2i").name == "flux"
    monkeypatch.setenv("HF_HOME", str(cached.parent / "empty"))  # the same config on a machine without the cache
    with pytest.raises(ConfigError, match=r"base black-forest-labs/FLUX.1-Kontext-dev .* is not on this machine.*danceopd prefetch.*student.family"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"routes.t2i.teacher.family: the base black-forest-labs/FLUX.1-dev .*danceopd prefetch"):
        load_config(None, {**base, "student.family": "flux-kontext"})


def test_a_hub_id_base_loads_its_text_encoders_from_the_cache(home):
    """Before: load_text_encoders asked DiffusionPipeline.load_config(hub_id, subfolder="transformer") for
    transformer/model_index.json and stopped every precompute run of a hub-id recipe."""
    out = run_python("""
import json, torch
from danceopd.models import get_family
pipe = get_family("sd3").load_text_encoders("stabilityai/stable-diffusion-3.5-medium", torch.device("cpu"), torch.float32)
embeds = get_family("sd3").encode_prompts(pipe, ["a red circle"], 32)
print(json.dumps({"t5": type(pipe.text_encoder_3).__name__, "shapes": [list(e.shape) for e in embeds],
                  "meta": pipe.transformer.device.type}))
""", home)
    assert out["t5"] == "T5EncoderModel" and out["meta"] == "meta" and out["shapes"] == [[1, 77 + 32, 64], [1, 64]]


def test_the_stand_in_processors_load_after_one_import(home):
    """FLUX.2 [dev]'s and Qwen-Image-Edit's processor classes (no torchvision here) are production code that
    `import danceopd.models` registers: a diffusers user loads such a pipeline after that one import."""
    from danceopd.testing.tiny import build_tiny_pipeline

    flux2 = build_tiny_pipeline("flux2", home / "local-flux2", seed=0, sample_size=64)
    out = run_python("""
import json, sys
import danceopd.models
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="np").images
print(json.dumps({"tokenizer": type(pipe.tokenizer).__name__, "shape": list(image.shape)}))
""", home, str(flux2))
    assert out == {"tokenizer": "TextOnlyPixtralProcessor", "shape": [1, 64, 64, 3]}
    proc = subprocess.run([sys.executable, "-c", f"from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained({str(flux2)!r})"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "danceopd.models.processors" in proc.stderr  # without the import: not found


# --------------------------------------------------------------------------------------------------- overlays
def test_later_config_files_override_earlier_ones_key_by_key(tmp_path):
    from danceopd.config import overlay

    assert overlay({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "d": None}) == {"a": {"b": 1, "c": [3]}, "d": None}
    job = load_job_config([ROOT / "configs/sd35-medium-lora.yaml", ROOT / "configs/smoke.yaml"], {"steps": 3})
    assert (job.device, job.student.resolution, job.student.lora.rank, job.steps) == ("cpu", 64, 4, 3)
    assert job.student.base == "stabilityai/stable-diffusion-3.5-medium" and job.student.gradient_checkpointing  # the recipe's
    assert job.cluster.gpus_per_worker == 0 and job.services.teacher_defaults.ray_actor_options.num_gpus == 0
    assert job.output_dir == Path("/shared/danceopd/runs")  # the overlay never moves a run
    # the overlay changes sizes, devices and services only: never a route, a teacher, the method, the learning rate or output_dir
    from danceopd.config import flatten, read_yaml_mapping

    sizes = {"device", "dtype", "steps", "log_every", "checkpoint_every", "torch_threads", "student.resolution", "student.lora.rank",
             "student.lora.alpha", "method.rollout_steps", "optim.batch_size", "optim.grad_accum", "eval.sampling_steps",
             "eval.samples_per_condition_in_grid", "eval.velocity_error_samples", "data.buckets"}
    assert all(k in sizes or k.startswith(("cluster.", "services.")) for k in flatten(read_yaml_mapping(ROOT / "configs/smoke.yaml")))
    proc = subprocess.run([sys.executable, "-m", "danceopd_cli", "plan", "--config", "configs/sd35-medium-lora.yaml", "--config",
                           "configs/smoke.yaml", "--json", str(tmp_path / "p.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "p.json").read_text())["roles"]["train_worker"]["gpus"] == 0.0  # the overlay's CPU workers


# --------------------------------------------------------------------------------------------------- validation
def test_validation_refuses_what_would_fail_on_a_cluster_naming_the_key(cached):
    """Caught before anything deploys: a CUDA role with no GPU in its Ray resources, a path that is neither here nor a hub
    id, a LoRA whose keys match no module of a hub-id base (read from the cache)."""
    recipe = ROOT / "configs/sd35-medium-lora.yaml"
    from danceopd.testing.tiny_hub import write_lora, write_pipeline

    kontext, _ = write_pipeline(cached, "black-forest-labs/FLUX.1-Kontext-dev")
    write_lora(cached, "your-org/not-for-sd3", kontext, "black-forest-labs/FLUX.1-Kontext-dev")  # a FLUX LoRA, in the cache
    cases = [
        ({"cluster.gpus_per_worker": 0}, ["cluster.gpus_per_worker is 0 but device is 'cuda'", "set cluster.gpus_per_worker"]),
        ({"services.teacher_defaults.ray_actor_options": {"num_cpus": 4}},
         ["services.teacher_defaults.ray_actor_options.num_gpus: the teacher of route 'text' runs on 'cuda'", "reserve no GPU"]),
        ({"services.teachers": {"cfg": {"device": "cuda", "ray_actor_options": {"num_gpus": 0}}}},
         ["services.teachers.cfg.ray_actor_options.num_gpus"]),
        ({"routes.text.teacher.loras": [{"path": "loras/x.safetensors"}]},
         ["routes.text.teacher.loras.0:", "LoRA 'loras/x.safetensors' is not a local path", "and not a hub id (ORG/NAME)"]),
        ({"routes.text.teacher.loras": [{"path": "your-org/not-for-sd3"}]},
         ["routes.text.teacher.loras.0:", "modules named by the LoRA your-org/not-for-sd3", "exist in the transformer of "
          "stabilityai/stable-diffusion-3.5-medium", "is the adapter for another model?"]),
    ]
    for over, parts in cases:
        with pytest.raises(ConfigError) as e:
            load_job_config(recipe, over)
        assert all(p in str(e.value) for p in parts), str(e.value)


# --------------------------------------------------------------------------------------------------- the plan
def test_plan_needs_only_the_models_and_says_what_it_did_not_check(tmp_path):
    """`danceopd plan` on a machine with the recipe but not its data or LoRA files: the same figures as with them (square
    data), each missing file named; with data.buckets: auto and no data, the largest bucket, said so."""
    bare = tmp_path / "head-node"
    (bare / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs/flux-kontext-lora.yaml", bare / "configs")
    (bare / "configs/loras.yaml").write_text("routes: {t2i: {teacher: {loras: [{path: ./loras/t2i.safetensors}]}}}\n")

    def plan(cwd: Path, *configs: str) -> tuple[dict, str]:
        args = [a for c in configs for a in ("--config", c)]
        proc = subprocess.run([sys.executable, "-m", "danceopd_cli", "plan", *args, "--gpu-memory", "80", "--json", str(tmp_path / "p.json")],
                              cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads((tmp_path / "p.json").read_text()), proc.stdout

    (bare / "configs/out.yaml").write_text(f"output_dir: {tmp_path / 'a-file' / 'runs'}\n")
    full, _ = plan(ROOT, "configs/flux-kontext-lora.yaml")
    alone, text = plan(bare, "configs/flux-kontext-lora.yaml", "configs/loras.yaml")
    assert {r: v["total_gib"] for r, v in alone["roles"].items()} == {r: v["total_gib"] for r, v in full["roles"].items()}
    assert alone["text_embeddings"] == full["text_embeddings"] == "precompute"
    assert "not checked: data.manifest" in text and "not checked: LoRA" in text and "loras/t2i.safetensors" in text
    # the Kontext edit route's source tokens are counted (its data rows, or without them its teacher and student): the
    # edit teacher's queries hold twice the image tokens of the FLUX.1-dev T2I teacher's
    assert full["roles"]["teacher:edit"]["parts"]["query activations"] > full["roles"]["teacher:t2i"]["parts"]["query activations"]
    # a recipe's output_dir that this machine cannot write (a cluster path on a laptop): the image-size index is a cache,
    # not kept then (before: the plan of a recipe with images stopped with NotADirectoryError / PermissionError)
    (tmp_path / "a-file").write_text("")
    unwritable, _ = plan(ROOT, "configs/flux-kontext-lora.yaml", str(bare / "configs/out.yaml"))  # written below
    assert unwritable == full
    (bare / "configs/auto.yaml").write_text("data: {buckets: auto}\n")
    buckets, text = plan(bare, "configs/flux-kontext-lora.yaml", "configs/auto.yaml")
    assert "planned for the largest bucket" in text and buckets["roles"]["train_worker"]["total_gib"] > full["roles"]["train_worker"]["total_gib"]


# --------------------------------------------------------------------------------------------------- lora.init
def test_a_student_starts_from_an_existing_lora_as_diffusers_loads_it(cached, tmp_path):
    """student.lora.init (a diffusers file, a kohya / ComfyUI file): rank, alpha and targets come from the file, a
    student.lora that says otherwise is refused naming both, and the student's first velocity equals the base with that LoRA
    loaded by diffusers (pipe.load_lora_weights), to 1e-5."""
    from recipe_files import UNFUSED_FLUX, flux_lora_state, save_diffusers_lora, save_kohya_flux_lora

    from danceopd.testing.tiny_hub import snapshot_dir

    kontext = snapshot_dir(cached, "black-forest-labs/FLUX.1-Kontext-dev")
    files = {"diffusers": save_diffusers_lora(flux_lora_state(kontext, 6, seed=3), tmp_path / "d.safetensors"),
             "kohya": save_kohya_flux_lora(flux_lora_state(kontext, 4, seed=4, targets=UNFUSED_FLUX), tmp_path / "k.safetensors", 2.0)}
    base = {"student.base": "black-forest-labs/FLUX.1-Kontext-dev", "device": "cpu", "student.resolution": 64,
            "routes": {"t2i": {"capability": "t2i", "teacher": {}}}}
    d = load_config(None, {**base, "student.lora.init": str(files["diffusers"])}).student.lora
    k = load_config(None, {**base, "student.lora.init": str(files["kohya"])}).student.lora
    assert (d.rank, d.alpha, len(d.target_modules)) == (6, 6.0, len(flux_lora_state(kontext, 6, seed=3)) // 2)
    # diffusers' kohya converter bakes the file's alpha / rank (2 / 4) into the weights: alpha = rank after it, the same update
    assert (k.rank, k.alpha) == (4, 4.0) and all(m.endswith(UNFUSED_FLUX) for m in k.target_modules)
    with pytest.raises(ConfigError, match=r"lora.rank is 16 but the adapter student.lora.init \(.*d.safetensors\) has 6"):
        load_config(None, {**base, "student.lora.init": str(files["diffusers"]), "student.lora.rank": 16})
    out = run_python("""
import json, sys, torch
from diffusers import FluxKontextPipeline
from danceopd.config import load_config
from danceopd.fields.base import Conditions
from danceopd.fields.model_field import ModelField
from danceopd.models import get_family
from danceopd.student import build_student
family, errors = get_family("flux-kontext"), {}
for name, file in json.loads(sys.argv[1]).items():
    cfg = load_config(None, {"student.base": "black-forest-labs/FLUX.1-Kontext-dev", "device": "cpu", "student.resolution": 64,
                             "routes": {"t2i": {"capability": "t2i", "teacher": {}}}, "student.lora.init": file})
    student = build_student(cfg.student, device="cpu", dtype="float32")
    pipe = FluxKontextPipeline.from_pretrained("black-forest-labs/FLUX.1-Kontext-dev")
    pipe.load_lora_weights(file)
    ref = ModelField("ref", "diffusers", family, pipe, pipe.transformer, student.field.info.sample_shape, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *student.field.info.sample_shape, generator=g)
    sigma, cond = torch.tensor([0.7, 0.3]), Conditions(prompts=["a red circle", "a cat"])
    with torch.no_grad():
        a, b = student.field.velocity(x, sigma, cond), ref.velocity(x, sigma, cond)
        base = ModelField("b", "diffusers", family, pipe, pipe.transformer, student.field.info.sample_shape, torch.device("cpu"), torch.float32)
        pipe.disable_lora()
        c = base.velocity(x, sigma, cond)
    trainable = sum(p.numel() for p in student.trainable_parameters())
    errors[name] = {"vs_diffusers": (a - b).abs().max().item(), "lora_effect": (b - c).abs().max().item(), "trainable": trainable}
print(json.dumps(errors))
""", cached, json.dumps({k: str(v) for k, v in files.items()}))
    for name, r in out.items():
        assert r["vs_diffusers"] < 1e-5 and r["lora_effect"] > 1e-3 and r["trainable"] > 0, (name, r)
