"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): two CLIP encoders (+ optional T5), pooled projections,
timestep = 1000 * sigma, a static-shift sigma grid. No native image input: an edit student reads the source
latents on extra input channels (zero-initialised, so it starts as the base; see danceopd.student)."""

from __future__ import annotations

from typing import Any

import torch

from danceopd.models.base import Embeds, ModelFamily, scheduler_sigmas, text_device, vae_geometry


def call_sd3_transformer(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, hidden: torch.Tensor,
                         pooled: torch.Tensor, source: torch.Tensor | None, takes_source: bool) -> torch.Tensor:
    """The SD3 transformer as the pipeline calls it; a source image (or zeros) is concatenated on channels when
    the transformer's input layer was grown for it."""
    h = x
    if takes_source:
        h = torch.cat([x, source.to(x.dtype) if source is not None else torch.zeros_like(x)], dim=1)
    # diffusers flow-match transformers take t = 1000 * sigma (the schedulers' num_train_timesteps)
    timestep = sigma.to(torch.float32) * 1000.0
    return transformer(hidden_states=h, timestep=timestep, encoder_hidden_states=hidden.to(x.dtype),
                       pooled_projections=pooled.to(x.dtype), return_dict=False)[0]


INPUT_LAYER = "pos_embed.proj"  # the patch-embedding convolution that reads the latent channels


def grow_input_for_source(transformer: torch.nn.Module) -> torch.nn.Module:
    """Double the patch embedding's input channels for source latents, the new weights zero (the InstructPix2Pix
    way): the transformer answers exactly as before until training moves them. Idempotent."""
    proj = transformer.pos_embed.proj
    c = transformer.config.out_channels or transformer.config.in_channels
    if proj.in_channels == 2 * c:
        return transformer
    grown = torch.nn.Conv2d(2 * c, proj.out_channels, proj.kernel_size, proj.stride, proj.padding, bias=proj.bias is not None,
                            device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[:, :c] = proj.weight
        if proj.bias is not None:
            grown.bias.copy_(proj.bias)
    transformer.pos_embed.proj = grown
    transformer.register_to_config(in_channels=2 * c, out_channels=c)
    return transformer


class SD3Family(ModelFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    latent_space = "sd3"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                            "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                            "ff_context.net.2")

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> Embeds:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=text_device(pipe),
                                                  do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return embeds, pooled

    def call_transformer(self, transformer, x, sigma, embeds, source, guidance):
        hidden, pooled = embeds
        return call_sd3_transformer(transformer, x, sigma, hidden, pooled, source, self.takes_source(transformer))

    def size_multiple(self, path):
        """The VAE's factor x the transformer's patch_size (2 in SD3 / 3.5): the patch embedding's stride."""
        import json

        from danceopd.models.hub import local_dir

        folder = None if path is None else local_dir(path)
        config = None if folder is None else folder / "transformer" / "config.json"
        patch = json.loads(config.read_text()).get("patch_size", 2) if config is not None and config.is_file() else 2
        geometry = None if path is None else vae_geometry(path)
        return patch * (8 if geometry is None else geometry[1])

    def default_sigmas(self, pipe, num_steps, sample_shape):
        c, h, w = sample_shape
        p = pipe.transformer.config.patch_size
        return scheduler_sigmas(pipe, num_steps, (h // p) * (w // p), linspace_sigmas=False)
