"""Velocity fields: the diffusers model field (cross-checked against the diffusers pipeline), the student,
operator fields."""

import pytest
import torch

from danceopd.fields.base import Conditions
from danceopd.teacher_model import load_model_field
from danceopd.fields.operators import CFGField
from danceopd.flow import rollout_states, sd3_sigmas
from danceopd.student import StudentConfig, build_student, load_student


@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3_path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("steps", [4, 12])
def test_rollout_over_model_field_reproduces_diffusers_pipeline(tiny_sd3_path, sd3_pipe, guidance, steps):
    prompts = ["a red circle", "a blue square left of a green triangle", "x"]
    latents = sd3_pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    field = load_model_field(tiny_sd3_path, device="cpu", dtype="float32")
    if guidance > 1.0:
        field = CFGField(field, guidance)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(prompts)), noise, sd3_sigmas(steps, 3.0)).final
    rel = ((ours - latents).norm() / latents.norm()).item()
    assert rel < 1e-4, rel


def test_model_field_caches_prompt_embeddings(tiny_sd3_path):
    field = load_model_field(tiny_sd3_path, device="cpu", dtype="float32")
    calls = []
    inner = field.prompts.encode
    field.prompts.encode = lambda prompts: (calls.append(list(prompts)), inner(prompts))[1]
    x, s = torch.randn(1, 4, 8, 8).expand(4, -1, -1, -1).clone(), torch.full((4,), 0.5)
    v1 = field.velocity(x, s, Conditions(["a", "b", "a", ""]))
    v2 = field.velocity(x, s, Conditions(["a", "b", "a", ""]))
    assert calls == [["a"], ["b"], [""]]  # each distinct prompt once, alone (its embedding never depends on a batch)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(v1[0], v1[2])
    field.prompts.max_entries = 2  # bounded: the least recently used prompt is evicted, and re-encoded when asked again
    field.velocity(x[:1], s[:1], Conditions(["c"]))
    assert list(field.prompts.entries) == ["", "c"]
    field.velocity(x[:1], s[:1], Conditions(["a"]))
    assert calls[-1] == ["a"] and len(field.prompts.entries) == 2


def test_model_field_runs_in_bfloat16(tiny_sd3_path):
    f32 = load_model_field(tiny_sd3_path, device="cpu", dtype="float32")
    bf16 = load_model_field(tiny_sd3_path, device="cpu", dtype="bfloat16")
    assert bf16.transformer.dtype == torch.bfloat16
    x, s, c = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9]), Conditions(["a red circle", ""])
    v32, v16 = f32.velocity(x, s, c), bf16.velocity(x, s, c)
    assert v16.dtype == torch.float32  # returned in the caller's dtype
    assert ((v16 - v32).norm() / v32.norm()) < 0.05


def test_load_model_field_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_field(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        load_model_field(tmp_path / "empty")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model_field(tmp_path / "empty", device="cuda")


def test_student_save_load_roundtrip_and_source_conditioning(tmp_path):
    st = build_student(StudentConfig(num_layers=2, seed=3))
    x, s = torch.randn(4, 3, 16, 16), torch.rand(4)
    src = torch.rand(4, 3, 16, 16) * 2 - 1
    c = Conditions(["a red circle", "make the circle blue", "", "invert"], src)
    with torch.no_grad():
        v = st.field.velocity(x, s, c)
        v_nosrc = st.field.velocity(x, s, Conditions(c.prompts))
        v_other_prompt = st.field.velocity(x, s, Conditions(["a blue square"] * 4, src))
    assert not torch.allclose(v, v_nosrc) and not torch.allclose(v, v_other_prompt)
    st.save_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "transformer" / "config.json").exists()
    assert (tmp_path / "student" / "tokenizer" / "tokenizer.json").exists()
    again = load_student(tmp_path / "student", device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(again.field.velocity(x, s, c), v, rtol=0, atol=0)
    via_loader = load_model_field(tmp_path / "student", device="cpu", dtype="float32")
    assert via_loader.info.takes_source and not via_loader.info.requires_source


def test_student_builds_reproducibly_from_its_seed():
    a = build_student(StudentConfig(num_layers=1, seed=5)).transformer.state_dict()
    b = build_student(StudentConfig(num_layers=1, seed=5)).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cfg_field_is_one_batched_call_over_the_base(basic_suite):
    base = basic_suite.field("t2i")
    cfg = CFGField(base, 3.0)
    x, s = torch.randn(3, 3, 16, 16), torch.tensor([0.2, 0.5, 0.8])
    c = Conditions(["a red circle", "a green square", "a blue triangle"])
    expected = base.velocity(x, s, Conditions([""] * 3)) + 3.0 * (base.velocity(x, s, c) - base.velocity(x, s, Conditions([""] * 3)))
    torch.testing.assert_close(cfg.velocity(x, s, c), expected)
    assert cfg.info.guidance == 3.0 and cfg.info.kind == "cfg"


@pytest.mark.cuda
def test_student_on_cuda_matches_cpu_and_runs_bf16():
    cpu = build_student(StudentConfig(num_layers=2, seed=1), device="cpu", dtype="float32")
    gpu = build_student(StudentConfig(num_layers=2, seed=1), device="cuda", dtype="float32")
    bf = build_student(StudentConfig(num_layers=2, seed=1), device="cuda", dtype="bfloat16")
    x, s = torch.randn(8, 3, 16, 16), torch.rand(8)
    c = Conditions(["a red circle"] * 4 + ["make the circle blue"] * 4, torch.rand(8, 3, 16, 16))
    with torch.no_grad():
        v_cpu = cpu.field.velocity(x, s, c)
        v_gpu = gpu.field.velocity(x.cuda(), s.cuda(), c.to("cuda"))
        v_bf = bf.field.velocity(x.cuda(), s.cuda(), c.to("cuda"))
    assert v_gpu.device.type == "cuda" and v_bf.dtype == torch.float32
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-3, atol=1e-3)
    assert ((v_bf.cpu() - v_cpu).norm() / v_cpu.norm()) < 0.05


@pytest.mark.cuda
def test_exact_fields_and_model_field_on_cuda(basic_suite, tiny_sd3_path):
    x, s = torch.randn(6, 3, 16, 16), torch.rand(6) * 0.9 + 0.05
    for cap in ("t2i", "local_edit", "global_edit"):
        c = basic_suite.bucket(cap).sample(6, 0)
        v_cpu = basic_suite.field(cap).velocity(x, s, c)
        v_gpu = basic_suite.field(cap).velocity(x.cuda(), s.cuda(), c.to("cuda"))
        torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-4, atol=1e-4)
    f = load_model_field(tiny_sd3_path, device="cuda", dtype="auto")
    assert f.device.type == "cuda"
    v = f.velocity(torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([0.5, 0.5], device="cuda"), Conditions(["a", ""]))
    assert v.device.type == "cuda" and torch.isfinite(v).all()


@pytest.mark.cuda
def test_reference_trainer_steps_on_cuda(tmp_path):
    from danceopd.config import load_config
    from trainer.reference import ReferenceTrainer

    cfg = load_config(None, {"device": "cuda", "output_dir": str(tmp_path), "steps": 3, "optim.batch_size": 8, "checkpoint_every": 3})
    tr = ReferenceTrainer(cfg, log=lambda m: None)
    tr.fit()
    assert next(tr.student.transformer.parameters()).device.type == "cuda"
    assert tr.resume() and tr.step == 3
