"""The memory plan: `danceopd plan` on the shipped recipes (published configs, meta device), the job's refusal of a
role that cannot fit its GPU before anything loads, and the plan against what tiny pipelines really allocate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3


def run(*args, module="danceopd_cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_plan_of_the_kontext_recipe_at_80_gib(tmp_path):
    out = tmp_path / "plan.json"
    proc = run("plan", "--config", "configs/flux-kontext-lora.yaml", "--gpu-memory", "80", "--json", str(out),
               "student.text_embeddings=on_device")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert plan["gpu_memory_gib"] == 80 and plan["fits"] is True and plan["text_embeddings"] == "on_device"
    assert set(plan["roles"]) == {"train_worker", "teacher:t2i", "teacher:edit", "evaluation"}
    worker = plan["roles"]["train_worker"]
    # FLUX.1 [dev]/Kontext: the 11.90B transformer and the 4.76B T5-XXL encoder in bf16, built from published configs
    assert worker["parts"]["transformer (bfloat16)"] == pytest.approx(11.90e9 * 2 / GIB, rel=0.005)
    assert worker["parts"]["text_encoder_2 (bfloat16)"] == pytest.approx(4.762e9 * 2 / GIB, rel=0.005)
    # LoRA r128 on the default targets: 0.52B values, fp32 master + gradient (4 B each) and AdamW (8 B)
    assert worker["parts"]["trainable (fp32)"] == pytest.approx(worker["parts"]["gradients (fp32)"])
    assert worker["parts"]["adamw (fp32)"] == pytest.approx(2 * worker["parts"]["trainable (fp32)"], rel=1e-3)
    assert 0.50e9 * 4 / GIB < worker["parts"]["trainable (fp32)"] < 0.55e9 * 4 / GIB
    assert worker["total_gib"] == pytest.approx(sum(worker["parts"].values()), abs=0.01) and worker["total_gib"] < 80
    # each teacher: 4 workers x half the steps x 1 query, against 16 rollout + 3 + 1 (checkpointing) forwards
    for t in ("teacher:t2i", "teacher:edit"):
        assert plan["roles"][t]["busy_fraction"] == pytest.approx(4 * 0.5 / 20, rel=1e-3)
        assert "vae (bfloat16)" not in plan["roles"][t]["parts"]  # a teacher replica never holds the VAE
    assert "train_worker" in proc.stdout and "teacher:edit" in proc.stdout

    # the recipe's default (its prompts are a manifest): precompute. No worker or teacher holds CLIP or T5 or a prompt
    # cache on its GPU; one encoding task holds them, before training
    default = tmp_path / "default.json"
    assert run("plan", "--config", "configs/flux-kontext-lora.yaml", "--gpu-memory", "80", "--json", str(default)).returncode == 0
    pre = json.loads(default.read_text())
    assert pre["text_embeddings"] == "precompute" and set(pre["roles"]) == set(plan["roles"]) | {"text_encoding"}
    for role in ("train_worker", "teacher:t2i", "evaluation"):
        dropped = {k: v for k, v in plan["roles"][role]["parts"].items() if k not in pre["roles"][role]["parts"]}
        assert set(dropped) == {"text_encoder (bfloat16)", "text_encoder_2 (bfloat16)", "prompt cache"}, (role, dropped)
        assert pre["roles"][role]["total_gib"] == pytest.approx(plan["roles"][role]["total_gib"] - sum(dropped.values()), abs=0.01)
    assert 10.5 < plan["roles"]["train_worker"]["total_gib"] - pre["roles"]["train_worker"]["total_gib"] < 11.5  # T5 + CLIP + cache
    assert set(pre["roles"]["text_encoding"]["parts"]) >= {"text_encoder (bfloat16)", "text_encoder_2 (bfloat16)"}


def test_a_full_flux_student_is_refused_before_anything_loads_and_the_lora_recipe_is_not(tmp_path):
    full = run("--config", "configs/flux-kontext-lora.yaml", "student.adapter=full", "cluster.gpu_memory_gib=80",
               f"output_dir={tmp_path}", module="trainer.main")
    assert full.returncode == 2, full.stderr
    assert "train_worker needs" in full.stderr and "adamw (fp32)" in full.stderr and "80 GiB" in full.stderr
    assert "Traceback" not in full.stderr and not (tmp_path / "flux-kontext-lora").exists()  # nothing started
    lora = run("plan", "--config", "configs/sd35-medium-lora.yaml", "--gpu-memory", "80")
    assert lora.returncode == 0 and "DOES NOT FIT" not in lora.stdout, lora.stderr
    small = run("plan", "--config", "configs/sd35-medium-lora.yaml", "--gpu-memory", "6")  # 8.1 GiB without encoders
    assert small.returncode == 2 and "train_worker needs" in small.stderr


def test_the_check_warns_or_is_off_when_asked_and_an_unknown_model_is_named():
    from danceopd.config import ConfigError
    from trainer.job import check_memory, load_job_config

    job = load_job_config(ROOT / "configs/flux-kontext-lora.yaml", {"student.adapter": "full", "cluster.memory_check": "warn"})
    said = []
    plan = check_memory(job, 80, warn=said.append)
    assert plan is not None and not plan.fits and "train_worker needs" in said[0]
    off = load_job_config(ROOT / "configs/flux-kontext-lora.yaml", {"student.adapter": "full", "cluster.memory_check": "off"})
    assert check_memory(off, 80) is None
    unknown = load_job_config(ROOT / "configs/sd35-medium-lora.yaml", {"student.base": "someone/not-a-published-model"})
    with pytest.raises(ConfigError, match="someone/not-a-published-model.*danceopd prefetch"):
        check_memory(unknown, 80)
    import torch

    if not torch.cuda.is_available():  # no GPU size given and no GPU here: nothing to check against, nothing refused
        assert check_memory(unknown, None) is None


def test_the_plan_matches_what_tiny_pipelines_allocate(tmp_path):
    """Weights and optimizer state as planned on the meta device against the tensors a real load and step allocate
    (benchmarks/memory_plan.py --quick); activations are an estimate, bounded loosely here."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_plan as bench

    models = bench.build_models(tmp_path, quick=True)
    for name, path in models.items():
        r = bench.compare(name, str(path), 64, 2, False)
        for comp, v in r["components"].items():
            assert v["planned"] == pytest.approx(v["measured"], rel=0.02), (name, comp)
        for row in ("weights", "trainable + gradients + adamw"):
            assert abs(r["rows"][row]["error"]) < 0.02, (name, row, r["rows"][row])
        assert abs(r["rows"]["activations (training step)"]["error"]) < 0.6, (name, r["rows"])


def test_a_cfg_route_shares_the_adapter_bank_of_its_base():
    """services.shared_base on the SD3.5 recipe (two LoRA routes and a CFG route on one base): one teacher
    deployment holding the pipeline once, busy for all three routes (the CFG route's queries count twice)."""
    from danceopd.memory_plan import plan_job
    from trainer.job import load_job_config

    job = load_job_config(ROOT / "configs/sd35-medium-lora.yaml", {"services.shared_base": True})
    assert job.banks() == {"shared-text": ["text", "geneval", "cfg"]}
    bank = next(t for t in job.teachers_config().teachers if t.name == "shared-text").field
    assert bank.adapters["cfg"].cfg_alpha == 4.5 and bank.adapters["text"].cfg_alpha is None
    plan = plan_job(job, 80)
    teachers = [r for r in plan.roles if r.startswith("teacher:")]
    assert teachers == ["teacher:shared-text"]
    # 4 workers x (1/3 + 1/3 + 2 x 1/3) queries per step, against 16 rollout + 3 + 1 forwards
    assert plan.roles["teacher:shared-text"].busy_fraction == pytest.approx(4 * (4 / 3) / 20)
    # the recipe precomputes its prompts: the bank reads the store and holds no T5; on the device it holds one
    assert bank.text_embeddings == job.text_embeddings().store and "text_encoder_3 (bfloat16)" not in plan.roles["teacher:shared-text"].parts
    on_device = plan_job(load_job_config(ROOT / "configs/sd35-medium-lora.yaml", {"services.shared_base": True,
                                                                                  "student.text_embeddings": "on_device"}), 80)
    assert on_device.roles["teacher:shared-text"].parts["text_encoder_3 (bfloat16)"] == pytest.approx(4.762e9 * 2, rel=0.005)


def test_the_prompt_cache_keeps_compact_copies_not_views_of_its_encode_batch():
    import torch

    from danceopd.models.base import PromptCache

    cache = PromptCache(lambda prompts: (torch.randn(len(prompts), 333, 64), torch.randn(len(prompts), 32)), max_entries=8)
    embeds = cache([f"prompt {i}" for i in range(6)])
    for entry in cache.entries.values():  # each entry owns exactly its own bytes: the 6-prompt batch can be freed
        for t in entry:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert torch.equal(cache(["prompt 2"])[0][0], embeds[0][2])


def test_plans_of_the_2026_family_recipes_from_their_published_configs():
    """FLUX.2 [dev] teaching a [klein] 4B student, a Qwen-Image-Edit Plus student with Qwen-Image and edit teachers, and
    Z-Image: each built on the meta device from the published configs (danceopd.models.published), each role in bf16."""
    from danceopd.memory_plan import plan_job
    from trainer.job import load_job_config

    klein = plan_job(load_job_config(ROOT / "configs/flux2-klein-from-dev.yaml", {}), 80)
    assert klein.text_embeddings == "precompute" and klein.fits
    assert klein.roles["teacher:t2i"].parts["transformer (bfloat16)"] == pytest.approx(32.22e9 * 2, rel=0.005)  # bytes: [dev] 32.2B
    assert klein.roles["train_worker"].parts["transformer (bfloat16)"] == pytest.approx(3.876e9 * 2, rel=0.005)  # bytes: klein 3.9B
    assert klein.roles["text_encoding"].parts["text_encoder (bfloat16)"] == pytest.approx(24.01e9 * 2, rel=0.005)  # bytes: Mistral-3
    assert klein.roles["teacher:t2i_cfg"].parts["transformer (bfloat16)"] == klein.roles["train_worker"].parts["transformer (bfloat16)"]

    qwen = plan_job(load_job_config(ROOT / "configs/qwen-image-edit-lora.yaml", {}), 80)
    assert qwen.text_embeddings == "on_device" and qwen.fits  # the editors' encoder reads the source: no prompt-keyed store
    worker = qwen.roles["train_worker"].parts
    assert worker["transformer (bfloat16)"] == pytest.approx(20.43e9 * 2, rel=0.005)  # bytes
    assert worker["text_encoder (bfloat16)"] == pytest.approx(8.29e9 * 2, rel=0.005)  # bytes: Qwen2.5-VL 7B
    assert "vae (bfloat16)" in qwen.roles["teacher:local_edit"].parts and "vae (bfloat16)" not in qwen.roles["teacher:t2i"].parts

    zimage = plan_job(load_job_config(ROOT / "configs/z-image-lora.yaml", {}), 80)
    assert zimage.fits and zimage.roles["train_worker"].parts["transformer (bfloat16)"] == pytest.approx(6.155e9 * 2, rel=0.005)  # bytes


def test_the_plan_grows_with_the_states_each_sample_queries():
    """The student predicts, with grad, every queried state of its micro-batch in one call (K per sample, all N under
    the dense loss, twice under student CFG), and an unbatched teacher answers them in one call: the plan's
    activations and teacher busy fractions scale with them. At full size this is what decides whether a dense
    (DiffusionOPD-style) baseline fits an 80 GiB card."""
    from danceopd.memory_plan import plan_job
    from trainer.job import load_job_config

    sd35 = "configs/sd35-medium-lora.yaml"  # 16 rollout steps, gradient checkpointing, 1 sample per worker
    dense = {"method.query_position": "dense", "method.loss": "dense"}
    plans = {name: plan_job(load_job_config(ROOT / sd35, ov), 80) for name, ov in
             {"k1": {}, "k4": {"method.k": 4}, "dense": dense, "cfg2": {"method.student_cfg_scale": 2.0},
              "unbatched": {"services.teacher_defaults.batching.enabled": False, "method.k": 4},
              "unbatched_k1": {"services.teacher_defaults.batching.enabled": False},
              "unbatched_k16": {"services.teacher_defaults.batching.enabled": False, "method.k": 16}}.items()}
    act = {name: p.roles["train_worker"].parts["activations"] for name, p in plans.items()}
    assert act["k4"] == pytest.approx(4 * act["k1"], rel=1e-9) and act["dense"] == pytest.approx(16 * act["k1"], rel=1e-9)
    assert act["cfg2"] == pytest.approx(2 * act["k1"], rel=1e-9)
    busy = {name: p.roles["teacher:text"].busy_fraction for name, p in plans.items()}
    # forward-equivalents of a student step: 16 rollout + K x (3 + 1 recomputation); the teacher answers K states
    assert busy["k4"] / busy["k1"] == pytest.approx(4 * 20 / 32) and busy["dense"] / busy["k1"] == pytest.approx(16 * 20 / 80)
    assert busy["cfg2"] / busy["k1"] == pytest.approx(0.5)
    q = {name: plans[name].roles["teacher:text"].parts["query activations"] for name in ("unbatched", "unbatched_k1", "unbatched_k16", "k4")}
    assert q["unbatched"] == pytest.approx(4 * q["unbatched_k1"], rel=1e-9)  # one call of 1 sample x 4 states
    assert q["unbatched_k16"] == pytest.approx(8 * q["unbatched_k1"], rel=1e-9)  # 16 states: calls of max_batch_size 8
    assert q["k4"] == plans["k1"].roles["teacher:text"].parts["query activations"]  # batched: max_batch_size rows at most

    # FLUX.1 at 1024 px: the dense loss over 16 states does not fit an 80 GiB worker even with checkpointing; K = 1 does
    flux = {name: plan_job(load_job_config(ROOT / "configs/flux-kontext-lora.yaml", ov), 80) for name, ov in (("k1", {}), ("dense", dense))}
    assert flux["k1"].fits and not flux["dense"].fits
    assert flux["dense"].roles["train_worker"].largest()[0][0] == "activations"
    refused = run("--config", "configs/flux-kontext-lora.yaml", *[f"{k}={v}" for k, v in dense.items()], "cluster.gpu_memory_gib=80",
                  "output_dir=/nonexistent", module="trainer.main")
    assert refused.returncode == 2 and "train_worker needs 135.7 GiB" in refused.stderr, refused.stderr
    assert "query fewer than 16 states per sample (method.k" in refused.stderr and "optim.states_per_backward" in refused.stderr
    # ... unless the student predicts them a chunk at a time: one micro-batch's worth of states per backward costs the
    # activations of K = 1, and the job is planned to fit
    per_call = load_job_config(ROOT / "configs/flux-kontext-lora.yaml", {}).worker_batch_size
    chunked = plan_job(load_job_config(ROOT / "configs/flux-kontext-lora.yaml", {**dense, "optim.states_per_backward": per_call}), 80)
    assert chunked.fits and chunked.roles["train_worker"].parts["activations"] == flux["k1"].roles["train_worker"].parts["activations"]
