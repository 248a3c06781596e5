"""The student: a tiny diffusers flow-matching transformer (SD3Transformer2DModel) with a tiny CLIP text
encoder over the suite's vocabulary and an offline word-level tokenizer.

Edits condition on the source image by channel concatenation (in_channels = 2 x image channels; zeros
for text-to-image). The text encoder is random-init and frozen (its prompt embeddings are cached): with a
closed vocabulary it only has to keep prompts apart, and the transformer learns to read them.
Saved and loaded the diffusers/transformers way: transformer/, text_encoder/, tokenizer/ subfolders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from danceopd.fields.diffusers_field import STUDENT_MARKER, TransformerField, resolve_device, resolve_dtype
from danceopd.suite import world


class StudentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_size: int = Field(16, ge=4, le=128, description="image side in pixels (the suite tier's size)")
    channels: int = Field(3, ge=1)
    patch_size: int = Field(2, ge=1)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=4)
    text_hidden_size: int = Field(64, ge=8)
    text_layers: int = Field(1, ge=1)
    max_prompt_tokens: int = Field(16, ge=4)
    seed: int = 0


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
class Student:
    """Holds the trainable field and what is needed to save it."""

    field: TransformerField
    text_encoder: torch.nn.Module
    tokenizer: object
    config: StudentConfig

    @property
    def transformer(self) -> torch.nn.Module:
        return self.field.transformer

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.field.transformer.save_pretrained(path / "transformer")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        (path / STUDENT_MARKER).write_text(json.dumps({"format": 1, "config": self.config.model_dump()}, indent=2))


def _make_field(transformer, text_encoder, tokenizer, cfg: StudentConfig, device, dtype, name: str) -> Student:
    text_encoder.requires_grad_(False).eval()

    def encode(prompts: list[str]):
        ids = tokenizer(prompts, padding="max_length", max_length=cfg.max_prompt_tokens, truncation=True, return_tensors="pt")
        out = text_encoder(input_ids=ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device))
        return out.last_hidden_state, out.pooler_output

    field = TransformerField(name, "student", transformer, encode, (cfg.channels, cfg.sample_size, cfg.sample_size), device, dtype)
    return Student(field, text_encoder, tokenizer, cfg)


def with_transformer(student: Student, transformer: torch.nn.Module, name: str | None = None) -> Student:
    """The same student (encoders, tokenizer, config) with other transformer weights, e.g. an EMA copy."""
    f = student.field
    field = TransformerField(name or f.info.name, f.info.kind, transformer, f._encode, f.info.sample_shape, f.device, f.dtype)
    field._cache = f._cache  # same frozen encoders: share the prompt-embedding cache
    return Student(field, student.text_encoder, student.tokenizer, student.config)


def build_student(cfg: StudentConfig, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", name: str = "student") -> Student:
    """A randomly initialised student, reproducible from cfg.seed."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
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
    if dt != torch.float32:
        transformer, text_encoder = transformer.to(dtype=dt), text_encoder.to(dtype=dt)
    return _make_field(transformer.to(dev), text_encoder.to(dev), tokenizer, cfg, dev, dt, name)


def load_student(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", name: str = "student") -> Student:
    from diffusers import SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(path)
    marker = path / STUDENT_MARKER
    if not marker.exists():
        raise ValueError(f"{path} is not a DanceOPD student folder (no {STUDENT_MARKER})")
    cfg = StudentConfig(**json.loads(marker.read_text())["config"])
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    transformer = SD3Transformer2DModel.from_pretrained(path / "transformer", dtype=dt).to(dev)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dt).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    return _make_field(transformer, text_encoder, tokenizer, cfg, dev, dt, name)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
