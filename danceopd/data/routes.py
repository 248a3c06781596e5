"""Each route's data in the student's space: conditions (prompts, and source images encoded into the student's
latent space for edit routes) drawn as a pure function of a seed, from the capability suite or a manifest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from danceopd.data.manifest import LatentCache, ManifestBucket
from danceopd.fields.base import Conditions

Encoder = Callable[[torch.Tensor], torch.Tensor]  # [-1, 1] images [B, 3, H, W] -> latents


class RouteData(Protocol):
    takes_source: bool

    def sample(self, n: int, seed: int) -> Conditions: ...

    def evaluation_set(self, n: int, seed: int) -> Conditions: ...


class SuiteRouteData:
    """A suite bucket; its rendered source images are resized to the student's resolution and encoded (the suite's
    pixel model needs neither)."""

    def __init__(self, bucket, encode: Encoder | None = None, resolution: int | None = None):
        self.bucket, self.encode, self.resolution = bucket, encode, resolution
        self.takes_source = bucket.takes_source

    def _to_space(self, cond: Conditions) -> Conditions:
        if cond.source is None or self.encode is None:
            return cond
        src = cond.source
        if self.resolution and src.shape[-1] != self.resolution:
            src = F.interpolate(src, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=True)
        return Conditions(cond.prompts, self.encode(src).float().cpu())

    def sample(self, n: int, seed: int) -> Conditions:
        return self._to_space(self.bucket.sample(n, seed))

    def evaluation_set(self, n: int, seed: int) -> Conditions:
        return self._to_space(self.bucket.evaluation_set(n, seed))


class ManifestRouteData:
    """A manifest route's rows: training draws from `bucket`, evaluation from `held_out` (rows training never draws);
    source images are encoded once (LatentCache) and reused."""

    def __init__(self, bucket: ManifestBucket, held_out: ManifestBucket, cache: LatentCache):
        self.bucket, self.held_out, self.cache = bucket, held_out, cache
        self.takes_source = bucket.takes_source

    def _conditions(self, rows) -> Conditions:
        source = self.cache.get(rows).float().cpu() if self.takes_source else None
        return Conditions([r.prompt for r in rows], source)

    def sample(self, n: int, seed: int) -> Conditions:
        return self._conditions(self.bucket.sample(n, seed))

    def evaluation_set(self, n: int, seed: int) -> Conditions:
        return self._conditions(self.held_out.evaluation_set(n, seed))


def build_route_data(cfg, suite, student) -> dict[str, RouteData]:
    """Per route of a TrainConfig: the suite's bucket of its capability, or its rows of data.manifest."""
    pixel = student.family.name == "pixel"
    encode = None if pixel else student.encode_images
    if cfg.manifest is None:
        return {name: SuiteRouteData(suite.bucket(r.capability), encode, None if pixel else cfg.student.resolution)
                for name, r in cfg.routes.items()}
    size = cfg.student.sample_size if pixel else cfg.student.resolution
    cache = LatentCache(student.encode_images, size=(size, size), directory=cfg.data.latent_cache, max_entries=cfg.data.latent_cache_entries)
    return {name: ManifestRouteData(cfg.manifest.bucket(name), cfg.eval_manifest.bucket(name), cache) for name in cfg.routes}
