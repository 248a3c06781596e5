"""Qwen-Image (`QwenImagePipeline`) and its editors (`QwenImageEditPipeline`, `QwenImageEditPlusPipeline`): one latent
space. AutoencoderKLQwenImage latents are 5-D [B, C, frames=1, H, W], normalised per channel by the VAE config's
latents_mean / latents_std: that normalised grid, without the frame axis, is this family's sample space [B, C, H, W],
packed 2x2 into tokens of 4C channels with `img_shapes` [(1, H/2, W/2)] for the transformer's RoPE; timestep = sigma;
the grid is linspace(1, 1/N, N) through the scheduler with the token-count shift (mu from the scheduler config;
exponential time shift and shift_terminal are the scheduler's own).

Prompts: Qwen2.5-VL's last hidden state after the pipeline's chat template, its first 34 (T2I) or 64 (edit) tokens
dropped, padding removed. Each prompt is encoded alone (an embedding must not depend on its batch); a batch pads them
to its longest with a mask, which is None when all are the same length, as the pipelines do.

Edits: the source image's latents (same space) are tokens after the noisy ones, with their own img_shapes entry; the
velocity is read off the first tokens. In the edit pipelines the text encoder also SEES the source image (the
processor's image tokens), so an edit prompt's embedding depends on (prompt, source image). Here a condition is the
source's latent (it is what queries carry over the wire); every party recovers the encoder's image from it the same
way (the VAE's decode, resized to the pipeline's condition size), and caches key on (prompt, source latent). That image
is the VAE reconstruction of the original, not the original itself: the one departure from the pipelines, which see
the user's file. True CFG's norm rescale (the pipelines' `true_cfg_scale`) is the pipelines' sampling-time guidance;
a CFG route here combines the teacher's conditional and unconditional velocities as every family does.
"""

from __future__ import annotations

from typing import Any

import torch

from danceopd.models.base import Embeds, ModelFamily, image_size, scheduler_sigmas, text_device
from danceopd.models.flux import pack, unpack  # QwenImagePipeline._pack_latents packs 2x2 patches in FLUX's order


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def pad_captions(captions: list[torch.Tensor]) -> Embeds:
    """Per-prompt captions [L_i, D] -> ([B, max L, D] zero-padded, lengths [B])."""
    longest = max(c.shape[0] for c in captions)
    padded = captions[0].new_zeros(len(captions), longest, captions[0].shape[-1])
    for i, c in enumerate(captions):
        padded[i, :c.shape[0]] = c
    return padded, torch.tensor([c.shape[0] for c in captions], device=padded.device)


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    pipeline_classes = ("QwenImagePipeline",)
    latent_space = "qwen-image"
    default_max_sequence_length = 1024  # the pipelines' max_sequence_length (tokens kept after the template's prefix)
    latent_patch = 2
    # attention of both streams and both feed-forwards (diffusers' and the Qwen-Image LoRA trainers' targets)
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                            "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                            "txt_mlp.net.2")

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int, source: torch.Tensor | None = None) -> Embeds:
        """(captions [B, L, D] padded to the batch's longest, lengths [B]); every prompt encoded alone."""
        device = text_device(pipe)
        captions = []
        for i, prompt in enumerate(prompts):
            kwargs = {} if source is None else {"image": self.condition_image(pipe, source[i:i + 1])}
            embeds, _ = pipe.encode_prompt(prompt=[prompt], device=device, max_sequence_length=max_sequence_length, **kwargs)
            captions.append(embeds[0])
        return pad_captions(captions)

    def condition_image(self, pipe: Any, source: torch.Tensor):
        raise NotImplementedError  # only the editors' text encoders see the image

    def call_transformer(self, transformer, x, sigma, embeds, source, guidance):
        captions, lengths = embeds
        b, c, h, w = x.shape
        longest = int(lengths.max())
        mask = torch.arange(longest, device=x.device)[None] < lengths.to(x.device)[:, None]
        tokens, shapes = pack(x), [(1, h // 2, w // 2)]
        n = tokens.shape[1]
        if source is not None:  # the source's tokens after the noisy ones, with their own RoPE grid
            tokens = torch.cat([tokens, pack(source.to(x.dtype))], dim=1)
            shapes.append((1, source.shape[2] // 2, source.shape[3] // 2))
        cfg = getattr(transformer, "module", transformer).config
        g = None
        if cfg.guidance_embeds:
            g = torch.full((b,), self.default_guidance if guidance is None else guidance, device=x.device, dtype=torch.float32)
        t = (sigma.to(torch.float32) * 1000.0) / 1000.0  # the pipeline's timestep / 1000, timestep = 1000 sigma
        out = transformer(hidden_states=tokens, timestep=t.to(x.dtype), guidance=g, encoder_hidden_states=captions[:, :longest].to(x.dtype),
                          encoder_hidden_states_mask=None if bool(mask.all()) else mask, img_shapes=[shapes] * b, return_dict=False)[0]
        return unpack(out[:, :n], h, w)

    # ----------------------------------------------------------------------------- latent space: normalised 5-D latents
    def latent_shape(self, pipe, resolution):
        f = pipe.vae_scale_factor
        w, h = image_size(resolution)
        if w % (2 * f) or h % (2 * f):
            raise ValueError(f"{self.name} packs 2x2 latent patches: image sides must be multiples of {2 * f}, got {w}x{h}")
        c = pipe.vae.config.z_dim if pipe.vae is not None else pipe.transformer.config.out_channels
        return (c, h // f, w // f)

    def encode_images(self, pipe, images):
        vae = pipe.vae
        with torch.no_grad():
            z = vae.encode(images.to(vae.device, vae.dtype)[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = _stats(vae, z)
        return (z - mean) / std

    def decode_latents(self, pipe, latents):
        vae = pipe.vae
        z = latents.to(vae.device, vae.dtype)
        mean, std = _stats(vae, z)
        with torch.no_grad():
            return vae.decode((z * std + mean)[:, :, None], return_dict=False)[0][:, :, 0].float().clamp(-1, 1)

    def default_sigmas(self, pipe, num_steps, sample_shape):
        c, h, w = sample_shape
        return scheduler_sigmas(pipe, num_steps, (h // 2) * (w // 2), linspace_sigmas=True)

    def comfyui_lora(self, lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """Qwen-Image keeps its original module names in diffusers (and ComfyUI): the kohya layout is a renaming
        (danceopd.models.comfyui)."""
        from danceopd.models.comfyui import pairs, put

        out: dict[str, torch.Tensor] = {}
        for module, pair in pairs(lora, scale).items():
            put(out, module, pair)
        return out


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: source tokens, and the source (at ~1024^2 px, the pipeline's calculated size) in the prompt."""
    name = "qwen-image-edit"
    pipeline_classes = ("QwenImageEditPipeline",)
    native_source = True  # the source's latents are tokens
    text_sees_source = True

    def condition_size(self, width: int, height: int) -> tuple[int, int]:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        w, h, _ = calculate_dimensions(1024 * 1024, width / height)
        return w, h

    def condition_image(self, pipe, source):
        """The image the pipeline's text encoder would see, recovered from one source latent [1, C, H, W]."""
        pixels = self.decode_latents(pipe, source)
        image = pipe.image_processor.postprocess(pixels, output_type="pil")[0]
        w, h = self.condition_size(*image.size)
        return pipe.image_processor.resize(image, h, w)


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit Plus (2509): the source enters the prompt at ~384^2 px ("Picture 1: ..."), a list of images."""
    name = "qwen-image-edit-plus"
    pipeline_classes = ("QwenImageEditPlusPipeline",)

    def condition_size(self, width, height):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

        return calculate_dimensions(CONDITION_IMAGE_SIZE, width / height)

    def condition_image(self, pipe, source):
        return [super().condition_image(pipe, source)]
