"""Aspect-ratio buckets: images of any shape trained at a few fixed sizes near the training area.

Each image goes to the bucket nearest its aspect ratio (|log(w/h) - log(bw/bh)| smallest; ties to the larger area), is
resized (bicubic) to cover the bucket and centre-cropped to it: `cover_crop` is the whole rule, so an image's crop is
a pure function of its size and the bucket list. A micro-batch is drawn from one bucket (its samples share one latent
shape); which one is a pure function of the micro-batch's seed, weighted by the buckets' shares of the route's images
(prompt-only routes: of all the run's images, uniform when there are none).
"""

from __future__ import annotations

import math

import numpy as np

# Width:height ratios of the standard buckets (SDXL / SD3 / FLUX trainers' usual set, both orientations).
STANDARD_RATIOS = ((1, 1), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))

Size = tuple[int, int]  # (width, height) in pixels


def standard_buckets(resolution: int, multiple: int) -> list[Size]:
    """data.buckets: auto: the standard ratios at about resolution^2 pixels, sides multiples of `multiple` (the family's
    VAE factor x patch). 1024 px, multiple 16: 1024x1024, 1152x912, 912x1152, 1184x880, 880x1184, 1248x832, 832x1248,
    1360x768, 768x1360."""
    out: list[Size] = []
    for a, b in STANDARD_RATIOS:
        r = math.sqrt(a / b)
        w = max(multiple, round(resolution * r / multiple) * multiple)
        h = max(multiple, round(resolution / r / multiple) * multiple)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (in log ratio); ties go to the larger area, then the first."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def cover_crop(width: int, height: int, bucket: Size) -> tuple[Size, tuple[int, int, int, int]]:
    """((resized width, height), (left, top, right, bottom) crop box in the resized image): the smallest resize that
    covers the bucket, centre-cropped to it."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return (rw, rh), (left, top, left + bw, top + bh)


def draw_bucket(shares: dict[Size, float], rng: np.random.Generator) -> Size:
    """One bucket, drawn by share from `rng` (sorted order: the draw does not depend on dict order)."""
    keys = sorted(shares)
    p = np.asarray([shares[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def bucket_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"
