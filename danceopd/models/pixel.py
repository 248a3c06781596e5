"""The capability suite's tiny pixel-space model as one more family: a small SD3 transformer (source image
channel-concatenated for edits) with a tiny CLIP text encoder over the suite's vocabulary and an offline
word-level tokenizer. Its "latents" are the suite's [-1, 1] pixels; its folder is a DanceOPD student folder
(transformer/, text_encoder/, tokenizer/), built from `PixelModelConfig` with a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from danceopd.flow.schedule import uniform_sigmas
from danceopd.models.base import Embeds, ModelFamily, quiet_loading
from danceopd.models.sd3 import call_sd3_transformer
from danceopd.suite import world


class PixelModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_size: int = Field(16, ge=4, le=128, description="image side in pixels (the suite tier's size)")
    channels: int = Field(3, ge=1, description="pixel model: image channels")
    patch_size: int = Field(2, ge=1, description="pixel model: patch side in pixels")
    num_layers: int = Field(4, ge=1, description="pixel model: transformer blocks")
    num_attention_heads: int = Field(4, ge=1, description="pixel model: attention heads per block")
    attention_head_dim: int = Field(32, ge=4, description="pixel model: channels per attention head")
    text_hidden_size: int = Field(64, ge=8, description="pixel model: width of its prompt encoder")
    text_layers: int = Field(1, ge=1, description="pixel model: layers of its prompt encoder")
    max_prompt_tokens: int = Field(16, ge=4, description="pixel model: prompt tokens (longer prompts are cut)")
    seed: int = Field(0, description="pixel model: seed of its random initialisation (init_from replaces it)")


def suite_vocabulary() -> list[str]:
    words = {"a", "make", "the", "left", "of", "above", "realistic"}
    for tier in world.TIERS.values():
        words.update(tier.colours, tier.shapes, tier.global_edits)
    return sorted(words)


def build_tokenizer(max_tokens: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + suite_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_tokens)


@dataclass
class PixelPipeline:
    """The pixel model's components, with the pipeline attributes the family code reads."""

    transformer: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    config: PixelModelConfig
    vae: None = None

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")


def build_pixel_pipeline(cfg: PixelModelConfig) -> PixelPipeline:
    """A randomly initialised pixel model (fp32, CPU), reproducible from cfg.seed."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(cfg.max_prompt_tokens)
    torch.manual_seed(cfg.seed)
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=2 * cfg.text_hidden_size,
                              num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_hidden_size // 32),
                              max_position_embeddings=cfg.max_prompt_tokens, projection_dim=cfg.text_hidden_size,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(text_cfg)
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=2 * cfg.channels, out_channels=cfg.channels,
        num_layers=cfg.num_layers, attention_head_dim=cfg.attention_head_dim, num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.text_hidden_size, caption_projection_dim=inner, pooled_projection_dim=cfg.text_hidden_size,
        pos_embed_max_size=cfg.sample_size // cfg.patch_size,
    )
    return PixelPipeline(transformer, text_encoder.requires_grad_(False).eval(), tokenizer, cfg)


def load_pixel_pipeline(path: str | Path, cfg: PixelModelConfig, dtype: torch.dtype) -> PixelPipeline:
    from diffusers import SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel

    quiet_loading()
    path = Path(path)
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype).requires_grad_(False).eval()
    return PixelPipeline(transformer, text_encoder, AutoTokenizer.from_pretrained(path / "tokenizer"), cfg)


class PixelFamily(ModelFamily):
    name = "pixel"
    latent_space = "pixel"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")

    def encode_prompts(self, pipe: PixelPipeline, prompts: list[str], max_sequence_length: int) -> Embeds:
        device = next(pipe.text_encoder.parameters()).device
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.config.max_prompt_tokens, truncation=True, return_tensors="pt")
        out = pipe.text_encoder(input_ids=ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device))
        return out.last_hidden_state, out.pooler_output

    def call_transformer(self, transformer, x, sigma, embeds, source, guidance):
        hidden, pooled = embeds
        return call_sd3_transformer(transformer, x, sigma, hidden, pooled, source, self.takes_source(transformer))

    def latent_shape(self, pipe: PixelPipeline, resolution: int):
        return (pipe.config.channels, pipe.config.sample_size, pipe.config.sample_size)

    def encode_images(self, pipe, images):
        return images  # the suite's pixel space is the model's space

    def decode_latents(self, pipe, latents):
        return latents.float().clamp(-1, 1)

    def default_sigmas(self, pipe, num_steps, sample_shape):
        return uniform_sigmas(num_steps)
