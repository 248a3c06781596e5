"""Tiny random diffusers pipelines (`danceopd.testing.tiny`): offline build, reload, generate, determinism, CLI."""

import json

import numpy as np
import pytest
import torch

from danceopd.testing.tiny import FAMILIES, build_tiny_pipeline

PROMPT = "a photo of an astronaut riding a horse"
CLASSES = {"sd3": "StableDiffusion3Pipeline", "sd3.5": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux-kontext": "FluxKontextPipeline", "z-image": "ZImagePipeline",
           "flux2": "Flux2Pipeline", "flux2-klein": "Flux2KleinPipeline", "qwen-image": "QwenImagePipeline",
           "qwen-image-edit": "QwenImageEditPipeline", "qwen-image-edit-plus": "QwenImageEditPlusPipeline"}


def _load(family, path):
    from diffusers import DiffusionPipeline

    # StableDiffusion3Pipeline does not list text_encoder_3 / tokenizer_3 as optional: a folder without T5
    # loads only when they are passed as None.
    absent = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    return DiffusionPipeline.from_pretrained(path, **absent)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {family: build_tiny_pipeline(family, root / family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(built):
    return {family: _load(family, path) for family, path in built.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_reloads_as_its_pipeline_class_and_is_small(family, built, loaded):
    path = built[family]
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == CLASSES[family]
    assert type(loaded[family]).__name__ == CLASSES[family]
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 5e6
    assert all(p.dtype == torch.float32 for p in loaded[family].transformer.parameters())
    if family == "flux-kontext":
        from diffusers import FluxKontextPipeline

        assert isinstance(FluxKontextPipeline.from_pretrained(path), FluxKontextPipeline)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_generates_a_32px_image(family, loaded):
    from PIL import Image

    pipe = loaded[family]
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    if family != "sd3":
        kwargs["max_sequence_length"] = 32
    if family == "flux-kontext":
        # Without these Kontext rescales the output to max_area (1024**2) and the input image to a ~1 MP
        # preferred resolution.
        kwargs.update(image=Image.new("RGB", (32, 32), (200, 30, 30)), max_area=32 * 32, _auto_resize=False)
    if family.startswith("qwen-image-edit"):  # the source image is read by the VAE and by the text encoder
        kwargs["image"] = Image.new("RGB", (32, 32), (200, 30, 30))
    from danceopd.testing.tiny_qwen import tiny_edit_image_area

    with tiny_edit_image_area(32 * 32):  # Qwen edits: the VAE branch at 32 px instead of ~1 MP (no effect elsewhere)
        image = pipe(**kwargs).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_sizes(family, loaded):
    pipe = loaded[family]
    channels = pipe.vae.config.z_dim if family.startswith("qwen-image") else pipe.vae.config.latent_channels  # Qwen: a video VAE
    assert pipe.vae_scale_factor == 2 and channels == 4
    if family in ("sd3", "sd3.5"):
        assert pipe.transformer.config.sample_size == 16  # 4 x 16 x 16 latents at 32 px
        # SD3.5's layout: a T5 beside the two CLIPs (as wide as the joint attention), dual attention and q/k norms
        assert (pipe.text_encoder_3 is not None) == (family == "sd3.5")
        if family == "sd3.5":
            assert pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim
            assert list(pipe.transformer.config.dual_attention_layers) == [0] and pipe.transformer.config.qk_norm == "rms_norm"
    elif family in ("flux2", "flux2-klein"):  # 4 channels patchified 2x2 by the pipeline; the empirical mu needs dynamic shifting
        assert pipe.transformer.config.in_channels == 16 and pipe.scheduler.config.use_dynamic_shifting and pipe.vae.bn.num_features == 16
        text = pipe.text_encoder.config if family == "flux2-klein" else pipe.text_encoder.config.text_config
        assert text.num_hidden_layers >= (27 if family == "flux2-klein" else 30)  # hidden states 9, 18, 27 / 10, 20, 30
        assert pipe.transformer.config.guidance_embeds == (family == "flux2")
    elif family.startswith("qwen-image"):  # 5-D latents (4 ch) packed 2x2, normalised per channel; exponential shift to 0.02
        assert pipe.transformer.config.in_channels == 16 and pipe.transformer.config.out_channels == 4
        assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 4 and pipe.vae.config.latents_std != [1.0] * 4
        cfg = pipe.scheduler.config
        assert cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential" and cfg.shift_terminal == 0.02
    elif family == "z-image":  # 4-channel latents patchified 2x2 inside the transformer; Z-Image's static shift 3
        assert pipe.transformer.config.in_channels == 4 and not pipe.scheduler.config.use_dynamic_shifting
        assert pipe.scheduler.config.shift == 3.0
    else:
        assert pipe.transformer.config.in_channels == 16  # 2x2 packed patches of 4 channels: 8 x 8 = 64 tokens
        cfg = pipe.scheduler.config
        assert cfg.use_dynamic_shifting and (cfg.base_image_seq_len, cfg.max_image_seq_len) == (4, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_prompt_tokenizes_with_both_tokenizers(family, loaded):
    pipe = loaded[family]
    inner = pipe.tokenizer.tokenizer if family == "flux2" else pipe.tokenizer  # FLUX.2 [dev]'s tokenizer component is a processor
    for tok in (inner, getattr(pipe, "tokenizer_2", None) or inner):
        ids = tok(PROMPT, padding="max_length", max_length=64, truncation=True).input_ids
        real = [i for i in ids if i != tok.pad_token_id]
        assert len(real) > 2, (type(tok).__name__, ids)
        assert tok.unk_token_id not in real or type(tok).__name__ == "CLIPTokenizer"  # words in the T5 vocab
    if family in ("z-image", "flux2-klein"):  # Qwen's chat template, as the pipelines apply it, its markers single tokens
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=True)
        assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
        ids = pipe.tokenizer(text).input_ids
        assert ids.count(pipe.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2 and pipe.tokenizer.unk_token_id not in ids
        assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    elif family.startswith("qwen-image"):  # the pipelines' fixed templates: markers single tokens, the prefix they drop
        text = pipe.prompt_template_encode.format(PROMPT)  # is system-turn text only
        ids = pipe.tokenizer(text).input_ids
        assert ids.count(pipe.tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3 and pipe.tokenizer.unk_token_id not in ids
        assert ids.index(pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")) > pipe.prompt_template_encode_start_idx
        if family != "qwen-image":  # the processor expands the image marker into the vision tower's tokens
            from PIL import Image

            inputs = pipe.processor(text=["<|vision_start|><|image_pad|><|vision_end|>" + PROMPT], images=[Image.new("RGB", (32, 32))],
                                    return_tensors="pt")
            pad = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
            assert int((inputs["input_ids"] == pad).sum()) == int(inputs["image_grid_thw"].prod()) // 4 > 1
    elif family == "flux2":  # Mistral-3's chat template over the text turns, as Flux2Pipeline.encode_prompt sends them
        turns = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
        text = pipe.tokenizer.apply_chat_template(turns, tokenize=False)
        assert text == f"<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]{PROMPT}[/INST]"
        ids = inner(text, add_special_tokens=False).input_ids
        assert ids.count(inner.convert_tokens_to_ids("[INST]")) == 1 and inner.unk_token_id not in ids
        assert len(inner) == pipe.text_encoder.config.text_config.vocab_size
        assert type(pipe.tokenizer).__name__ == "TextOnlyPixtralProcessor"  # the real repository's is a PixtralProcessor
    elif family != "sd3":  # T5 (FLUX.1's second encoder, SD3.5's third): any text tokenizes, unknown pieces become <unk>
        t5, encoder = (pipe.tokenizer_3, pipe.text_encoder_3) if family == "sd3.5" else (pipe.tokenizer_2, pipe.text_encoder_2)
        ids = t5("Ünïcode 🚀 café, 42%!").input_ids
        assert t5.unk_token_id in ids and ids[-1] == t5.eos_token_id
        assert t5.pad_token_id == 0 and len(t5) == encoder.config.vocab_size


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_same_seed_same_weights_other_seed_differs(family, built, tmp_path):
    from safetensors.torch import load_file

    def weights(path):
        return load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")

    a = weights(built[family])
    b = weights(build_tiny_pipeline(family, tmp_path / "same", seed=0))
    c = weights(build_tiny_pipeline(family, tmp_path / "other", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("flux", tmp_path / "p")
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_pipeline("sdxl", tmp_path / "x")
    with pytest.raises(ValueError, match="multiple of 4"):
        build_tiny_pipeline("flux", tmp_path / "x", sample_size=30)


def test_cli_writes_a_pipeline(tmp_path, capsys):
    from danceopd_cli.main import TINY_FAMILIES, main

    assert TINY_FAMILIES == FAMILIES  # every family's tiny pipeline is one command away
    assert main(["tiny-pipeline", "--family", "qwen-image-edit-plus", "--out", str(tmp_path / "cli-qwen")]) == 0

    out = tmp_path / "cli-flux"
    assert main(["tiny-pipeline", "--family", "flux", "--out", str(out), "--seed", "3", "--sample-size", "16"]) == 0
    assert (out / "model_index.json").exists()
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "transformer" / "config.json").read_text())["in_channels"] == 16
    assert json.loads((out / "vae" / "config.json").read_text())["sample_size"] == 16
    assert main(["tiny-pipeline", "--family", "sd3", "--out", str(tmp_path / "bad"), "--sample-size", "30"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["tiny-pipeline", "--family", "sdxl", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
