"""FLUX.1 (`FluxPipeline`) and FLUX.1 Kontext (`FluxKontextPipeline`): CLIP (pooled) + T5 prompts, latents packed
into 2x2-patch tokens with (0, row, col) position ids, a guidance embedding (FLUX.1-dev), timestep = sigma, and a
sigma grid shifted by the image's token count. Kontext appends the clean source latent's tokens to the sequence
(ids (1, row, col)) and reads the velocity off the first tokens only: the real edit teacher and student."""

from __future__ import annotations

from typing import Any

import torch

from danceopd.models.base import Embeds, ModelFamily, scheduler_sigmas, text_device


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], the order of FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def position_ids(h: int, w: int, first: float, device, dtype) -> torch.Tensor:
    """[(H/2)(W/2), 3] ids (first, row, col) of the packed tokens; first = 0 for the image, 1 for a Kontext source."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    latent_space = "flux"
    default_guidance = 3.5  # FluxPipeline's default guidance_scale (FLUX.1-dev's embedded guidance)
    latent_patch = 2
    default_max_sequence_length = 512
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                            "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                            "ff_context.net.2", "proj_mlp", "proj_out")

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> Embeds:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=text_device(pipe),
                                               max_sequence_length=max_sequence_length)
        return embeds, pooled

    def takes_source(self, transformer):
        return self.native_source

    def call_transformer(self, transformer, x, sigma, embeds, source, guidance):
        hidden, pooled = embeds
        b, _, h, w = x.shape
        tokens, ids = pack(x), position_ids(h, w, 0.0, x.device, x.dtype)
        n = tokens.shape[1]
        if self.native_source and source is not None:  # Kontext: clean source tokens after the noisy ones
            tokens = torch.cat([tokens, pack(source.to(x.dtype))], dim=1)
            ids = torch.cat([ids, position_ids(h, w, 1.0, x.device, x.dtype)], dim=0)
        cfg = getattr(transformer, "module", transformer).config
        g = None
        if cfg.guidance_embeds:
            g = torch.full((b,), self.default_guidance if guidance is None else guidance, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype)
        # FluxPipeline passes timestep / 1000 = sigma; the transformer scales it by 1000 itself.
        out = transformer(hidden_states=tokens, timestep=sigma.to(x.dtype), guidance=g, pooled_projections=pooled.to(x.dtype),
                          encoder_hidden_states=hidden.to(x.dtype), txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
        return unpack(out[:, :n], h, w)

    def _latent_channels(self, pipe):
        return pipe.transformer.config.in_channels // 4

    def default_sigmas(self, pipe, num_steps, sample_shape):
        c, h, w = sample_shape
        return scheduler_sigmas(pipe, num_steps, (h // 2) * (w // 2), linspace_sigmas=True)


class FluxKontextFamily(FluxFamily):
    name = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    native_source = True
    default_guidance = 2.5  # FluxKontextPipeline's default guidance_scale
