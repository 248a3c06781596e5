"""Model families: one module each, registered here by name. A family knows its pipeline class, prompt
encoding, transformer call, latent space and sigma grid (see base.ModelFamily)."""

from __future__ import annotations

import json
from pathlib import Path

from danceopd.models.base import ModelFamily, PromptCache, model_index
from danceopd.models.hub import file_digest, local_dir
from danceopd.models.flux import FluxFamily, FluxKontextFamily
from danceopd.models.flux2 import Flux2Family, Flux2KleinFamily
from danceopd.models.pixel import PixelFamily
from danceopd.models import processors  # noqa: F401  registers the stand-in processors for diffusers' loader
from danceopd.models.qwenimage import QwenImageEditFamily, QwenImageEditPlusFamily, QwenImageFamily
from danceopd.models.sd3 import SD3Family
from danceopd.models.zimage import ZImageFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (PixelFamily(), SD3Family(), FluxFamily(), FluxKontextFamily(), Flux2Family(), Flux2KleinFamily(),
                                                  ZImageFamily(), QwenImageFamily(), QwenImageEditFamily(), QwenImageEditPlusFamily())}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_folder(path: str | Path) -> ModelFamily | None:
    """The family of a pipeline from its model_index.json (a local folder's, or a hub id's in the Hugging Face cache), or
    None when there is none (a hub id not in the cache)."""
    index = model_index(path)
    if index is None:
        return None
    cls = str(index.get("_class_name", ""))
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    raise ValueError(f"{path}/model_index.json names {cls!r}; supported pipelines: "
                     f"{sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)}")


def compatible(a: ModelFamily, b: ModelFamily) -> bool:
    """Whether a teacher of family b can teach a student of family a: the same latent space (the families' tag; each
    calls its own transformer and encodes prompts with its own encoder)."""
    return a.latent_space == b.latent_space


VAE_KEYS = ("_class_name", "latent_channels", "block_out_channels", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
            "batch_norm_eps", "patch_size", "z_dim", "base_dim", "dim_mult", "temperal_downsample")


def latent_space_difference(student_base: str | Path, teacher_base: str | Path) -> str | None:
    """Why two pipelines' latents are not the same space (None when they are, or when either's VAE is not on this machine:
    a hub id not in the cache): their VAEs differ in class, geometry, scaling/shift or per-channel statistics (config), or
    in weights (file contents)."""
    folders = [local_dir(p) for p in (student_base, teacher_base)]
    if None in folders:
        return None
    a, b = (f / "vae" for f in folders)
    if not (a / "config.json").exists() or not (b / "config.json").exists() or a.resolve() == b.resolve():
        return None
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    for key in VAE_KEYS:
        if ca.get(key) != cb.get(key):
            return f"their VAEs differ in {key} ({ca.get(key)!r} vs {cb.get(key)!r})"
    weights = [sorted(p.glob("*.safetensors")) for p in (a, b)]
    digests = [[file_digest(f) for f in files] for files in weights]
    if digests[0] != digests[1]:
        return "their VAEs have other weights (the same architecture, different checksums)"
    return None


__all__ = ["FAMILIES", "ModelFamily", "PromptCache", "compatible", "family_of_folder", "get_family",
           "latent_space_difference", "model_index"]
