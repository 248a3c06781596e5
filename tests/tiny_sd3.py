"""Tiny random StableDiffusion3 pipeline for the tests: a thin wrapper over `danceopd.testing.tiny`.

The default here is 16 px images, i.e. 4 x 8 x 8 latents (the transformer's sample_size 8), the size the
model-field tests use.
"""

from __future__ import annotations

from pathlib import Path

from danceopd.testing.tiny import build_tiny_pipeline


def build_tiny_sd3(path: str | Path, seed: int = 0, sample_size: int = 16) -> Path:
    return build_tiny_pipeline("sd3", path, seed, sample_size=sample_size)
