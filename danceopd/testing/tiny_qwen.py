"""Tiny RANDOM Qwen-Image pipelines (text-to-image and the two edit variants), built fully offline.

    pipe = build_qwen_image("qwen-image", seed=0, sample_size=32)            # QwenImagePipeline
    pipe = build_qwen_image("qwen-image-edit", seed=0, sample_size=32)       # QwenImageEditPipeline
    pipe = build_qwen_image("qwen-image-edit-plus", seed=0, sample_size=32)  # QwenImageEditPlusPipeline
    pipe.save_pretrained(path)  # DiffusionPipeline.from_pretrained(path) reloads the same class (edits: see below)

Every module is float32 and built under `torch.manual_seed(seed + k)`: k = 0 transformer, 1 text encoder, 3 VAE.
None of the three depends on `kind`, so a "qwen-image" teacher and a "qwen-image-edit(-plus)" student built with
the same seed share transformer, text encoder and VAE weights (and hence one latent space).

Sizes for `sample_size` S px (a multiple of 4; S = 32 below):

- VAE `AutoencoderKLQwenImage`: base_dim 8, dim_mult (1, 2), one res block per level, z_dim 4, no temporal
  downsampling, no attention scales -> ONE downsampling stage, vae_scale_factor = 2 ** len(temperal_downsample) = 2.
  Latents are 4 x S/2 x S/2 (4 x 16 x 16); the pipelines pack them 2x2 into (S/4)^2 tokens of 16 channels (64).
  latents_mean ~ N(0, 0.1) and latents_std ~ U(0.5, 1.5) per channel (4 decimals), so the pipelines'
  (x - mean) / std normalisation is not the identity.
- transformer `QwenImageTransformer2DModel`: patch_size 2, in_channels 16 (= 4 x z_dim, the 2x2 packing),
  out_channels 4 (= z_dim), 2 layers, 2 heads of 16 (inner dim 32), axes_dims_rope (4, 6, 6) (frame/height/width,
  summing to the head dim like Qwen's (16, 56, 56)), joint_attention_dim 32 (= the text encoder's hidden size).
- text encoder `Qwen2_5_VLForConditionalGeneration`: text hidden 32, 2 layers, 4 heads (head dim 8), 2 kv heads,
  intermediate 64, mrope_section (1, 1, 2) (sums to head_dim / 2, as Qwen's (16, 24, 24) does for 128); vision tower
  depth 2, hidden 16, 2 heads, Qwen's patch 14 / temporal patch 2 / spatial merge 2, out_hidden_size 32 (= text
  hidden), window 56 px = 2 x 2 merged units, block 0 windowed and block 1 full attention (Qwen: window 112 px,
  full attention every 8th block).
- processor (edit kinds only) `ImageOnlyQwen2VLProcessor` (a Qwen2VLProcessor, see its docstring) over the PIL
  Qwen2-VL image processor with the vision tower's patch settings and min_pixels 56^2, max_pixels 128^2. The vision
  cost is set by this pixel budget, not by the patch size: whatever the pipelines hand it (QwenImageEditPipeline
  the ~1 MP VAE-sized image, QwenImageEditPlusPipeline a ~384^2 one) is smart-resized to at most 112 x 112 px
  (8 x 8 patches -> 16 image tokens, 4 attention windows); a small image is upsized to at least 56 x 56 (4 tokens).
- tokenizer: a fast Unigram tokenizer (single characters, punctuation and whole English words, from
  `danceopd.testing.vocab._unigram_pieces`) with Qwen's special tokens, each a single token: `<|endoftext|>` (pad),
  `<|im_start|>`, `<|im_end|>` (eos), `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`.
  The pipelines drop the first 34 (T2I) / 64 (edit) tokens of their fixed prompt templates; with this vocabulary
  the system turns are 94 / 219 tokens long, so only system-prompt tokens are dropped (as with Qwen's tokenizer,
  though not the same ones): the user turn and the image tokens are kept.
- scheduler: Qwen-Image's FlowMatchEulerDiscreteScheduler config (dynamic exponential shifting, base_shift 0.5,
  max_shift 0.9, shift_terminal 0.02) with the sequence lengths scaled down: S plays the role of Qwen's 1024 px
  (4096 tokens; base 256, max 8192), so max_image_seq_len = 2 * tokens(S) and base_image_seq_len = tokens(S) / 16
  (128 and 4), and S px gets mu ~ 0.69 as 1024 px does in Qwen-Image. With shift_terminal, a 1-step schedule
  is NaN (0 / 0 in the terminal stretch), in diffusers' Qwen-Image as here: use >= 2 steps.

Edit pipelines, things to know:
- reloading: model_index.json names the processor by its module's path (danceopd.models.processors), and diffusers
  resolves such a component only from modules already imported: `import danceopd.models` before
  `DiffusionPipeline.from_pretrained`.
- reference size: `__call__` resizes the source image for the VAE branch to a fixed ~1 MP area whatever
  `height`/`width` are (QwenImageEditPipeline: `calculate_dimensions(1024 * 1024, ratio)`, QwenImageEditPlusPipeline:
  `VAE_IMAGE_SIZE`); `height`/`width` only set the generated image's size. At vae_scale_factor 2 that is 512 x 512
  latents, 65536 reference tokens next to the (S/4)^2 generated ones, and a 262144-position attention in the VAE's
  mid block: ~50 s per call on 2 CPU cores. Wrap calls in `tiny_edit_image_area(S * S)` to use S x S instead.
  `encode_prompt(prompt, image=...)` has no such resize: it gives the image to the processor as it is.
"""

from __future__ import annotations

import contextlib

import torch

from danceopd.models.processors import ImageOnlyQwen2VLProcessor

KINDS = ("qwen-image", "qwen-image-edit", "qwen-image-edit-plus")

Z_DIM = 4
VAE_SCALE = 2  # 2 ** len(temperal_downsample): one downsampling stage
TEXT_HIDDEN = 32

# Qwen2-VL image processing for the tiny vision tower (see the module docstring).
VISION_PATCH = 14
VISION_MERGE = 2
VISION_MIN_PIXELS = 56 * 56
VISION_MAX_PIXELS = 128 * 128  # smart_resize floors to multiples of 28: 384^2 and 1024^2 squares both land on 112^2

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>", "<unk>"]


def _qwen_vl_tokenizer():
    """Fast Unigram tokenizer with Qwen-VL's special tokens, each one token (pad <|endoftext|>, eos <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from danceopd.testing.vocab import QWEN_CHAT_TEMPLATE, _unigram_pieces

    tok = Tokenizer(models.Unigram(_unigram_pieces(QWEN_SPECIAL_TOKENS), unk_id=QWEN_SPECIAL_TOKENS.index("<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # Registered as special tokens so they are split out before the Unigram model sees the text (one token each,
    # which the processor's <|image_pad|> expansion and the text encoder's image-token lookup rely on).
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", unk_token="<unk>",
                                   eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIAL_TOKENS[1:-1],
                                   model_max_length=32768)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def _qwen_vl_processor(tokenizer) -> ImageOnlyQwen2VLProcessor:
    """The edit pipelines' processor over `tokenizer`, with a small pixel budget (<= 112^2 px -> <= 16 image tokens)."""
    from transformers import Qwen2VLImageProcessorPil

    # The PIL backend always (the torchvision one needs torchvision), so the saved config reloads anywhere.
    image_processor = Qwen2VLImageProcessorPil(patch_size=VISION_PATCH, merge_size=VISION_MERGE, temporal_patch_size=2,
                                               min_pixels=VISION_MIN_PIXELS, max_pixels=VISION_MAX_PIXELS)
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0, mrope_section=[1, 1, 2]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=VISION_PATCH,
                           temporal_patch_size=2, spatial_merge_size=VISION_MERGE,
                           window_size=2 * VISION_MERGE * VISION_PATCH,  # 2 x 2 merged units per window
                           fullatt_block_indexes=[1], out_hidden_size=TEXT_HIDDEN),  # block 0 windowed, 1 full
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(config)


def _vae():
    from diffusers import AutoencoderKLQwenImage

    # Non-trivial per-channel latent statistics, drawn first from the VAE's seed (so they are seed-determined too).
    mean = [round(v, 4) for v in (torch.randn(Z_DIM) * 0.1).tolist()]
    std = [round(v, 4) for v in (torch.rand(Z_DIM) + 0.5).tolist()]
    return AutoencoderKLQwenImage(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                  temperal_downsample=[False], latents_mean=mean, latents_std=std)


def _transformer():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
                                       guidance_embeds=False, axes_dims_rope=(4, 6, 6))


def qwen_scheduler_config(sample_size: int = 32) -> dict:
    """Qwen-Image's scheduler config, sequence lengths scaled so `sample_size` px plays the role of 1024 px."""
    tokens = (sample_size // (2 * VAE_SCALE)) ** 2  # packed tokens at sample_size (Qwen at 1024 px: 4096)
    return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                base_image_seq_len=max(1, tokens // 16), max_image_seq_len=max(2, 2 * tokens), shift_terminal=0.02,
                time_shift_type="exponential")


def build_qwen_image(kind: str, seed: int, sample_size: int, vae_seed: int | None = None):
    """A tiny random Qwen-Image pipeline of `kind` (see KINDS) for `sample_size`-px images (not saved).

    Same `seed` -> identical weights; transformer, text encoder and VAE do not depend on `kind`.
    `sample_size` must be a positive multiple of 4 (VAE factor 2 x 2x2 packing).
    """
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                           QwenImagePipeline)

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if sample_size < 4 or sample_size % (2 * VAE_SCALE):
        raise ValueError(f"sample_size must be a positive multiple of {2 * VAE_SCALE}, got {sample_size}")
    tokenizer = _qwen_vl_tokenizer()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # modules are created float32 (no `.to()` cast afterwards)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
            torch.manual_seed(seed)
            transformer = _transformer()
            torch.manual_seed(seed + 1)
            text_encoder = _text_encoder(tokenizer)
            torch.manual_seed(seed + 3 if vae_seed is None else vae_seed)
            vae = _vae()
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**qwen_scheduler_config(sample_size))
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if kind == "qwen-image":
        pipe = QwenImagePipeline(**parts)
    else:
        cls = QwenImageEditPipeline if kind == "qwen-image-edit" else QwenImageEditPlusPipeline
        pipe = cls(processor=_qwen_vl_processor(tokenizer), **parts)
    return pipe


@contextlib.contextmanager
def tiny_edit_image_area(area: int):
    """Within the block, the edit pipelines resize the reference image for their VAE branch to ~`area` px instead of
    ~1024^2 (e.g. `area = S * S`; sizes are still rounded to multiples of 32 px, so use area >= 24^2). It is also
    their default output size when `height`/`width` are not given. QwenImageEditPipeline hands that same resized image
    to the processor; QwenImageEditPlusPipeline keeps its ~384^2 condition image for it (CONDITION_IMAGE_SIZE is left
    alone), and either way the processor brings it to 56^2..112^2 px. Patches functions of diffusers' qwenimage edit
    pipeline modules for the duration of the block (process-wide, not thread-safe) and restores them on exit."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    old_edit, old_plus = edit.calculate_dimensions, plus.calculate_dimensions

    def scaled(calc):
        # Both pipelines ask for 1024 * 1024 (edit-plus via VAE_IMAGE_SIZE); CONDITION_IMAGE_SIZE passes through.
        def calculate_dimensions(target_area, ratio):
            return calc(area if target_area == 1024 * 1024 else target_area, ratio)
        return calculate_dimensions

    edit.calculate_dimensions, plus.calculate_dimensions = scaled(old_edit), scaled(old_plus)
    try:
        yield
    finally:
        edit.calculate_dimensions, plus.calculate_dimensions = old_edit, old_plus


__all__ = ["KINDS", "ImageOnlyQwen2VLProcessor", "build_qwen_image", "qwen_scheduler_config", "tiny_edit_image_area"]
