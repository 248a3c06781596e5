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


    def comfyui_lora(self, lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """FLUX.1 in its original (BFL, ComfyUI) names: double_blocks.i.{img,txt}_attn.qkv (q, k, v fused),
        *_attn.proj, *_mlp.{0,2}, *_mod.lin; single_blocks.i.linear1 (q, k, v and the MLP input fused), linear2,
        modulation.lin; final_layer.linear and final_layer.adaLN_modulation.1 (danceopd.models.comfyui)."""
        import re

        from danceopd.models.comfyui import fuse, pairs, put

        mods, out, groups = pairs(lora, scale), {}, {}
        for module, pair in mods.items():
            if module == "norm_out.linear":  # diffusers keeps (scale, shift), the original (shift, scale)
                put(out, "final_layer.adaLN_modulation.1", (pair[0], torch.cat(pair[1].chunk(2, dim=0)[::-1])))
            elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.(to|add)_[qkv](_proj)?", module):
                i, img = m.group(1), m.group(2) == "to"
                groups[f"double_blocks.{i}.{'img' if img else 'txt'}_attn.qkv"] = [
                    f"transformer_blocks.{i}.attn.to_{p}" if img else f"transformer_blocks.{i}.attn.add_{p}_proj" for p in "qkv"]
            elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(attn\.to_[qkv]|proj_mlp)", module):
                i = m.group(1)
                groups[f"single_blocks.{i}.linear1"] = [f"single_transformer_blocks.{i}.{p}" for p in
                                                        ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
            else:
                for pattern, target in FLUX_ORIGINAL_NAMES.items():
                    if m := re.fullmatch(pattern, module):
                        put(out, target.format(*m.groups()), pair)
                        break
                else:
                    raise ValueError(f"{module}: no ComfyUI (original FLUX) name for this module; leave it out of the LoRA targets")
        for target, names in groups.items():
            put(out, target, fuse([mods.get(n) for n in names], target, names))
        return out


FLUX_ORIGINAL_NAMES = {  # diffusers module (regex) -> the original FLUX.1 layer it is
    r"transformer_blocks\.(\d+)\.attn\.to_out\.0": "double_blocks.{}.img_attn.proj",
    r"transformer_blocks\.(\d+)\.attn\.to_add_out": "double_blocks.{}.txt_attn.proj",
    r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj": "double_blocks.{}.img_mlp.0",
    r"transformer_blocks\.(\d+)\.ff\.net\.2": "double_blocks.{}.img_mlp.2",
    r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj": "double_blocks.{}.txt_mlp.0",
    r"transformer_blocks\.(\d+)\.ff_context\.net\.2": "double_blocks.{}.txt_mlp.2",
    r"transformer_blocks\.(\d+)\.norm1\.linear": "double_blocks.{}.img_mod.lin",
    r"transformer_blocks\.(\d+)\.norm1_context\.linear": "double_blocks.{}.txt_mod.lin",
    r"single_transformer_blocks\.(\d+)\.proj_out": "single_blocks.{}.linear2",
    r"single_transformer_blocks\.(\d+)\.norm\.linear": "single_blocks.{}.modulation.lin",
    r"proj_out": "final_layer.linear",
}


class FluxKontextFamily(FluxFamily):
    name = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    native_source = True
    default_guidance = 2.5  # FluxKontextPipeline's default guidance_scale
