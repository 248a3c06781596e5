"""FLUX.2 [dev] (`Flux2Pipeline`) and FLUX.2 [klein] (`Flux2KleinPipeline`): one transformer class, one VAE, one latent
space. [klein]: a Qwen3 text encoder whose hidden states of layers (9, 18, 27) are stacked per token (after the
tokenizer's chat template); [dev]: Mistral-3 (Small 3.1, 24B) with a system message, layers (10, 20, 30) stacked, and a
guidance embedding (guidance-distilled: the embedded value, default 4.0, is the knob; no true CFG). Both: AutoencoderKLFlux2 latents patchified 2x2 (4 x 32 channels at /16) and
normalised by the VAE's batch-norm statistics: that normalised, patchified grid is this family's sample space, packed
token by token with 4-D position ids (t, h, w, l); timestep = sigma; the sigma grid linspace(1, 1/N, N) shifted by the
pipeline's empirical mu (a function of the token count and N). Edits: the source image's latents, in the same space,
are reference tokens after the noisy ones (ids t = 10), the velocity read off the first tokens, as the pipeline does
with `image=`."""

from __future__ import annotations

from typing import Any

import torch

from danceopd.models.base import Embeds, ModelFamily, text_device

REFERENCE_T = 10  # Flux2KleinPipeline._prepare_image_ids: the first reference image's time coordinate (scale + scale * 0)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] VAE latents -> [B, 4C, H/2, W/2], the order of Flux2KleinPipeline._patchify_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def position_ids(b: int, h: int, w: int, t: int, device) -> torch.Tensor:
    """[B, h*w, 4] ids (t, row, col, 0) of a grid's tokens, row-major as _pack_latents orders them."""
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(b, -1, -1).to(device)


def _bn(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


class Flux2KleinFamily(ModelFamily):
    name = "flux2-klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    native_source = True  # reference images are tokens
    latent_space = "flux2"
    default_max_sequence_length = 512
    # double blocks: attention and both feed-forwards; single blocks: the fused qkv + MLP input projection (their output
    # projection shares the name attn.to_out with the double blocks' ModuleList, which a suffix cannot tell apart)
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                            "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                            "ff_context.linear_out", "attn.to_qkv_mlp_proj")

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> Embeds:
        embeds, _ = pipe.encode_prompt(prompt=list(prompts), device=text_device(pipe), max_sequence_length=max_sequence_length)
        return (embeds,)

    def takes_source(self, transformer):
        return True

    def call_transformer(self, transformer, x, sigma, embeds, source, guidance):
        (hidden,) = embeds
        b, c, h, w = x.shape
        tokens, ids = x.reshape(b, c, h * w).permute(0, 2, 1), position_ids(b, h, w, 0, x.device)
        n = tokens.shape[1]
        if source is not None:  # the reference image's tokens after the noisy ones
            s = source.to(x.dtype)
            tokens = torch.cat([tokens, s.reshape(b, c, -1).permute(0, 2, 1)], dim=1)
            ids = torch.cat([ids, position_ids(b, s.shape[2], s.shape[3], REFERENCE_T, x.device)], dim=1)
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(hidden.shape[1]))
        txt_ids = txt_ids.unsqueeze(0).expand(b, -1, -1).to(x.device)
        cfg = getattr(transformer, "module", transformer).config
        g = None
        if cfg.guidance_embeds:
            g = torch.full((b,), self.default_guidance if guidance is None else guidance, device=x.device, dtype=torch.float32)
        out = transformer(hidden_states=tokens, timestep=sigma.to(x.dtype), guidance=g, encoder_hidden_states=hidden.to(x.dtype),
                          txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
        return out[:, :n].permute(0, 2, 1).reshape(b, c, h, w)

    # ----------------------------------------------------------------------------- latent space: normalised patches
    latent_patch = 2

    def latent_shape(self, pipe, resolution):
        c, h, w = super().latent_shape(pipe, resolution)
        return (pipe.transformer.config.in_channels, h // 2, w // 2)  # the patchified grid

    def sample_shape_of(self, path, resolution):
        shape = super().sample_shape_of(path, resolution)
        return None if shape is None else (shape[0] * 4, shape[1] // 2, shape[2] // 2)

    def encode_images(self, pipe, images):
        vae = pipe.vae
        with torch.no_grad():
            z = patchify(vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode())
        mean, std = _bn(vae, z)
        return (z - mean) / std

    def decode_latents(self, pipe, latents):
        vae = pipe.vae
        z = latents.to(vae.device, vae.dtype)
        mean, std = _bn(vae, z)
        with torch.no_grad():
            return vae.decode(unpatchify(z * std + mean), return_dict=False)[0].float().clamp(-1, 1)

    def default_sigmas(self, pipe, num_steps, sample_shape):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        c, h, w = sample_shape
        sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        sched.set_timesteps(num_inference_steps=num_steps if sigmas is None else None, sigmas=sigmas,
                            mu=compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps))
        return sched.sigmas.to(torch.float32).cpu()


class Flux2Family(Flux2KleinFamily):
    """FLUX.2 [dev]: the [klein] conventions (the two pipelines' packing, ids, grid and reference tokens are the same code)
    with Mistral-3 prompts (its encode_prompt takes the same arguments) and the guidance embedding."""
    name = "flux2"
    pipeline_classes = ("Flux2Pipeline",)
    default_guidance = 4.0  # Flux2Pipeline's default guidance_scale (an embedded value, not CFG)
