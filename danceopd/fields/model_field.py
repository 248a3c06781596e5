"""A velocity field backed by a model family's transformer, in that family's latent space.

`x [B, C, H, W]` are unpacked latents (pixels for the suite's pixel family); a source image, where the field
takes one, is given in the same space (`Conditions.source`). The family does everything model-specific
(prompt encoding, packing, timestep and guidance conventions); the field adds the query contract, a bounded
prompt-embedding cache and mixed precision: with a 16-bit `dtype` the call runs under autocast, so fp32
trainable weights (LoRA adapters, master weights) meet a 16-bit frozen base.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from danceopd.fields.base import Conditions, FieldInfo, check_query
from danceopd.models.base import ModelFamily, PromptCache


class ModelField:
    def __init__(self, name: str, kind: str, family: ModelFamily, pipe: Any, transformer: torch.nn.Module,
                 sample_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype, guidance: float | None = None,
                 max_sequence_length: int | None = None, prompt_cache: PromptCache | None = None, cache_size: int = 512,
                 extra: dict | None = None, bucket_shapes: tuple = ()):
        self.family, self.pipe, self.transformer = family, pipe, transformer
        self.device, self.dtype, self.guidance = device, dtype, guidance
        self.max_sequence_length = max_sequence_length = max_sequence_length or family.default_max_sequence_length
        self.info = FieldInfo(name, kind, tuple(sample_shape), takes_source=family.takes_source(transformer),
                              guidance=None, extra=dict(extra or {}), bucket_shapes=tuple(map(tuple, bucket_shapes)))
        self.prompts = prompt_cache or PromptCache(lambda p, src=None: family.encode_prompts(pipe, p, max_sequence_length)
                                                   if src is None else family.encode_prompts(pipe, p, max_sequence_length, source=src),
                                                   cache_size)

    def with_transformer(self, transformer: torch.nn.Module, name: str | None = None) -> "ModelField":
        """The same field (encoders, prompt cache) over another transformer: a DDP wrapper, an EMA copy."""
        return ModelField(name or self.info.name, self.info.kind, self.family, self.pipe, transformer, self.info.sample_shape,
                          self.device, self.dtype, self.guidance, self.max_sequence_length, self.prompts, extra=self.info.extra,
                          bucket_shapes=self.info.bucket_shapes)

    def encode_prompts(self, prompts: list[str], source: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Embeddings per prompt; per (prompt, source) where the family's text encoder also reads the source image."""
        return self.prompts(prompts, source if self.family.text_sees_source else None)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """Differentiable w.r.t. the transformer's trainable parameters; wrap in no_grad for inference."""
        check_query(self.info, x, sigma, conditions)
        h = x.to(self.device, self.dtype)
        src = None if conditions.source is None else conditions.source.to(self.device, self.dtype)
        embeds = tuple(e.to(self.device) for e in self.encode_prompts(conditions.prompts, src))
        with self.autocast():
            out = self.family.call_transformer(self.transformer, h, sigma.to(self.device), embeds, src, self.guidance)
        return out.to(x.dtype) if out.device == x.device else out.to(x.device, x.dtype)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
