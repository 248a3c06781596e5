"""Published transformer configs of the real models (facts from their model cards' config.json), to build them
randomly initialised on a GPU for benchmarks, or on the meta device to count parameters, without weights."""

from __future__ import annotations

SD35_MEDIUM_TRANSFORMER = {  # stabilityai/stable-diffusion-3.5-medium transformer/config.json (~2.2B parameters)
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}

FLUX1_DEV_TRANSFORMER = {  # black-forest-labs/FLUX.1-dev transformer/config.json (~11.9B parameters)
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}

CONFIGS = {"sd3.5-medium": ("sd3", SD35_MEDIUM_TRANSFORMER), "flux.1-dev": ("flux", FLUX1_DEV_TRANSFORMER)}


def meta_transformer(config: dict):
    """The transformer on the meta device: shapes and module names, no memory."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights(include_buffers=True):  # every tensor on meta: no memory, allowed in a job driver
        return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def lora_parameter_count(model, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of a rank-`rank` LoRA on the linear layers whose names end with one of `targets`."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total
