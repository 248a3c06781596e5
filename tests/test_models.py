"""Real model families on tiny random pipelines (built offline): the family code against the diffusers pipelines
themselves, LoRA students saved for `pipe.load_lora_weights`, LoRA / checkpoint teachers, fp32 master weights
under bf16, config errors before any model loads, and LoRA distillation on the reference trainer and on the
distributed job (T2I + Kontext-edit composition)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from danceopd.config import ConfigError, load_config
from danceopd.fields.base import Conditions
from danceopd.flow import rollout_states
from danceopd.models import get_family
from danceopd.models.flux import pack, unpack
from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline
from danceopd.routes import build_route_field
from danceopd.student import MODEL_STUDENT_KEYS, StudentConfig, build_student, load_student, read_student_config
from danceopd.teacher_model import LoraAdapterSpec, TeacherModelSpec, load_teacher_field

PROMPTS = ["a red circle", "a photo of an astronaut riding a horse"]
QWEN = ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus")
SOURCE_AS_TOKENS = ("flux-kontext", "flux2", "flux2-klein", "qwen-image-edit", "qwen-image-edit-plus")  # edit students


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny pipelines per family (flux and flux-kontext share their weights, as FLUX.1-dev and Kontext share an
    architecture) and random LoRA "capabilities" on them."""
    root = tmp_path_factory.mktemp("tiny-models")
    paths = {f: build_tiny_pipeline(f, root / f, seed=0) for f in ("sd3", "flux", "flux-kontext", "z-image")}
    for f in ("flux2-klein", "flux2"):  # edits need >= 64 px; one VAE (the same seed): a flux2 teacher can teach a klein student
        paths[f] = build_tiny_pipeline(f, root / f, seed=0, sample_size=64)
    for f in QWEN:  # one seed: the same VAE, text encoder and transformer in all three
        paths[f] = build_tiny_pipeline(f, root / f, seed=0)
    loras = {f: build_random_lora(paths[f], root / f"{f}-lora", rank=4, std=0.1, seed=1) for f in ("sd3", "flux", "z-image")}
    loras["flux-edit"] = build_random_lora(paths["flux-kontext"], root / "flux-edit-lora", rank=4, std=0.1, seed=2)
    return {"root": root, **paths, **{f"{k}-lora": v for k, v in loras.items()}}


def _pipe(path):
    from diffusers import DiffusionPipeline

    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if "sd3" in Path(path).name else {}
    return DiffusionPipeline.from_pretrained(path, **kwargs)


def test_flux_field_rollout_reproduces_the_flux_pipeline(tiny):
    """Packing, position ids, guidance embedding, timestep = sigma and the token-count shift, against FluxPipeline."""
    pipe = _pipe(tiny["flux"])
    latents = pipe(prompt=PROMPTS, num_inference_steps=6, guidance_scale=3.5, height=32, width=32,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    field = load_teacher_field(TeacherModelSpec(base=str(tiny["flux"]), guidance=3.5), "t", 32, dtype="float32", device="cpu")
    family = get_family("flux")
    sigmas = family.default_sigmas(field.pipe, 6, field.info.sample_shape)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS)), noise, sigmas).final
    rel = ((pack(ours) - latents).norm() / latents.norm()).item()
    assert rel < 1e-4, rel
    assert torch.equal(unpack(pack(ours), 16, 16), ours)


def test_z_image_field_rollout_reproduces_the_z_image_pipeline(tiny):
    """The chat-templated Qwen3 caption without its padding, list inputs, timestep 1 - sigma, the negated output and the
    linspace grid through the static shift, against ZImagePipeline (without CFG: guidance_scale 0)."""
    pipe = _pipe(tiny["z-image"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = pipe(prompt=list(PROMPTS), num_inference_steps=6, guidance_scale=0.0, height=32, width=32, latents=noise.clone(),
                   output_type="latent").images
    field = load_teacher_field(TeacherModelSpec(base=str(tiny["z-image"])), "t", 32, dtype="float32", device="cpu")
    sigmas = get_family("z-image").default_sigmas(field.pipe, 6, field.info.sample_shape)
    ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS)), noise, sigmas).final
    rel = ((ours - latents).norm() / latents.norm()).item()
    assert rel < 1e-4, rel
    # captions of different lengths: each prompt sees only its own tokens (a padded copy would change the answer)
    alone = field.velocity(noise[:1], sigmas[:1], Conditions(PROMPTS[:1]))
    assert torch.allclose(alone, field.velocity(noise, sigmas[:1].repeat(2), Conditions(PROMPTS))[:1], atol=1e-6)


@pytest.mark.parametrize("name", ["flux2-klein", "flux2"])
def test_flux2_field_rollout_reproduces_the_pipeline_with_and_without_a_reference_image(tiny, name):
    """The normalised 2x2-patchified latent space, 4-D position ids, the stacked text-encoder layers (Qwen3 for [klein],
    Mistral-3 with its system message for [dev]), timestep = sigma, [dev]'s guidance embedding, the empirical-mu grid, and
    an edit's reference tokens (ids t = 10), against Flux2KleinPipeline's / Flux2Pipeline's own __call__."""
    import numpy as np
    from PIL import Image

    from danceopd.models.flux2 import _bn, unpatchify

    guidance = 3.0 if name == "flux2" else 1.0  # [dev]: the embedded value; [klein]: 1.0 = no CFG pass
    pipe = _pipe(tiny[name])
    field = load_teacher_field(TeacherModelSpec(base=str(tiny[name]), max_sequence_length=160, guidance=guidance if name == "flux2" else None),
                               "t", 64, dtype="float32", device="cpu")
    family = get_family(name)
    assert field.info.sample_shape == (16, 16, 16) and field.info.takes_source  # 4 channels x 2x2 patches at 64 / 2 / 2
    sigmas = family.default_sigmas(field.pipe, 5, field.info.sample_shape)
    noise = torch.randn(2, *field.info.sample_shape, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    source = family.encode_images(pipe, pipe.image_processor.preprocess(image, height=64, width=64, resize_mode="crop"))
    for prompts, src, kwargs in ((PROMPTS, None, {}), (PROMPTS[:1], source, {"image": image})):
        n = len(prompts)
        theirs = pipe(prompt=list(prompts), height=64, width=64, num_inference_steps=5, guidance_scale=guidance, latents=noise[:n].clone(),
                      output_type="latent", max_sequence_length=160, **kwargs).images
        ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(prompts, src)), noise[:n], sigmas).final
        if name == "flux2-klein":  # Flux2KleinPipeline returns VAE latents
            mean, std = _bn(pipe.vae, ours)
            ours = unpatchify(ours * std + mean)
        else:  # Flux2Pipeline returns its packed tokens [B, h*w, C] of the normalised space
            ours = ours.flatten(2).transpose(1, 2)
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        assert rel < 1e-4, (src is not None, rel)
    # the family's decode undoes its encode (normalisation and patches) up to the VAE's own reconstruction
    assert family.decode_latents(pipe, source).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("name", QWEN)
def test_qwen_image_field_rollout_reproduces_the_pipelines_and_edit_embeddings_see_the_source(tiny, name):
    """Normalised 5-D latents without their frame axis, 2x2 packing, img_shapes, the chat template's dropped prefix,
    two prompts of different lengths padded with a mask, timestep = sigma and the exponential token-count shift with
    shift_terminal, against QwenImagePipeline; an edit's source tokens with their own img_shapes entry against the edit
    pipelines (given the family's prompt embedding: the one thing the field derives differently, from the source latent
    instead of the user's file). The edit embedding depends on the image: the cache keys on (prompt, source)."""
    import numpy as np
    from PIL import Image

    from danceopd.models.qwenimage import pack
    from danceopd.testing.tiny_qwen import tiny_edit_image_area

    pipe, family = _pipe(tiny[name]), get_family(name)
    field = load_teacher_field(TeacherModelSpec(base=str(tiny[name])), "t", 32, dtype="float32", device="cpu")
    assert field.info.sample_shape == (4, 16, 16) and field.info.takes_source == (name != "qwen-image")
    assert (field.pipe.vae is not None) == (name != "qwen-image")  # an edit teacher decodes the source for its encoder
    sigmas = family.default_sigmas(field.pipe, 5, field.info.sample_shape)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    if name == "qwen-image":
        theirs = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=5, latents=pack(noise), output_type="latent").images
        ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS)), noise, sigmas).final
        assert ((pack(ours) - theirs).norm() / theirs.norm()).item() < 1e-4
        return
    images = [Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")) for i in range(2)]
    with tiny_edit_image_area(32 * 32):  # the pipelines' VAE branch at 32 px, not ~1 MP
        src = torch.cat([family.encode_images(pipe, pipe.image_processor.preprocess(im, 32, 32)) for im in images])
        caption, _ = family.encode_prompts(pipe, PROMPTS[:1], 1024, source=src[:1])
        theirs = pipe(prompt_embeds=caption, image=[images[0]] if name.endswith("plus") else images[0], height=32, width=32,
                      num_inference_steps=5, latents=pack(noise[:1]), output_type="latent").images
        ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS[:1], src[:1])), noise[:1], sigmas).final
        assert ((pack(ours) - theirs).norm() / theirs.norm()).item() < 1e-4
        # the family's caption is the pipeline's own encode_prompt of the image it recovers from the source latent
        own, _ = pipe.encode_prompt(prompt=PROMPTS[:1], image=family.condition_image(pipe, src[:1]), device="cpu")
        assert torch.equal(own, caption)
    misses = field.prompts.misses
    a, b = (field.encode_prompts(["make it red"], s)[0] for s in (src[:1], src[1:]))
    assert (a - b).abs().max() > 1e-3 and field.prompts.misses == misses + 2  # one prompt, two images: two embeddings
    assert torch.equal(field.encode_prompts(["make it red"], src[:1])[0], a) and field.prompts.misses == misses + 2  # a hit
    both = field.encode_prompts(["make it red", "make it red"], src)[0]
    assert torch.equal(both[0, :a.shape[1]], a[0]) and torch.equal(both[1, :b.shape[1]], b[0])


def test_kontext_field_appends_source_tokens_as_the_kontext_pipeline_does(tiny):
    from PIL import Image

    pipe = _pipe(tiny["flux-kontext"])
    image = Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())
    latents = pipe(image=image, prompt=PROMPTS[:1], num_inference_steps=4, guidance_scale=2.5, height=32, width=32, max_area=32 * 32,
                   _auto_resize=False, generator=torch.Generator().manual_seed(0), output_type="latent").images
    field = load_teacher_field(TeacherModelSpec(base=str(tiny["flux-kontext"])), "edit", 32, dtype="float32", device="cpu")
    assert field.info.takes_source and field.pipe.vae is None  # a teacher replica holds no VAE: queries carry latents
    src = field.family.encode_images(pipe, pipe.image_processor.preprocess(image, 32, 32))
    sigmas = field.family.default_sigmas(field.pipe, 4, field.info.sample_shape)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS[:1], src)), noise, sigmas).final
    rel = ((pack(ours) - latents).norm() / latents.norm()).item()
    assert rel < 1e-4, rel
    no_source = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS[:1])), noise, sigmas).final
    assert ((no_source - ours).norm() / ours.norm()) > 1e-3  # the source tokens change the answer


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-kontext", "flux2", "flux2-klein", "z-image", *QWEN])
def test_saved_lora_student_loads_with_load_lora_weights_and_generates(tiny, tmp_path, family):
    """A trained (here: randomised) LoRA student, saved, loaded the standard diffusers way into a fresh pipeline of its
    base: same velocity to 1e-5 in fp32, and the pipeline's own __call__ generates with it."""
    student = build_student(StudentConfig(base=str(tiny[family]), lora={"rank": 4, "alpha": 8}), device="cpu", dtype="float32")
    assert all(p.dtype == torch.float32 for p in student.trainable_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    student.save_pretrained(tmp_path / "student")
    meta = json.loads((tmp_path / "student" / "danceopd_student.json").read_text())
    assert meta["family"] == family and meta["resolution"] == 32 and Path(meta["base"]) == Path(tiny[family]).resolve()
    # a latent student's metadata: its model, adapter and exports, nothing of the pixel model
    assert set(meta["config"]) == MODEL_STUDENT_KEYS and meta["config"]["lora"]["rank"] == 4 and "num_layers" not in meta["config"]
    assert read_student_config(tmp_path / "student").model_family.name == family
    if family == "flux":  # a folder written before (every StudentConfig field, the pixel model's too) still loads
        old = {**StudentConfig(base=str(tiny[family]), lora={"rank": 4, "alpha": 8}).model_dump()}
        (tmp_path / "student" / "danceopd_student.json").write_text(json.dumps({**meta, "config": old}))
        assert read_student_config(tmp_path / "student").lora.alpha == 8
        load_student(tmp_path / "student", device="cpu", dtype="float32")
        (tmp_path / "student" / "danceopd_student.json").write_text(json.dumps(meta))
    assert (tmp_path / "student" / "pytorch_lora_weights.safetensors").exists()

    pipe = _pipe(tiny[family])
    pipe.load_lora_weights(str(tmp_path / "student"))
    fresh = student.field.with_transformer(pipe.transformer)
    x = torch.randn(2, *student.field.info.sample_shape, generator=g)
    s = torch.tensor([0.3, 0.8])
    src = torch.randn(2, *student.field.info.sample_shape, generator=g) if student.field.info.takes_source else None
    with torch.no_grad():
        ours, theirs = student.field.velocity(x, s, Conditions(PROMPTS, src)), fresh.velocity(x, s, Conditions(PROMPTS, src))
        base = student.field.with_transformer(_pipe(tiny[family]).transformer).velocity(x, s, Conditions(PROMPTS, src))
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - base).abs().max().item() > 1e-3  # the adapter is really in the loaded pipeline
    size, kwargs = 32, {}
    if family == "flux-kontext":
        kwargs = {"max_area": 32 * 32, "_auto_resize": False, "image": torch.zeros(1, 3, 32, 32)}
    if family in ("flux2", "flux2-klein", "qwen-image-edit", "qwen-image-edit-plus"):  # an edit (FLUX.2: reference >= 64 px)
        from PIL import Image

        size = 64 if family.startswith("flux2") else 32
        kwargs = {"image": Image.new("RGB", (size, size), (200, 30, 30))}
    from danceopd.testing.tiny_qwen import tiny_edit_image_area

    with tiny_edit_image_area(size * size):  # the Qwen edit pipelines' VAE branch at the tiny size (no effect elsewhere)
        image = pipe(prompt=PROMPTS[0], num_inference_steps=2, height=size, width=size, output_type="np", **kwargs).images
    assert image.shape == (1, size, size, 3) and float(image.std()) > 0
    if family == "flux":  # the merged full transformer, made from the folder on the CPU: a standalone model without peft
        from diffusers import FluxTransformer2DModel

        from danceopd.student import save_merged_transformer

        assert not (tmp_path / "student" / "transformer").exists()  # never part of an ordinary save (a checkpoint)
        merged = FluxTransformer2DModel.from_pretrained(save_merged_transformer(tmp_path / "student", "float32"))
        with torch.no_grad():
            assert (student.field.with_transformer(merged).velocity(x, s, Conditions(PROMPTS, src)) - ours).abs().max() < 1e-5
    again = load_student(tmp_path / "student", device="cpu", dtype="float32")  # and back into training
    with torch.no_grad():
        assert (again.field.velocity(x, s, Conditions(PROMPTS, src)) - ours).abs().max().item() < 1e-5


def test_a_lora_students_adapters_start_from_its_seed(tiny):
    """peft draws the A matrices at random: from student.seed, so that two runs of one config start (and, with
    unbatched teachers, end) alike; the caller's RNG is left as it was."""
    def adapters(seed: int) -> list[torch.Tensor]:
        return [p.detach().clone() for p in build_student(StudentConfig(base=str(tiny["flux"]), lora={"rank": 4}, seed=seed),
                                                          device="cpu", dtype="float32").trainable_parameters()]

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = adapters(0)
    assert torch.equal(torch.rand(3), before)  # the global RNG untouched
    b, c = adapters(0), adapters(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and any(x.abs().sum() > 0 for x in a)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_lora_teacher_is_merged_once_and_identified_by_checksum(tiny):
    spec = TeacherModelSpec(base=str(tiny["flux"]), loras=[LoraAdapterSpec(path=str(tiny["flux-lora"]), scale=0.5)])
    merged = load_teacher_field(spec, "t2i", 32, device="cpu", dtype="float32")
    plain = load_teacher_field(TeacherModelSpec(base=str(tiny["flux"])), "base", 32, device="cpu", dtype="float32")
    assert not any("lora" in n for n, _ in merged.transformer.named_parameters())  # fused, no per-call adapter cost
    adapter = load_student(tiny["flux-lora"], device="cpu", dtype="float32")  # the same adapter, unmerged
    for module in adapter.transformer.modules():
        if hasattr(module, "scaling"):
            module.scaling = {k: 0.5 * v for k, v in module.scaling.items()}
    x, s, c = torch.randn(2, 4, 16, 16), torch.tensor([0.2, 0.7]), Conditions(PROMPTS)
    with torch.no_grad():
        vm, va, vb = merged.velocity(x, s, c), adapter.field.velocity(x, s, c), plain.velocity(x, s, c)
    assert (vm - va).abs().max() < 1e-5 and (vm - vb).abs().max() > 1e-3
    assert merged.info.extra["weights_sha256"] != plain.info.extra["weights_sha256"]
    again = load_teacher_field(spec, "t2i", 32, device="cpu", dtype="float32")
    assert again.info.extra["weights_sha256"] == merged.info.extra["weights_sha256"]


def test_bf16_base_keeps_fp32_master_weights_and_ema(tiny, tmp_path):
    """An update far below bf16's resolution (1e-6 on weights of size ~1) still moves the fp32 adapters; the EMA is fp32."""
    from trainer.ema import EMA

    student = build_student(StudentConfig(base=str(tiny["flux"]), lora={"rank": 4, "alpha": 4}), device="cpu", dtype="bfloat16")
    frozen = [p for p in student.transformer.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    params = student.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params:
            p.fill_(1.0)
    ema = EMA(student.transformer, 0.5)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-6)
    x, s = torch.randn(2, 4, 16, 16), torch.tensor([0.4, 0.6])
    loss = student.field.velocity(x, s, Conditions(PROMPTS)).float().pow(2).mean()
    loss.backward()
    opt.step()
    moved = [(p - b).abs().max().item() for p, b in zip(params, before)]
    assert max(moved) > 0 and max(moved) < 1e-4  # a tiny step, kept
    assert torch.tensor(1.0 + max(moved), dtype=torch.bfloat16).item() == 1.0  # which bf16 weights would have lost
    ema.update(student.transformer, step=100)
    assert all(v.dtype == torch.float32 for v in ema.params.values())
    assert any(not torch.equal(v, torch.ones_like(v)) for v in ema.params.values())


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-kontext", "flux2", "flux2-klein", "z-image", "qwen-image-edit-plus"])
def test_truncated_rollouts_are_bit_identical_on_every_family(tiny, family):
    """LoRA students of each family (Kontext with source tokens), batches that shrink (32, with 16-row chunks and without)
    and ones that cannot (6, 8: below MIN_ROWS), 1 and 2 threads: the truncated rollout's queried states equal the full
    rollout's."""
    from danceopd.flow import gather_states, rollout_to_queries, sample_query_indices, uniform_sigmas

    before = torch.get_num_threads()
    student = build_student(StudentConfig(base=str(tiny[family]), lora={"rank": 4, "alpha": 4}), device="cpu", dtype="float32")
    for p in student.trainable_parameters():  # non-zero adapters: the student differs from its base
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    shape = student.field.info.sample_shape
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b, chunk in ((32, 16), (32, None), (8, None), (6, None)):
                g = torch.Generator().manual_seed(b)
                source = torch.randn(b, *shape, generator=g) if family in SOURCE_AS_TOKENS else None
                cond = Conditions([PROMPTS[i % 2] for i in range(b)], source)
                noise, idx, sigmas = torch.randn(b, *shape, generator=g), sample_query_indices(6, b, 2, "low", g), uniform_sigmas(6)
                short = rollout_to_queries(lambda x, s, rows: student.field.velocity(x, s, cond.select(rows)), noise, sigmas, idx, chunk=chunk)
                full = rollout_states(lambda x, s: student.field.velocity(x, s, cond), noise, sigmas)
                assert torch.equal(short.x, gather_states(full.states, full.sigmas, idx)[0]), (threads, b, chunk)
    finally:
        torch.set_num_threads(before)


def test_bad_model_configs_stop_before_anything_loads_naming_the_key(tiny, tmp_path):
    base = {"student.base": str(tiny["flux"]), "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher: a sd3 teacher .* cannot teach a flux student"):
        load_config(None, {**base, "routes": {"t2i": {"capability": "t2i", "teacher": str(tiny["sd3"])}}})
    from safetensors.torch import save_file

    unet_lora = tmp_path / "unet-lora.safetensors"  # an SD1.5-style adapter: its modules are in no transformer
    save_file({"transformer.down_blocks.0.attentions.0.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.down_blocks.0.attentions.0.to_q.lora_B.weight": torch.zeros(8, 4)}, str(unet_lora))
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher\.loras\.0: none of the 1 modules named by the LoRA"):
        load_config(None, {**base, "routes": {"t2i": {"capability": "t2i", "teacher": {"loras": [{"path": str(unet_lora)}]}}}})
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher\.loras\.0: 9 of the 21 modules named by the LoRA .* do not exist"):
        load_config(None, {**base, "routes": {"t2i": {"capability": "t2i", "teacher": {"loras": [{"path": str(tiny["sd3-lora"])}]}}}})
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher: the suite's exact teachers"):
        load_config(None, {**base, "routes": {"t2i": {"capability": "t2i"}}})
    with pytest.raises(ConfigError, match=r"routes\.edit: an edit route needs a student that reads source images"):
        load_config(None, {**base, "routes": {"edit": {"capability": "global_edit", "teacher": {}}}})
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    manifest = tmp_path / "data.jsonl"
    manifest.write_text(json.dumps({"uid": "a", "route": "t2i", "prompt": "a cat", "source_image": "img/a.png"}) + "\n"
                        + json.dumps({"uid": "b", "route": "t2i", "prompt": "a dog", "source_image": "img/missing.png"}) + "\n")
    with pytest.raises(ConfigError, match=r"data\.manifest: .*row 2 \(uid 'b'\): source_image: file img/missing.png does not exist"):
        load_config(None, {**base, "student.base": str(tiny["flux-kontext"]), "data.manifest": str(manifest),
                           "routes": {"t2i": {"teacher": {}}}})
    with pytest.raises(ConfigError, match=r"method\.states: off-policy states forward-noise dataset targets"):
        load_config(None, {**base, "routes": {"t2i": {"capability": "t2i", "teacher": {}}}, "method.states": "off_policy"})
    with pytest.raises(ConfigError, match=r"student: .*family 'sdxl'"):
        load_config(None, {**base, "student.family": "sdxl"})
    with pytest.raises(ConfigError, match=r"dtype 'float16': training in float16 needs loss scaling, which the trainers do not do"):
        load_config(None, {**base, "dtype": "float16"})
    # A float16 teacher (inference: no gradients) keeps what transformers keeps in fp32 under fp16 (T5's `wo`)
    fp16 = load_teacher_field(TeacherModelSpec(base=str(tiny["flux"])), "t2i", 32, device="cpu", dtype="float16")
    t5 = {n: p.dtype for n, p in fp16.pipe.text_encoder_2.named_parameters()}
    assert {d for n, d in t5.items() if ".wo." in n} == {torch.float32} and t5["shared.weight"] == torch.float16
    assert fp16.transformer.dtype == torch.float16


def test_manifest_routes_feed_encoded_sources_once_and_evaluate_on_rows_never_trained(tiny, tmp_path):
    """Each source image is encoded once however often it is drawn; the evaluation conditions of a manifest run come
    from rows its training never draws: data.eval_fraction of each route (at least one, chosen by uid), or
    data.eval_manifest (which may not share a uid with the training manifest)."""
    from PIL import Image

    from danceopd.data.routes import build_route_data

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(tmp_path / "img" / f"{i}.png")
        rows.append({"uid": f"e{i}", "route": "edit", "prompt": f"edit number {i}", "source_image": f"img/{i}.png"})
    rows += [{"uid": f"t{i}", "route": "t2i", "prompt": f"a cat number {i}"} for i in range(4)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    over = {"student.base": str(tiny["flux-kontext"]), "data.manifest": str(tmp_path / "m.jsonl"), "output_dir": str(tmp_path),
            "routes": {"edit": {"teacher": {}}, "t2i": {"teacher": {}}}}
    cfg = load_config(None, {**over, "data.eval_fraction": 0.2})
    student = build_student(cfg.student, device="cpu", dtype="float32")
    data = build_route_data(cfg, None, student)
    a, b = data["edit"].sample(8, seed=5), data["edit"].sample(8, seed=5)
    assert a.prompts == b.prompts and torch.equal(a.source, b.source) and a.source.shape == (8, 4, 16, 16)
    trained = {r: {p for seed in range(300) for p in data[r].sample(4, seed).prompts} for r in data}  # what training draws
    held = {r: set(data[r].evaluation_set(16, 12345).prompts) for r in data}
    assert {r: len(v) for r, v in held.items()} == {"edit": 2, "t2i": 1}  # round(0.2 x 10), and at least one of 4
    for r in data:
        assert not trained[r] & held[r], r
        assert trained[r] | held[r] == {x["prompt"] for x in rows if x["route"] == r}  # every other row is trained on
    assert data["edit"].cache.encoded == 10  # 8 training + 2 held-out images, each encoded once
    assert data["t2i"].sample(2, 0).source is None
    # the same rows are held out by every load of the manifest (a resumed run, another worker)
    again = build_route_data(load_config(None, {**over, "data.eval_fraction": 0.2}), None, student)
    assert set(again["edit"].evaluation_set(16, 1).prompts) == held["edit"]
    # a separate held-out file: its rows are the evaluation set, the whole manifest trains
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"uid": f"h{r}", "route": r, "prompt": f"held out {r}",
                                                              **({"source_image": "img/0.png"} if r == "edit" else {})})
                                                  for r in ("edit", "t2i")))
    cfg = load_config(None, {**over, "data.eval_manifest": str(tmp_path / "eval.jsonl")})
    data = build_route_data(cfg, None, student)
    assert set(data["t2i"].evaluation_set(4, 0).prompts) == {"held out t2i"} and len(cfg.manifest.bucket("t2i")) == 4
    (tmp_path / "eval.jsonl").write_text(json.dumps({"uid": "t0", "route": "t2i", "prompt": "a cat"}) + "\n"
                                         + json.dumps({"uid": "h", "route": "edit", "prompt": "x", "source_image": "img/0.png"}))
    with pytest.raises(ConfigError, match=r"data\.eval_manifest: uids \['t0'\] are also in data\.manifest"):
        load_config(None, {**over, "data.eval_manifest": str(tmp_path / "eval.jsonl")})
    with pytest.raises(ConfigError, match=r"data\.eval_fraction: route 't2i' has 4 rows: holding out 4 for evaluation leaves none"):
        load_config(None, {**over, "data.eval_fraction": 0.9})


def test_lora_students_learn_their_teachers_on_the_reference_trainer(tiny, tmp_path):
    """SD3 and FLUX: a LoRA student distilled from base + random LoRA closes >= 90% of its velocity error; a bf16 run
    (base, teacher and compute in bf16, fp32 adapters) learns as the fp32 run does (measured: 96.0% vs 96.5%)."""
    from trainer.reference import ReferenceTrainer

    for family, dtype in (("sd3", "float32"), ("flux", "float32"), ("flux", "bfloat16")):
        cfg = load_config(None, {"dtype": dtype,
            "student.base": str(tiny[family]), "student.lora.rank": 4, "student.lora.alpha": 4,
            "routes": {"t2i": {"capability": "t2i", "teacher": {"loras": [{"path": str(tiny[f"{family}-lora"])}]}}},
            "method.rollout_steps": 8, "method.schedule": "family", "optim.batch_size": 8, "optim.lr": 1e-2, "optim.warmup_steps": 0,
            "optim.ema_decay": 0.0, "steps": 30, "log_every": 10, "checkpoint_every": 1000, "torch_threads": 2,
            "output_dir": str(tmp_path), "run_name": f"{family}-{dtype}", "eval.velocity_error_samples": 8})
        tr = ReferenceTrainer(cfg, log=lambda m: None)
        before = tr.evaluate()["routes"]["t2i"]["velocity_error"]
        tr.fit()
        after = tr.evaluate()["routes"]["t2i"]["velocity_error"]
        assert after < 0.1 * before, (family, dtype, before, after)


def test_flux_t2i_and_kontext_edit_compose_on_the_distributed_job(ray_cluster, tiny, tmp_path):
    """Two Ray Train workers x 2 micro-batches, served LoRA teachers (T2I on FLUX, an edit on Kontext: two different
    random deltas of the same weights, told apart only by the source tokens), one Kontext LoRA student: both routes'
    velocity errors fall (measured at 60 steps: t2i -87%, edit -70%); the job's student loads with load_lora_weights.
    The workers evaluate before and after training, one route each (rank 0 the first, rank 1 the second)."""
    from ray import serve

    from trainer.distributed import run_distributed
    from trainer.job import load_job_config
    from trainer.main import ensure_services

    prefix = f"fx{uuid.uuid4().hex[:4]}-"
    job = load_job_config(None, {
        "student.base": str(tiny["flux-kontext"]), "student.lora.rank": 8, "student.lora.alpha": 8,
        "routes": {"t2i": {"capability": "t2i", "teacher": {"base": str(tiny["flux"]), "loras": [{"path": str(tiny["flux-lora"])}]}},
                   "edit": {"capability": "global_edit", "teacher": {"loras": [{"path": str(tiny["flux-edit-lora"])}]}}},
        "method.rollout_steps": 8, "method.schedule": "family", "optim.batch_size": 8, "optim.grad_accum": 2, "optim.lr": 1e-2,
        "optim.warmup_steps": 0, "optim.ema_decay": 0.0, "steps": 60, "log_every": 20, "checkpoint_every": 60, "torch_threads": 1,
        "eval.velocity_error_samples": 8, "cluster.num_workers": 2, "cluster.cpus_per_worker": 0.5, "output_dir": str(tmp_path),
        "services.app_prefix": prefix, "services.router_app": prefix + "router", "services.gateway": False})
    ensure_services(job, log=lambda m: None)
    try:
        result = run_distributed(job, f"{prefix}run", evaluate=True)
        assert result.error is None and result.metrics["step"] == 60
        pipe = _pipe(tiny["flux-kontext"])
        pipe.load_lora_weights(str(job.run_dir / "student"))
    finally:
        for app in [prefix + "t2i", prefix + "edit", prefix + "router"]:
            serve.delete(app)
    report = json.loads((job.run_dir / "report.json").read_text())
    assert report["step"] == 60 and report["before"]["step"] == 0
    assert {r: w["rank"] for r, w in report["evaluated_on"].items()} == {"t2i": 0, "edit": 1}
    assert (job.run_dir / "grid.png").exists() and (job.run_dir / "grid-before.png").exists()
    for route in ("t2i", "edit"):
        b, a = report["velocity_error"][route]["before"], report["velocity_error"][route]["after"]
        assert a < 0.5 * b, (route, b, a)


def test_shared_base_teachers_are_one_deployment_answering_per_adapter(ray_cluster, tiny, tmp_path):
    """services.shared_base: the routes' LoRA teachers on one base become one adapter-bank deployment; each route's
    client names its adapter and gets what a merged teacher of its own answers; mixed concurrent queries are
    grouped per adapter inside the replica."""
    import asyncio

    from ray import serve

    from danceopd.remote import RequestError
    from services.teachers.app import deploy_teachers
    from services.teachers.client import TeacherClient
    from trainer.job import load_job_config

    prefix = f"sb{uuid.uuid4().hex[:4]}-"
    lora_b = build_random_lora(tiny["flux"], tmp_path / "lora-b", rank=4, std=0.1, seed=7)
    job = load_job_config(None, {
        "student.base": str(tiny["flux"]), "services.shared_base": True, "services.app_prefix": prefix, "output_dir": str(tmp_path),
        "routes": {"a": {"capability": "t2i", "teacher": {"loras": [{"path": str(tiny["flux-lora"])}]}},
                   "b": {"capability": "t2i", "teacher": {"loras": [{"path": str(lora_b), "scale": 0.5}]}},
                   "plain": {"capability": "t2i", "teacher": {}},
                   "guided": {"capability": "t2i", "teacher": {"loras": [{"path": str(lora_b)}]}, "cfg_alpha": 2.0}}})
    assert job.banks() == {"shared-a": ["a", "b", "plain", "guided"]}  # the CFG route shares the base too
    assert {job.teacher_app(r) for r in ("a", "b", "plain", "guided")} == {prefix + "shared-a"}
    tcfg = job.teachers_config()
    deploy_teachers(tcfg, only=["shared-a"], gateway=False)
    try:
        clients = {r: job.teacher_client(r) for r in ("a", "b", "plain", "guided")}
        assert clients["a"].info.name == "a" and clients["a"].info.extra["adapters"] == ["a", "b", "guided", "plain"]
        x, s, c = torch.randn(3, 4, 16, 16), torch.tensor([0.2, 0.5, 0.9]), Conditions(PROMPTS + [""])

        async def together():
            return await asyncio.gather(*(clients[r].velocity_async(x, s, c) for r in ("a", "b", "plain", "a", "guided")))

        served = dict(zip(("a", "b", "plain", "a2", "guided"), asyncio.run(together())))
        for r in ("a", "b", "plain", "guided"):  # guided: CFG(2) over its adapter, as a teacher of its own computes it
            own = build_route_field(r, job, None, device="cpu", dtype="float32")
            with torch.no_grad():
                want = own.velocity(x, s, c)
            assert (served[r] - want).abs().max() < 1e-4, r
        assert torch.equal(served["a"], served["a2"]) and (served["a"] - served["b"]).abs().max() > 1e-3
        with pytest.raises(RequestError, match="adapter"):
            TeacherClient(prefix + "shared-a", app_prefix="").velocity(x, s, c)  # a bank needs the adapter named
    finally:
        serve.delete(prefix + "shared-a")


@pytest.mark.cuda
def test_lora_student_and_teacher_on_cuda_in_bf16(tiny):
    """Device placement and precision on a GPU: bf16 base and teacher on cuda, fp32 adapters, finite loss and grads."""
    student = build_student(StudentConfig(base=str(tiny["flux-kontext"]), lora={"rank": 4, "alpha": 4}), device="cuda", dtype="bfloat16")
    teacher = load_teacher_field(TeacherModelSpec(base=str(tiny["flux"]), loras=[LoraAdapterSpec(path=str(tiny["flux-lora"]))]),
                                 "t2i", 32, device="cuda", dtype="bfloat16")
    assert teacher.transformer.dtype == torch.bfloat16 and next(teacher.transformer.parameters()).device.type == "cuda"
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in student.trainable_parameters())
    x, s, c = torch.randn(2, 4, 16, 16, device="cuda"), torch.tensor([0.3, 0.7], device="cuda"), Conditions(PROMPTS)
    with torch.no_grad():
        target = teacher.velocity(x, s, c)
    loss = (student.field.velocity(x, s, c) - target).pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.trainable_parameters())


def test_clip_score_hook_scores_teacher_and_student_samples(tiny, tmp_path):
    """eval.clip_model: a CLIP checkpoint scores decoded samples against their prompts (100 x cosine, >= 0)."""
    from danceopd.clip_score import ClipScorer
    from danceopd.testing.tiny import build_tiny_clip
    from trainer.reference import ReferenceTrainer

    clip = build_tiny_clip(tmp_path / "clip")
    scorer = ClipScorer(str(clip))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = scorer(images, PROMPTS), scorer(images, PROMPTS)
    assert a == b and 0.0 <= a <= 100.0 and scorer(images, PROMPTS[::-1]) != a
    cfg = load_config(None, {"student.base": str(tiny["flux"]), "student.lora.rank": 4, "output_dir": str(tmp_path),
                             "routes": {"t2i": {"capability": "t2i", "teacher": {"loras": [{"path": str(tiny["flux-lora"])}]}}},
                             "eval.clip_model": str(clip), "eval.velocity_error_samples": 4, "eval.sampling_steps": 4,
                             "eval.schedule": "family", "method.schedule": "family", "method.rollout_steps": 4})
    report = ReferenceTrainer(cfg, log=lambda m: None).evaluate()
    scores = report["routes"]["t2i"]["clip_score"]
    assert set(scores) == {"teacher", "student"} and all(0.0 <= v <= 100.0 for v in scores.values())
    with pytest.raises(ConfigError, match=r"eval\.clip_model: .*CLIP folder ./nope does not exist"):
        load_config(None, {"eval.clip_model": "./nope"})


def test_sd3_edit_student_grows_a_zero_input_layer_and_learns_an_sd3_edit_teacher(tiny, tmp_path):
    """SD3 has no image input: an edit route grows the student's patch embedding for source latents, zero-initialised
    (the student starts exactly as its base), trained beside the LoRA, saved beside it and restored by the helper."""
    from danceopd.student import load_student_pipeline
    from trainer.reference import ReferenceTrainer

    base = str(tiny["sd3"])
    plain = build_student(StudentConfig(base=base, lora={"rank": 4, "alpha": 4}), device="cpu", dtype="float32")
    grown = build_student(StudentConfig(base=base, lora={"rank": 4, "alpha": 4}, edit_input=True), device="cpu", dtype="float32")
    assert grown.field.info.takes_source and grown.transformer.config.in_channels == 8
    assert {n for n, p in grown.transformer.named_parameters() if p.requires_grad and "lora" not in n} == {"pos_embed.proj.weight", "pos_embed.proj.bias"}
    x, s, src = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8]), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(grown.field.velocity(x, s, Conditions(PROMPTS, src)), plain.field.velocity(x, s, Conditions(PROMPTS)))
    # an SD3 "edit teacher": the grown student with random adapters and source weights
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in grown.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    grown.save_pretrained(tmp_path / "sd3-edit-teacher")
    pipe = load_student_pipeline(tmp_path / "sd3-edit-teacher", device="cpu", dtype="float32")
    with torch.no_grad():
        want = grown.field.velocity(x, s, Conditions(PROMPTS, src))
        assert (grown.field.with_transformer(pipe.transformer).velocity(x, s, Conditions(PROMPTS, src)) - want).abs().max() < 1e-5
    cfg = load_config(None, {
        "student.base": base, "student.lora.rank": 4, "student.lora.alpha": 4, "output_dir": str(tmp_path), "run_name": "sd3-edit",
        "routes": {"edit": {"capability": "global_edit", "teacher": {"base": str(tmp_path / "sd3-edit-teacher")}}},
        "method.rollout_steps": 8, "method.schedule": "family", "optim.batch_size": 8, "optim.lr": 1e-2, "optim.warmup_steps": 0,
        "optim.ema_decay": 0.0, "steps": 40, "log_every": 10, "checkpoint_every": 1000, "torch_threads": 2, "eval.velocity_error_samples": 8})
    assert cfg.student.edit_input  # set by the edit route
    tr = ReferenceTrainer(cfg, log=lambda m: None)
    before = tr.evaluate()["routes"]["edit"]["velocity_error"]
    tr.fit()
    after = tr.evaluate()["routes"]["edit"]["velocity_error"]
    assert after < 0.1 * before, (before, after)
    # The trained student generates through its pipeline's own __call__, which takes image= and edits it: the same
    # latents as the student's own field rolled out on the pipeline's sigma grid from the same noise.
    from diffusers import StableDiffusion3Pipeline

    from danceopd.models.sd3_edit import StableDiffusion3EditPipeline
    from trainer.checkpoint import export_student

    edit = load_student_pipeline(export_student(tr.student, None, tmp_path / "trained"), device="cpu", dtype="float32")
    assert isinstance(edit, StableDiffusion3EditPipeline) and isinstance(edit, StableDiffusion3Pipeline)
    images = torch.rand(2, 3, 32, 32, generator=g)  # [0, 1], as diffusers pipelines take tensors
    noise = torch.randn(1, 4, 16, 16, generator=g)
    outs = [edit(prompt=PROMPTS[1], image=images[i:i + 1], latents=noise, num_inference_steps=4, guidance_scale=1.0,
                 height=32, width=32, output_type="latent").images for i in range(2)]
    sigmas = tr.student.family.default_sigmas(edit, 4, (4, 16, 16))
    with torch.no_grad():
        cond = Conditions([PROMPTS[1]], tr.student.encode_images(images[:1] * 2 - 1))
        ours = rollout_states(lambda x, s: tr.student.field.velocity(x, s, cond), noise, sigmas).final
    assert (outs[0] - ours).abs().max() < 1e-4, (outs[0] - ours).abs().max()
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # another source image, another edit
    pixels = edit(prompt=[PROMPTS[0], PROMPTS[1]], image=images[0], num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                  output_type="np").images  # CFG: the source goes with both halves of the doubled batch
    assert pixels.shape == (2, 32, 32, 3) and float(pixels.std()) > 0
    with pytest.raises(ValueError, match="image: an SD3 edit student edits a source image"):
        edit(prompt=PROMPTS[0], num_inference_steps=2, height=32, width=32)
    with pytest.raises(ConfigError, match=r"routes\.edit\.teacher: an edit route needs a teacher that reads source images"):
        load_config(None, {"student.base": base, "output_dir": str(tmp_path), "routes": {"edit": {"capability": "global_edit", "teacher": {}}}})


def test_a_teacher_outside_the_students_latent_space_is_refused_naming_the_key(tiny, tmp_path):
    """Two local pipelines share a latent space only when their VAEs are the same (class, geometry, factors, statistics
    and weights): a klein teacher whose VAE has other weights is refused at validation; with the student's VAE copied
    in, the same teacher (another transformer) is accepted."""
    import shutil

    other = build_tiny_pipeline("flux2-klein", tmp_path / "other-klein", seed=7, sample_size=64)
    over = {"student.base": str(tiny["flux2-klein"]), "student.resolution": 64, "output_dir": str(tmp_path),
            "routes": {"t2i": {"capability": "t2i", "teacher": {"base": str(other)}}}}
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher\.base: .*other-klein is not in the student's latent space .*"
                                          r"other weights"):
        load_config(None, over)
    shutil.rmtree(other / "vae")
    shutil.copytree(tiny["flux2-klein"] / "vae", other / "vae")
    cfg = load_config(None, over)  # the same VAE: a teacher of another transformer in the same latent space
    assert cfg.routes["t2i"].model_teacher.base == str(other)
    # FLUX.2 [dev] (another family, another size, its own Mistral-3 encoder) teaches the [klein] student: one VAE
    over["routes"] = {"t2i": {"capability": "t2i", "teacher": {"base": str(tiny["flux2"]), "guidance": 4.0}}}
    assert load_config(None, over).routes["t2i"].model_teacher.base == str(tiny["flux2"])
    over["routes"] = {"t2i": {"capability": "t2i", "teacher": {"base": str(tiny["flux"])}}}  # FLUX.1: another latent space
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher: a flux teacher .* cannot teach a flux2-klein student"):
        load_config(None, over)
    # Qwen-Image (text-to-image) teaches the T2I route of a Qwen-Image-Edit Plus student: one VAE; Z-Image, whose VAE is
    # FLUX.1's, does not; a Qwen edit run encodes per (prompt, source) where needed, never from a prompt-keyed store
    qwen = {"student.base": str(tiny["qwen-image-edit-plus"]), "output_dir": str(tmp_path),
            "routes": {"t2i": {"capability": "t2i", "teacher": {"base": str(tiny["qwen-image"])}},
                       "edit": {"capability": "global_edit", "teacher": {}}}}
    cfg = load_config(None, qwen)
    assert cfg.routes["t2i"].model_teacher.base == str(tiny["qwen-image"]) and cfg.text_embeddings().mode == "on_device"
    with pytest.raises(ConfigError, match=r"routes\.t2i\.teacher: a z-image teacher .* cannot teach a qwen-image-edit-plus student"):
        load_config(None, {**qwen, "routes": {"t2i": {"capability": "t2i", "teacher": {"base": str(tiny["z-image"])}}}})


@pytest.mark.parametrize("family", ["z-image", "qwen-image"])
def test_a_student_exported_for_comfyui_loads_back_through_diffusers_and_as_a_teacher_lora(tiny, tmp_path, family):
    """student.export_formats: [diffusers, comfyui]: beside the diffusers file, the kohya / ComfyUI layout (Z-Image:
    NextDiT names, q, k, v fused into attention.qkv; Qwen-Image: its own names): diffusers' own converter (the
    pipeline's load_lora_weights) and the project's teacher loader read it back to the student's velocity; a family
    without that layout is refused at validation."""
    from safetensors.torch import load_file

    from danceopd.student import COMFYUI_FILE

    student = build_student(StudentConfig(base=str(tiny[family]), lora={"rank": 4, "alpha": 8},
                                          export_formats=["diffusers", "comfyui"]), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    student.save_pretrained(tmp_path / "student")
    comfy = load_file(str(tmp_path / "student" / COMFYUI_FILE))
    if family == "z-image":
        assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in comfy and "lora_unet_layers_0_attention_out.lora_up.weight" in comfy
        assert not any("_to_q" in k for k in comfy)
    else:
        assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in comfy
    assert not any("lora_A" in k for k in comfy)
    x, s = torch.randn(2, *student.field.info.sample_shape, generator=g), torch.tensor([0.3, 0.8])
    pipe = _pipe(tiny[family])
    pipe.load_lora_weights(str(tmp_path / "student" / COMFYUI_FILE))
    teacher = load_teacher_field(TeacherModelSpec(base=str(tiny[family]), loras=[LoraAdapterSpec(path=str(tmp_path / "student" / COMFYUI_FILE))]),
                                 "t", 32, dtype="float32", device="cpu")
    with torch.no_grad():
        ours = student.field.velocity(x, s, Conditions(PROMPTS))
        for other in (student.field.with_transformer(pipe.transformer), teacher):
            assert (other.velocity(x, s, Conditions(PROMPTS)) - ours).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match=r"export_formats: comfyui is written for \['flux', 'flux-kontext', 'qwen-image', 'qwen-image-edit', "
                                         r"'qwen-image-edit-plus', 'z-image'\], not sd3 yet"):
        StudentConfig(base=str(tiny["sd3"]), export_formats=["diffusers", "comfyui"])


def test_a_flux_student_exported_for_comfyui_converts_back_through_diffusers(tiny, tmp_path):
    """FLUX.1's original (ComfyUI) layout: q, k, v fused per stream, single blocks' q, k, v and MLP input fused into
    linear1, the final modulation's halves swapped. diffusers' own converter (_convert_kohya_flux_lora_to_diffusers,
    what FluxPipeline.load_lora_weights runs) gives back every module's update exactly at FLUX.1-dev's real widths
    (it hard-codes them for single blocks); a tiny student on the double blocks, exported and loaded into a fresh
    FluxPipeline with load_lora_weights, has the student's velocity."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from danceopd.student import COMFYUI_FILE

    g, r, d, m = torch.Generator().manual_seed(0), 2, 3072, 12288
    shapes = {f"transformer_blocks.0.attn.{p}": (d, d) for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                                                 "to_out.0", "to_add_out")}
    shapes.update({"transformer_blocks.0.ff.net.0.proj": (d, m), "transformer_blocks.0.ff.net.2": (m, d), "norm_out.linear": (d, 2 * d),
                   "transformer_blocks.0.ff_context.net.0.proj": (d, m), "transformer_blocks.0.ff_context.net.2": (m, d), "proj_out": (d, 64),
                   **{f"single_transformer_blocks.0.{p}": (d, d) for p in ("attn.to_q", "attn.to_k", "attn.to_v")},
                   "single_transformer_blocks.0.proj_mlp": (d, m), "single_transformer_blocks.0.proj_out": (d + m, d)})
    lora = {}
    for name, (fan_in, fan_out) in shapes.items():
        lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"] = torch.randn(r, fan_in, generator=g), torch.randn(fan_out, r, generator=g)
    comfy = get_family("flux").comfyui_lora(lora, 2.0)
    assert {"lora_unet_single_blocks_0_linear1.lora_down.weight", "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight",
            "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"} <= set(comfy)
    back = {k.removeprefix("transformer."): v for k, v in _convert_kohya_flux_lora_to_diffusers(dict(comfy)).items()}
    for name in shapes:
        assert torch.equal(back[f"{name}.lora_B.weight"] @ back[f"{name}.lora_A.weight"],
                           (2.0 * lora[f"{name}.lora_B.weight"]) @ lora[f"{name}.lora_A.weight"]), name
        assert back[f"{name}.lora_A.weight"].shape[0] == r  # split back to the original rank (the fused up is block-diagonal)

    double = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_out.0", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
    student = build_student(StudentConfig(base=str(tiny["flux"]), lora={"rank": 4, "alpha": 8, "target_modules": double},
                                          export_formats=["diffusers", "comfyui"]), device="cpu", dtype="float32")
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    student.save_pretrained(tmp_path / "student")
    pipe = _pipe(tiny["flux"])
    pipe.load_lora_weights(str(tmp_path / "student" / COMFYUI_FILE))
    x, s = torch.randn(2, *student.field.info.sample_shape, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = student.field.velocity(x, s, Conditions(PROMPTS))
        assert (student.field.with_transformer(pipe.transformer).velocity(x, s, Conditions(PROMPTS)) - ours).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["sd3", "flux", "z-image", "flux2-klein", "flux2", "qwen-image"])
def test_non_square_rollouts_reproduce_the_pipelines_at_a_wide_size(tiny, name):
    """An aspect-ratio bucket (data.buckets) 1.5x wider than high: packing, position ids (FLUX, FLUX.2), SD3's cropped
    position embedding, img_shapes (Qwen-Image), the token-count shift of the sigma grid, against each pipeline's own
    __call__ at that height and width; the teacher answers the bucket's shape because it is in its bucket list."""
    from danceopd.models.flux2 import _bn, unpatchify
    from danceopd.models.qwenimage import pack as qwen_pack

    side = 64 if name.startswith("flux2") else 32
    width, height = side * 3 // 2, side
    seq = 160 if name.startswith("flux2") else None  # the pipelines' call below pads prompts to 160 tokens
    field = load_teacher_field(TeacherModelSpec(base=str(tiny[name]), max_sequence_length=seq), "t", side, dtype="float32", device="cpu",
                               buckets=[(width, height)])
    family, pipe = get_family(name), _pipe(tiny[name])
    shape = family.latent_shape(field.pipe, (width, height))
    assert shape in field.info.shapes and shape[2] == shape[1] * 3 // 2
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    sigmas = family.default_sigmas(field.pipe, 4, shape)
    ours = rollout_states(lambda x, s: field.velocity(x, s, Conditions(PROMPTS, shape=shape)), noise, sigmas).final
    call = dict(prompt=list(PROMPTS), height=height, width=width, num_inference_steps=4, output_type="latent")
    if name == "sd3":
        theirs, ours = pipe(**call, guidance_scale=1.0, latents=noise.clone()).images, ours
    elif name in ("flux", "qwen-image"):
        theirs, ours = pipe(**call, **({"guidance_scale": 3.5} if name == "flux" else {}), latents=pack(noise)).images, qwen_pack(ours)
    elif name == "z-image":
        theirs = pipe(**call, guidance_scale=0.0, latents=noise.clone()).images
    elif name == "flux2-klein":
        theirs = pipe(**call, guidance_scale=1.0, latents=noise.clone(), max_sequence_length=160).images
        mean, std = _bn(pipe.vae, ours)
        ours = unpatchify(ours * std + mean)
    else:
        theirs = pipe(**call, guidance_scale=4.0, latents=noise.clone(), max_sequence_length=160).images
        ours = ours.flatten(2).transpose(1, 2)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 1e-4, rel


def test_loading_and_saving_a_student_prints_no_progress_bars(tmp_path):
    """transformers 5 draws "Loading weights" / "Writing model shards" bars on stderr for every from_pretrained /
    save_pretrained: in an experiment's or a job's console they are noise. A fresh interpreter, so that no earlier
    test has already turned them off."""
    import subprocess
    import sys

    code = ("from danceopd.student import load_student; "
            f"load_student('assets/pixel-t2i-base', device='cpu', dtype='float32').save_pretrained({str(tmp_path / 's')!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "s" / "transformer").is_dir()
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr, done.stderr[-2000:]
