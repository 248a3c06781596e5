"""The local files a user brings to configs/your-loras.yaml, made for tiny models: three LoRAs in three formats (a
diffusers file, a kohya / ComfyUI file, a PEFT folder), two caption folders and a Hugging Face dataset."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Modules whose ComfyUI (BFL) names are one layer each (no fused q/k/v): what a kohya-style file of one rank covers
UNFUSED_FLUX = ("attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def flux_lora_state(base: Path, rank: int, seed: int, targets=None) -> dict[str, torch.Tensor]:
    """A random LoRA (peft naming, `<module>.lora_A.weight`) for the transformer of the pipeline folder `base`."""
    from danceopd.models import family_of_folder
    from danceopd.models.base import component_config
    from danceopd.models.published import random_component
    from danceopd.testing.tiny_hub import DELTA_STD, random_lora_state

    config = component_config(base, "transformer")
    transformer = random_component("diffusers", config["_class_name"], config, "cpu", torch.float32)
    targets = targets or family_of_folder(base).default_lora_targets
    return random_lora_state(transformer, rank, tuple(targets), seed=seed, std=(DELTA_STD / rank ** 0.5) ** 0.5)


def save_diffusers_lora(state: dict, file: Path) -> Path:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(file))
    return file


def save_kohya_flux_lora(state: dict, file: Path, alpha: float) -> Path:
    """The kohya / ComfyUI layout (lora_unet_double_blocks_..., alpha keys) of a FLUX.1 LoRA, written by the family's own
    exporter; `alpha` / rank is the scale a loader applies."""
    from safetensors.torch import save_file

    from danceopd.models import get_family

    rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    kohya = get_family("flux").comfyui_lora(state, 1.0)
    for k in [k for k in kohya if k.endswith(".alpha")]:  # the file says alpha; a loader scales the update by alpha / rank
        kohya[k] = torch.tensor(float(alpha))
        up = k.replace(".alpha", ".lora_up.weight")
        kohya[up] = kohya[up] * (rank / alpha)  # so that (alpha / rank) x up x down is the adapter's update
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(file))
    return file


def save_peft_lora(state: dict, folder: Path, alpha: float, base_id: str) -> Path:
    from safetensors.torch import save_file

    rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    modules = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": modules,
                                                            "base_model_name_or_path": base_id, "bias": "none"}))
    return folder


def caption_folder(folder: Path, prompts: list[str], sizes: list[tuple[int, int]], seed: int) -> Path:
    """Images with a same-name caption each; file names (a caption folder's row uids) start with the folder's name, unique
    across the recipe's sources."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, (prompt, (w, h)) in enumerate(zip(prompts, sizes)):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        name = f"{folder.name}-{i:03d}"
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(prompt)
    return folder


def make_your_loras_files(project: Path, flux: Path) -> list[Path]:
    """Every local file configs/your-loras.yaml names, under `project` (the working directory the recipe runs from), for
    the tiny FLUX.1-dev pipeline folder `flux`."""
    import datasets

    made = [
        save_diffusers_lora(flux_lora_state(flux, 4, seed=11), project / "my-loras/watercolor.safetensors"),
        save_kohya_flux_lora(flux_lora_state(flux, 4, seed=12, targets=UNFUSED_FLUX), project / "my-loras/portrait_kohya.safetensors", 8.0),
        save_peft_lora(flux_lora_state(flux, 4, seed=13), project / "my-loras/product-peft", 8.0, "black-forest-labs/FLUX.1-dev"),
        # images of several shapes: data.buckets auto sends each to the nearest aspect ratio
        caption_folder(project / "my-data/watercolor-captions", ["a watercolor lighthouse", "a watercolor fox", "a watercolor city"],
                       [(96, 64), (64, 64), (64, 96)], seed=1),
        caption_folder(project / "my-data/portraits-captions", ["a portrait of a sailor", "a portrait of a child", "a portrait of a cat"],
                       [(64, 80), (64, 64), (80, 64)], seed=2),
    ]
    prompts = project / "my-data/prompts"
    datasets.Dataset.from_dict({"text": ["a red mug on a table", "a pair of sneakers", "a glass bottle", "a leather bag"]}).save_to_disk(str(prompts))
    return [*made, prompts]
