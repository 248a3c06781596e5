"""Published configs of the real models' components (facts from their model repositories' config.json files), to
build them randomly initialised on a GPU for benchmarks, or on the meta device to count parameters and plan memory
(danceopd.memory_plan), without weights or network."""

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

# Text encoders (transformers classes) and VAEs (diffusers), as the pipelines' subfolders hold them.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,  # ViT-L/14 text (~123M)
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,  # bigG/14 text (~695M)
          "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,  # v1.1 XXL encoder (~4.76B)
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_encoder_decoder": False}
_VAE16 = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}  # (~84M)
SD3_VAE = {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {**_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# Hub id -> {component: (library, class, config)}: the pipelines the shipped recipes name (model_index.json layout).
PIPELINES = {
    "stabilityai/stable-diffusion-3.5-medium": {
        "transformer": ("diffusers", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", SD3_VAE)},
    "black-forest-labs/FLUX.1-dev": {
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX1_DEV_TRANSFORMER),
        "text_encoder": ("transformers", "CLIPTextModel", {k: v for k, v in CLIP_L.items() if k != "projection_dim"}),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", FLUX_VAE)},
}
PIPELINES["black-forest-labs/FLUX.1-Kontext-dev"] = PIPELINES["black-forest-labs/FLUX.1-dev"]  # the same shapes


def meta_component(library: str, class_name: str, config: dict):
    """One pipeline component on the meta device, from its config (a diffusers model or a transformers one)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):  # every tensor on meta: no memory, allowed in a job driver
        return _construct(library, class_name, config)


def random_component(library: str, class_name: str, config: dict, device, dtype, seed: int = 0):
    """One pipeline component with its classes' own random initialisation, built on `device` and cast to `dtype`,
    frozen: the real model's shapes and cost without its weights (the GPU check; no download)."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        module = _construct(library, class_name, config)
    return module.to(dtype).requires_grad_(False).eval()


def _construct(library: str, class_name: str, config: dict):
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, class_name).from_config(config)
    import transformers

    cls = getattr(transformers, class_name)
    return cls._from_config(cls.config_class(**config))


def meta_transformer(config: dict):
    """The transformer on the meta device: shapes and module names, no memory."""
    return meta_component("diffusers", config["_class_name"], config)


def lora_parameter_count(model, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of a rank-`rank` LoRA on the linear layers whose names end with one of `targets`."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total
