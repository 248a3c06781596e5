"""Model families: one module each, registered here by name. A family knows its pipeline class, prompt
encoding, transformer call, latent space and sigma grid (see base.ModelFamily)."""

from __future__ import annotations

from pathlib import Path

from danceopd.models.base import ModelFamily, PromptCache, model_index
from danceopd.models.flux import FluxFamily, FluxKontextFamily
from danceopd.models.pixel import PixelFamily
from danceopd.models.sd3 import SD3Family

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (PixelFamily(), SD3Family(), FluxFamily(), FluxKontextFamily())}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: choose from {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_folder(path: str | Path) -> ModelFamily | None:
    """The family of a local pipeline folder (from model_index.json), or None for a hub id / unknown layout."""
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
    """Whether a teacher of family b can teach a student of family a: the same latent space and transformer call."""
    return a.latent_space == b.latent_space


__all__ = ["FAMILIES", "ModelFamily", "PromptCache", "compatible", "family_of_folder", "get_family", "model_index"]
