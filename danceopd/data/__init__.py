"""Datasets from files: manifests that feed each training route's bucket of conditions, and a latent cache."""

from __future__ import annotations

from danceopd.data.manifest import (
    LatentCache,
    Manifest,
    ManifestBucket,
    ManifestError,
    ManifestRow,
    load_image,
    load_manifest,
)

__all__ = ["LatentCache", "Manifest", "ManifestBucket", "ManifestError", "ManifestRow", "load_image", "load_manifest"]
