"""Z-Image (`ZImagePipeline`): one Qwen3 text encoder whose second-to-last hidden state, with the padding dropped, is
the caption (a list of per-prompt tensors of their own lengths, after the tokenizer's chat template); the transformer
takes lists (one [C, 1, H, W] latent per sample), timestep = 1 - sigma, and predicts the negated velocity; the sigma
grid is linspace(1, 1/N, N) through the scheduler (its static shift, or the token-count shift where the config asks).
No native image input."""

from __future__ import annotations

from typing import Any

import torch

from danceopd.models.base import Embeds, ModelFamily, scheduler_sigmas, text_device


class ZImageFamily(ModelFamily):
    name = "z-image"
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline")
    latent_space = "z-image"
    default_max_sequence_length = 512  # ZImagePipeline's max_sequence_length
    latent_patch = 2
    default_lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")

    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> Embeds:
        """(captions [B, L, D] zero-padded to max_sequence_length, lengths [B]): the pipeline's per-prompt tensors in one
        batch; call_transformer hands each prompt its own length again."""
        captions, _ = pipe.encode_prompt(prompt=list(prompts), device=text_device(pipe), do_classifier_free_guidance=False,
                                         max_sequence_length=max_sequence_length)  # (a copy: it templates the list in place)
        dim = captions[0].shape[-1]
        padded = captions[0].new_zeros(len(captions), max_sequence_length, dim)
        for i, c in enumerate(captions):
            padded[i, :len(c)] = c
        lengths = torch.tensor([len(c) for c in captions], device=padded.device)
        return padded, lengths

    def takes_source(self, transformer: torch.nn.Module) -> bool:
        return False

    def call_transformer(self, transformer, x, sigma, embeds, source, guidance):
        captions, lengths = embeds
        caps = [captions[i, :int(lengths[i])].to(x.dtype) for i in range(x.shape[0])]
        t = (1000.0 - sigma.to(torch.float32) * 1000.0) / 1000.0  # the pipeline's (1000 - timestep) / 1000, timestep = 1000 sigma
        out = transformer(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the pipeline steps the scheduler with the negated prediction

    def _latent_channels(self, pipe):
        return pipe.transformer.config.in_channels

    def default_sigmas(self, pipe, num_steps, sample_shape):
        c, h, w = sample_shape
        return scheduler_sigmas(pipe, num_steps, (h // 2) * (w // 2), linspace_sigmas=True)

    def comfyui_lora(self, lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """Z-Image in ComfyUI's NextDiT names: the attention's q, k, v fused into `attention.qkv`, its output
        `attention.out` (danceopd.models.comfyui)."""
        from danceopd.models.comfyui import fuse, pairs, put

        out: dict[str, torch.Tensor] = {}
        mods = pairs(lora, scale)
        for module, pair in mods.items():
            head, _, leaf = module.rpartition(".")
            if head.endswith("attention") and leaf in ("to_q", "to_k", "to_v"):
                if leaf == "to_q" or (f"{head}.to_q" not in mods and leaf == "to_k"):
                    put(out, f"{head}.qkv", fuse([mods.get(f"{head}.{p}") for p in ("to_q", "to_k", "to_v")], f"{head}.qkv",
                                                ["to_q", "to_k", "to_v"]))
                continue
            put(out, module.replace("attention.to_out.0", "attention.out"), pair)
        return out
