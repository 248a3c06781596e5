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

# The 2026 families (helper research of re-saved and duplicated config.json files; FLUX.2 [dev]'s transformer from
# diffusers' convert_flux2_to_diffusers.py "flux2-dev" entry, whose published file it matches).
FLUX2_DEV_TRANSFORMER = {  # black-forest-labs/FLUX.2-dev (~32.2B parameters)
    "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
    "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}
FLUX2_KLEIN_4B_TRANSFORMER = {  # black-forest-labs/FLUX.2-klein-base-4B and -4B (~3.9B parameters)
    **FLUX2_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "guidance_embeds": False,
}
QWEN_IMAGE_TRANSFORMER = {  # Qwen/Qwen-Image, -Edit, -Edit-2509 (Plus) (~20.4B parameters)
    "_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
ZIMAGE_TURBO_TRANSFORMER = {  # Tongyi-MAI/Z-Image-Turbo (~6.15B parameters)
    "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840,
    "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}

CONFIGS = {"sd3.5-medium": ("sd3", SD35_MEDIUM_TRANSFORMER), "flux.1-dev": ("flux", FLUX1_DEV_TRANSFORMER),
           "flux.2-dev": ("flux2", FLUX2_DEV_TRANSFORMER), "flux.2-klein-4b": ("flux2-klein", FLUX2_KLEIN_4B_TRANSFORMER),
           "qwen-image": ("qwen-image", QWEN_IMAGE_TRANSFORMER), "z-image-turbo": ("z-image", ZIMAGE_TURBO_TRANSFORMER)}

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
FLUX_VAE = {**_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159}  # also Z-Image's
QWEN3_4B = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,  # (~4.0B)
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
            "tie_word_embeddings": True, "rope_theta": 1000000}
MISTRAL_SMALL_3 = {  # Mistral-Small-3.1/3.2-24B (Mistral3ForConditionalGeneration, ~24.0B with its untied output layer)
    "text_config": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                    "max_position_embeddings": 131072, "rope_theta": 1e9},
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14},
    "image_token_index": 10, "spatial_merge_size": 2, "tie_word_embeddings": False}
QWEN25_VL_7B = {  # Qwen2.5-VL-7B-Instruct, Qwen-Image's text encoder (~8.3B)
    "text_config": {"model_type": "qwen2_5_vl_text", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
                    "rope_theta": 1000000.0, "rope_scaling": {"type": "default", "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31]},
    "image_token_id": 151655, "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": False}
FLUX2_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 32, "block_out_channels": [128, 256, 512, 512],  # (~84M)
             "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
             "norm_num_groups": 32, "patch_size": [2, 2], "batch_norm_eps": 1e-4, "use_quant_conv": True, "use_post_quant_conv": True}
QWEN_IMAGE_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],  # (~127M)
                  "temperal_downsample": [False, True, True]}

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
PIPELINES.update({
    "black-forest-labs/FLUX.2-dev": {
        "transformer": ("diffusers", "Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER),
        "text_encoder": ("transformers", "Mistral3ForConditionalGeneration", MISTRAL_SMALL_3),
        "vae": ("diffusers", "AutoencoderKLFlux2", FLUX2_VAE)},
    "black-forest-labs/FLUX.2-klein-base-4B": {
        "transformer": ("diffusers", "Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER),
        "text_encoder": ("transformers", "Qwen3ForCausalLM", QWEN3_4B),
        "vae": ("diffusers", "AutoencoderKLFlux2", FLUX2_VAE)},
    "Qwen/Qwen-Image": {
        "transformer": ("diffusers", "QwenImageTransformer2DModel", QWEN_IMAGE_TRANSFORMER),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B),
        "vae": ("diffusers", "AutoencoderKLQwenImage", QWEN_IMAGE_VAE)},
    "Tongyi-MAI/Z-Image-Turbo": {
        "transformer": ("diffusers", "ZImageTransformer2DModel", ZIMAGE_TURBO_TRANSFORMER),
        "text_encoder": ("transformers", "Qwen3Model", {k: v for k, v in QWEN3_4B.items() if k != "tie_word_embeddings"}),
        "vae": ("diffusers", "AutoencoderKL", FLUX_VAE)},
})
PIPELINES["black-forest-labs/FLUX.2-klein-4B"] = PIPELINES["black-forest-labs/FLUX.2-klein-base-4B"]  # the distilled one
for _edit in ("Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509"):
    PIPELINES[_edit] = PIPELINES["Qwen/Qwen-Image"]  # the same components' shapes
PIPELINES["Tongyi-MAI/Z-Image"] = PIPELINES["Tongyi-MAI/Z-Image-Turbo"]


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
