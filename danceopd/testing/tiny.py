"""Tiny RANDOM diffusers pipelines, built fully offline and saved in the standard diffusers layout.

    build_tiny_pipeline("sd3", "models/tiny-sd3")            # StableDiffusion3Pipeline (2 CLIP encoders, no T5)
    build_tiny_pipeline("flux", "models/tiny-flux")          # FluxPipeline (FLUX.1-dev style: CLIP + T5, guidance embeds)
    build_tiny_pipeline("flux-kontext", "models/tiny-kontext")  # same components saved as FluxKontextPipeline
    build_tiny_pipeline("flux2-klein", "models/tiny-klein", sample_size=64)  # Flux2KleinPipeline (Qwen3, 28 tiny layers)
    build_tiny_pipeline("flux2", "models/tiny-flux2", sample_size=64)  # Flux2Pipeline (tiny Mistral-3, 30 layers; klein's VAE)
    build_tiny_pipeline("z-image", "models/tiny-z-image")    # ZImagePipeline (Qwen3 with a chat template)
    build_tiny_pipeline("qwen-image", "models/tiny-qwen")    # QwenImagePipeline (tiny Qwen2.5-VL; see danceopd.testing.tiny_qwen)
    build_tiny_pipeline("qwen-image-edit-plus", "models/tiny-qwen-edit")  # also qwen-image-edit: the same weights per seed

The folders reload with `DiffusionPipeline.from_pretrained` (or the family's own class) and run their
`__call__` end to end on CPU in well under a second per step. StableDiffusion3Pipeline does not list
text_encoder_3/tokenizer_3 as optional, so the SD3 folder (which has no T5) loads with
`from_pretrained(path, text_encoder_3=None, tokenizer_3=None)`. FluxKontextPipeline's `__call__` rescales
to `max_area` (default 1024**2) and snaps the input image to a preferred ~1 MP resolution: pass
`max_area=height * width, _auto_resize=False` to keep it tiny. No hub is needed:

- CLIP tokenizers get a hand-written byte-level BPE vocabulary (every byte is one token, no merges), so any
  text tokenizes, one token per character;
- the T5 tokenizer is a `tokenizers` Unigram model (Metaspace pre-tokenizer) over single characters (with
  and without the word-start marker), digits, punctuation and a list of whole English words; pieces not in
  the vocabulary become `<unk>`. pad = 0, eos = `</s>` = 1, unk = 2;
- the Qwen3 families' tokenizer is a fast tokenizer over the same kind of Unigram vocabulary with Qwen's chat markers
  (`<|im_start|>`, `<|im_end|>`, pad `<|endoftext|>`) and a chat template in Qwen's layout; Flux2KleinPipeline reads
  hidden states 9, 18 and 27, so its tiny Qwen3 has 28 layers (of width 16); Flux2KleinPipeline refuses reference
  images under 64 px, so edits need `sample_size=64`;
- every module is built in float32 under `torch.manual_seed(seed + k)` (k fixed per module), so a seed
  gives identical weights on every build.

Sizes for `sample_size` S pixels (default 32): the VAE has 2 blocks (scale factor 2) and 4 latent channels,
so latents are 4 x S/2 x S/2 (4 x 16 x 16 at 32 px). SD3 patchifies them 2x2; FLUX packs 2x2 latent
patches into (S/4)^2 tokens of 16 channels (64 tokens at 32 px).

FLUX's scheduler keeps FLUX.1-dev's dynamic shifting (base_shift 0.5, max_shift 1.15) with the sequence
lengths scaled down to the tiny sizes: `sample_size` plays the role of FLUX's 1024 px, so
max_image_seq_len = tokens at `sample_size` ((S/4)^2, 64 at 32 px) and base_image_seq_len = 1/16 of it
(4 at 32 px; FLUX: 256 / 4096). A 32 px image therefore gets mu = 1.15 (shift e^1.15 ~ 3.2), a 16 px one
mu ~ 0.63, as 1024 px and 512 px images do in FLUX.
"""

from __future__ import annotations

from pathlib import Path

import torch

from danceopd.testing.vocab import QWEN_CHAT_TEMPLATE, _unigram_pieces

FAMILIES = ("sd3", "sd3.5", "flux", "flux-kontext", "flux2", "flux2-klein", "z-image", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus")

CLIP_MAX_LENGTH = 77
VAE_SCALE = 2  # 2 ** (len(block_out_channels) - 1)




def _clip_tokenizer():
    """CLIPTokenizer over a byte-level BPE vocabulary with no merges: one token per byte-character."""
    from transformers import CLIPTokenizer

    # Byte-level BPE maps every byte to a printable character: printable bytes to themselves, the rest to
    # code points from 256 up. With no merges, each such character is one token (word-final form "c</w>").
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    """T5TokenizerFast over a Unigram vocabulary: specials, single characters, punctuation, whole words."""
    from transformers import T5TokenizerFast

    pieces = _unigram_pieces(["<pad>", "</s>", "<unk>"])
    # extra_ids=0: no sentinel tokens (only used for T5's span-corruption pre-training).
    return T5TokenizerFast(vocab=pieces, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def _qwen_tokenizer():
    """A fast tokenizer with Qwen's chat markers and chat template over the Unigram vocabulary (pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    tok = Tokenizer(models.Unigram(_unigram_pieces(specials), unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=512)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def _tiny_vae(seed: int, sample_size: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=sample_size,
                         shift_factor=shift_factor, scaling_factor=scaling_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def _clip_config(vocab_size: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=projection_dim,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def _build_sd3(seed: int, sample_size: int, vae_seed: int, sd35: bool = False):
    """SD3 with two CLIP encoders and no T5; `sd35`: Stable Diffusion 3.5 Medium's layout, a T5 encoder (text_encoder_3)
    beside them and an MMDiT-X transformer (dual attention in its first block, RMS-normed q/k)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok1, tok2 = _clip_tokenizer(), _clip_tokenizer()
    latent = sample_size // VAE_SCALE
    torch.manual_seed(seed)
    # joint_attention_dim 64 = the two CLIP hidden states concatenated (32 + 32), which the pipeline pads to T5's width;
    # caption_projection_dim = inner dim.
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}
    transformer = SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=max(32, latent // 2), **extra)

    def clip(s: int):
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(_clip_config(len(tok1)))

    te1, te2 = clip(seed + 1), clip(seed + 2)
    te3 = tok3 = None
    if sd35:  # T5's width = joint_attention_dim: SD3 joins the CLIP and T5 sequences
        tok3 = _t5_tokenizer()
        torch.manual_seed(seed + 4)
        te3 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=64, d_kv=16, d_ff=37, num_layers=2, num_heads=4,
                                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                                      feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = _tiny_vae(vae_seed, sample_size, shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te1, tokenizer=tok1, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=te3, tokenizer_3=tok3)


def _build_zimage(seed: int, sample_size: int, vae_seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = _qwen_tokenizer()
    torch.manual_seed(seed)
    # head dim 16 = dim / n_heads = sum(axes_dims); cap_feat_dim = the text encoder's hidden size
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6],
                                           axes_lens=[512, 32, 32])
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                                          pad_token_id=tok.pad_token_id))
    vae = _tiny_vae(vae_seed, sample_size, shift_factor=0.1159, scaling_factor=0.3611)  # Z-Image uses FLUX.1's VAE factors
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def _build_flux2_klein(seed: int, sample_size: int, vae_seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _qwen_tokenizer()
    hidden = 16
    torch.manual_seed(seed)
    # in_channels 16 = 4 latent channels patchified 2x2; the caption is 3 stacked Qwen3 layers (9, 18, 27): 3 x 16
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=24, num_hidden_layers=28,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                                                pad_token_id=tok.pad_token_id, tie_word_embeddings=True))
    vae = _flux2_vae(vae_seed, sample_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def _flux2_vae(seed: int, sample_size: int):
    """The FLUX.2 VAE both FLUX.2 families share (the same seed gives the same weights: one latent space)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             sample_size=sample_size)
    with torch.no_grad():  # batch-norm statistics as a trained VAE has them, so that the normalisation is exercised
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape) + 0.5)
    return vae


MISTRAL_CHAT_TEMPLATE = (  # Mistral Small 3.x's layout for the text parts of system and user turns
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
    "(m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")


def _mistral_tokenizer():
    """A fast tokenizer with Mistral-3's control tokens and chat template over the Unigram vocabulary (inside FLUX.2 [dev]'s
    tokenizer component, a processor: see _pixtral_processor)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    tok = Tokenizer(models.Unigram(_unigram_pieces(specials), unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=specials[4:], model_max_length=1024)
    fast.chat_template = MISTRAL_CHAT_TEMPLATE
    return fast


def _pixtral_processor(tokenizer):
    """FLUX.2 [dev]'s tokenizer component, a processor as in the real repository (there a PixtralProcessor, which needs
    torchvision): danceopd.models.processors.TextOnlyPixtralProcessor with the Pixtral PIL image processor's settings for
    the tiny vision tower. Flux2Pipeline.encode_prompt uses its apply_chat_template on text turns."""
    from transformers import PixtralImageProcessorPil

    from danceopd.models.processors import TextOnlyPixtralProcessor

    image_processor = PixtralImageProcessorPil(patch_size={"height": 8, "width": 8}, size={"longest_edge": 64})
    return TextOnlyPixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


def _build_flux2(seed: int, sample_size: int, vae_seed: int):
    """FLUX.2 [dev] in miniature: larger than the tiny [klein] (2 + 2 blocks, 4 heads), a guidance embedding, a tiny
    Mistral-3 whose layers 10, 20 and 30 the pipeline stacks, and the tiny [klein]'s VAE (the same seed: one latent space)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    tok = _mistral_tokenizer()
    hidden = 16
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                          num_attention_heads=4, joint_attention_dim=3 * hidden, timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    torch.manual_seed(seed + 1)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                                 image_size=64, patch_size=8)
    text = MistralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=24, num_hidden_layers=30, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                                   image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                                                                   spatial_merge_size=1, vision_feature_layer=-1))
    vae = _flux2_vae(vae_seed, sample_size)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_pixtral_processor(tok),
                         transformer=transformer)


def flux_scheduler_config(sample_size: int = 32) -> dict:
    """FLUX.1-dev's dynamic shifting, sequence lengths scaled so `sample_size` px gets FLUX's max shift."""
    max_seq = max(2, (sample_size // (2 * VAE_SCALE)) ** 2)  # packed tokens at sample_size
    return dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=max(1, max_seq // 16), max_image_seq_len=max_seq)


def _build_flux(seed: int, sample_size: int, vae_seed: int, kontext: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed)
    # in_channels 16 = 2x2 packed patches of 4 latent channels; axes_dims_rope sums to attention_head_dim.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_clip_config(len(tok)))  # pooler_output (hidden 32) -> pooled_projection_dim
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                                 feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = _tiny_vae(vae_seed, sample_size, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(**flux_scheduler_config(sample_size))
    cls = FluxKontextPipeline if kontext else FluxPipeline
    return cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
               transformer=transformer)


def build_tiny_pipeline(family: str, out: str | Path, seed: int = 0, sample_size: int = 32, vae_seed: int | None = None) -> Path:
    """Build a tiny random pipeline of `family` (see FAMILIES; `sd3.5` is the sd3 family in Stable Diffusion 3.5's layout,
    with a T5 encoder) for `sample_size`-pixel images and save it to `out`.

    Same `seed` -> identical weights. `vae_seed` (default seed + 3) seeds the VAE alone: pipelines built with the same
    one share a latent space whatever their `seed`. `sample_size` must be a multiple of 4 (VAE factor 2 x patch/pack 2).
    Returns `out` as a Path.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if sample_size < 4 or sample_size % 4:
        raise ValueError(f"sample_size must be a positive multiple of 4 (VAE factor 2 x 2x2 patches), got {sample_size}")
    out = Path(out)
    vae_seed = seed + 3 if vae_seed is None else vae_seed
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        if family in ("sd3", "sd3.5"):
            pipe = _build_sd3(seed, sample_size, vae_seed, sd35=family == "sd3.5")
        elif family == "z-image":
            pipe = _build_zimage(seed, sample_size, vae_seed)
        elif family == "flux2-klein":
            pipe = _build_flux2_klein(seed, sample_size, vae_seed)
        elif family == "flux2":
            pipe = _build_flux2(seed, sample_size, vae_seed)
        elif family.startswith("qwen-image"):
            from danceopd.testing.tiny_qwen import build_qwen_image

            pipe = build_qwen_image(family, seed, sample_size, vae_seed)
        else:
            pipe = _build_flux(seed, sample_size, vae_seed, kontext=family == "flux-kontext")
    pipe.to(torch.float32)
    pipe.save_pretrained(out)
    return out


__all__ = ["FAMILIES", "build_tiny_pipeline", "flux_scheduler_config"]


def build_random_lora(base: str | Path, out: str | Path, rank: int = 4, std: float = 0.1, seed: int = 1,
                      target_modules: list[str] | None = None) -> Path:
    """A random LoRA delta on `base`'s transformer, saved in diffusers' LoRA format: a stand-in "capability" for
    a teacher (base + this adapter). Both LoRA matrices are random (peft would start B at zero), so the teacher's
    field differs from the base's by a rank-`rank` change of every targeted layer."""
    from danceopd.student import StudentConfig, build_student

    cfg = StudentConfig(base=str(base), lora={"rank": rank, "alpha": rank, "target_modules": target_modules})
    student = build_student(cfg, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.transformer.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    student.save_pretrained(out)
    return Path(out)


def build_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIPModel with its processor (offline tokenizer, image processor), for the CLIP-score hook's tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    tokenizer = _clip_tokenizer()
    text = _clip_config(len(tokenizer))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
                              patch_size=8, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)
