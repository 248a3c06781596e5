"""Each route's data in the student's space: conditions (prompts, and source images encoded into the student's
latent space for edit routes) drawn as a pure function of a seed, from the capability suite or a manifest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from danceopd.data.manifest import LatentCache, ManifestBucket
from danceopd.fields.base import Conditions

# What PIL raises for a missing, truncated, foreign or oversized image file.
UNREADABLE = (OSError, SyntaxError, Image.DecompressionBombError)
Encoder = Callable[[torch.Tensor], torch.Tensor]  # [-1, 1] images [B, 3, H, W] -> latents


class RouteData(Protocol):
    takes_source: bool

    def sample(self, n: int, seed: int) -> Conditions: ...

    def evaluation_set(self, n: int, seed: int) -> Conditions: ...

    def evaluation_sets(self, n: int, seed: int) -> dict[tuple[int, int] | None, Conditions]: ...

    def size_shares(self) -> dict[tuple[int, int], float] | None: ...


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

    def evaluation_sets(self, n: int, seed: int) -> dict[tuple[int, int] | None, Conditions]:
        return {None: self.evaluation_set(n, seed)}

    def size_shares(self) -> None:
        return None  # the suite's images are square


class ManifestRouteData:
    """A manifest route's rows: training draws from `bucket`, evaluation from `held_out` (rows training never draws);
    source images are encoded once (LatentCache) and reused. With aspect-ratio buckets a draw is one bucket's rows and
    its Conditions carry that bucket's sample shape (`shape_of`: (width, height) -> (C, H, W)).

    A row whose source image cannot be read when drawn (a large source's images are not all checked at start) is
    replaced by another row of its bucket, drawn from the same seed, and counted in `skipped` and through `on_skip`."""

    def __init__(self, bucket: ManifestBucket, held_out: ManifestBucket, cache: LatentCache,
                 shape_of: Callable[[tuple[int, int]], tuple[int, int, int]] | None = None,
                 on_skip: Callable[[str, str], None] | None = None):
        self.bucket, self.held_out, self.cache, self.shape_of, self.on_skip = bucket, held_out, cache, shape_of, on_skip
        self.takes_source = bucket.takes_source
        self.skipped = 0

    def _conditions(self, rows, size, seed: int = 0) -> Conditions:
        source = self._sources(rows, seed) if self.takes_source else None
        shape = None if size is None or self.shape_of is None else tuple(self.shape_of(size))
        return Conditions([r.prompt for r in rows], source, shape)

    def _sources(self, rows: list, seed: int) -> torch.Tensor:
        try:
            return self.cache.get(rows).float().cpu()
        except UNREADABLE:
            pass
        rows, rng = list(rows), np.random.default_rng([seed, 7])
        pool = [r for r in self.bucket.rows if r.bucket == rows[0].bucket]
        for i, row in enumerate(rows):
            tries = 0
            while not self._readable(row):
                self.skipped += 1
                if self.on_skip is not None:
                    self.on_skip(self.bucket.route, f"row {row.uid!r}: image {row.source_image} cannot be read; skipped")
                tries += 1
                if tries > 100:
                    raise ValueError(f"route {self.bucket.route!r}: 100 rows in a row have unreadable images; check the data")
                row = pool[int(rng.integers(len(pool)))]
            rows[i] = row
        return self.cache.get(rows).float().cpu()

    def _readable(self, row) -> bool:
        try:
            self.cache.get([row])
            return True
        except UNREADABLE:
            return False

    def sample(self, n: int, seed: int) -> Conditions:
        rows, size = self.bucket.sample_sized(n, seed)
        return self._conditions(rows, size, seed)

    def evaluation_set(self, n: int, seed: int) -> Conditions:
        """The held-out rows of the route's largest bucket (grids, CLIP scores)."""
        size, rows = next(iter(self.held_out.evaluation_sets(n, seed).items()))
        return self._conditions(rows, size, seed)

    def evaluation_sets(self, n: int, seed: int) -> dict[tuple[int, int] | None, Conditions]:
        """{bucket: held-out conditions at its shape} (velocity error per bucket); {None: ...} without buckets."""
        return {size: self._conditions(rows, size, seed) for size, rows in self.held_out.evaluation_sets(n, seed).items()}

    def size_shares(self) -> dict[tuple[int, int], float] | None:
        """Each bucket's share of this route's training draws (None without buckets)."""
        return self.bucket.size_shares()


def build_route_data(cfg, suite, student, on_skip: Callable[[str, str], None] | None = None) -> dict[str, RouteData]:
    """Per route of a TrainConfig: the suite's bucket of its capability, or its rows of data.manifest."""
    pixel = student.family.name == "pixel"
    encode = None if pixel else student.encode_images
    if cfg.manifest is None:
        return {name: SuiteRouteData(suite.bucket(r.capability), encode, None if pixel else cfg.student.resolution)
                for name, r in cfg.routes.items()}
    size = cfg.student.sample_size if pixel else cfg.student.resolution
    cache = LatentCache(student.encode_images, size=(size, size), directory=cfg.data.latent_cache, max_entries=cfg.data.latent_cache_entries)
    shape_of = None if pixel else (lambda wh: student.family.latent_shape(student.pipe, wh))
    return {name: ManifestRouteData(cfg.manifest.bucket(name), cfg.eval_manifest.bucket(name), cache, shape_of, on_skip)
            for name in cfg.routes}
