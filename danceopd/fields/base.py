"""The one batched contract every velocity field (teacher, student, operator) implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Conditions:
    """What a batch of velocity queries is conditioned on.

    `prompts[i]` is the text of sample i; the empty string means unconditional (used by CFG).
    `source` is `[B, C, H, W]` for edit fields (the image being edited) and None otherwise.
    `shape` is the (C, H, W) of the batch's samples where it is not the field's default: an aspect-ratio bucket's
    (data.buckets); every sample of a batch has one shape.
    """

    prompts: list[str]
    source: torch.Tensor | None = None
    shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            raise TypeError("Conditions.prompts must be a list of strings, one per sample, not a single string")
        self.prompts = list(self.prompts)
        if self.source is not None and self.source.shape[0] != len(self.prompts):
            raise ValueError(
                f"Conditions.source has batch {self.source.shape[0]} but there are {len(self.prompts)} prompts"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: torch.Tensor | list[int] | slice) -> "Conditions":
        """The conditions of a subset of samples (same order as `index`)."""
        if isinstance(index, slice):
            idx = list(range(len(self.prompts)))[index]
        else:
            idx = [int(i) for i in index]
        source = None if self.source is None else self.source[idx]
        return Conditions([self.prompts[i] for i in idx], source, self.shape)

    def repeat(self, k: int) -> "Conditions":
        """Each sample repeated k times in a row (for K query states per sample)."""
        prompts = [p for p in self.prompts for _ in range(k)]
        source = None if self.source is None else self.source.repeat_interleave(k, dim=0)
        return Conditions(prompts, source, self.shape)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditions":
        if self.source is None:
            return self
        return Conditions(self.prompts, self.source.to(device=device, dtype=dtype or self.source.dtype), self.shape)

    def with_prompts(self, prompts: list[str]) -> "Conditions":
        return Conditions(prompts, self.source, self.shape)


@dataclass(frozen=True)
class FieldInfo:
    """What a client needs to know to query a field."""

    name: str
    kind: str  # "exact", "diffusers", "student", "cfg", "soft_mix"
    sample_shape: tuple[int, int, int]  # (C, H, W) of x
    takes_source: bool = False  # accepts a source image (edits)
    requires_source: bool = False  # cannot answer without one
    guidance: float | None = None  # CFG scale where the field applies one
    extra: dict = field(default_factory=dict)
    bucket_shapes: tuple[tuple[int, int, int], ...] = ()  # further (C, H, W) it answers: the run's aspect-ratio buckets

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Every sample shape the field answers: its default first."""
        return tuple(dict.fromkeys([tuple(self.sample_shape), *map(tuple, self.bucket_shapes)]))


@runtime_checkable
class VelocityField(Protocol):
    """`velocity(x[B,C,H,W], sigma[B], conditions) -> [B,C,H,W]`, on x's device and dtype."""

    info: FieldInfo

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor: ...


def shape_text(info: FieldInfo) -> str:
    """'[B, C, H, W]' of a one-shape field; the list of shapes of a bucketed one."""
    if len(info.shapes) == 1:
        return f"[B, {', '.join(map(str, info.sample_shape))}]"
    return f"[B, C, H, W] with (C, H, W) one of its buckets {[list(s) for s in info.shapes]}"


def check_query(info: FieldInfo, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> None:
    """Validate one query against a field's contract; raises ValueError naming the bad part."""
    if x.dim() != 4 or tuple(x.shape[1:]) not in info.shapes:
        raise ValueError(f"x must be {shape_text(info)} for field {info.name!r}, got {list(x.shape)}")
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be [B] = [{x.shape[0]}], got {list(sigma.shape)}")
    if conditions.source is not None and tuple(conditions.source.shape) != tuple(x.shape):
        raise ValueError(f"conditions.source must have x's shape {list(x.shape)}, got {list(conditions.source.shape)}")
    if len(conditions) != x.shape[0]:
        raise ValueError(f"conditions hold {len(conditions)} prompts for a batch of {x.shape[0]}")
    if info.requires_source and conditions.source is None:
        raise ValueError(f"field {info.name!r} edits an image: conditions.source is required")
