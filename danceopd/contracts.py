"""Wire contracts shared by the teacher servers and their clients (trainers, the REST gateway, the CLI).

Tensors cross process boundaries as numpy arrays: Ray moves them without torch's pickling path
(see ../shared/docs/ray-on-this-machine.md), and they convert to and from torch without a copy on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from danceopd.fields.base import Conditions, FieldInfo, shape_text
from danceopd.remote import RequestError


class QueryError(RequestError):
    """A query a field cannot answer; `field` names the offending input (a 422 by default)."""

    default_status = 422


@dataclass
class VelocityQuery:
    x: np.ndarray  # float32 [B, C, H, W]
    sigma: np.ndarray  # float32 [B]
    prompts: list[str]
    source: np.ndarray | None = None  # float32 [B, C, H, W] (edits)
    adapter: str | None = None  # which teacher of a shared-base (adapter bank) deployment answers

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @classmethod
    def from_torch(cls, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions, adapter: str | None = None) -> "VelocityQuery":
        src = None if conditions.source is None else _np32(conditions.source)
        return cls(_np32(x), _np32(sigma), list(conditions.prompts), src, adapter)

    def chunks(self, rows: int) -> list["VelocityQuery"]:
        """The query cut into consecutive queries of at most `rows` samples (a replica's largest model call)."""
        if self.num_samples <= rows:
            return [self]
        cut = lambda a, i: None if a is None else a[i:i + rows]  # noqa: E731
        return [VelocityQuery(self.x[i:i + rows], np.asarray(self.sigma)[i:i + rows], self.prompts[i:i + rows], cut(self.source, i),
                              self.adapter) for i in range(0, self.num_samples, rows)]

    def conditions(self, device: torch.device | str = "cpu") -> Conditions:
        src = None if self.source is None else torch.from_numpy(np.ascontiguousarray(self.source)).to(device)
        return Conditions(self.prompts, src)

    def validate(self, info: FieldInfo) -> None:
        """Raise QueryError naming the first bad input; nothing invalid reaches a model."""
        adapters = info.extra.get("adapters")
        if adapters is not None and self.adapter not in adapters:
            raise QueryError("adapter", f"teacher {info.name!r} serves several teachers on one base: name one of {adapters}")
        if adapters is None and self.adapter is not None:
            raise QueryError("adapter", f"teacher {info.name!r} is a single teacher: send no adapter")
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise QueryError("x", f"must be float32, got {getattr(self.x, 'dtype', type(self.x).__name__)}")
        if self.x.ndim != 4 or tuple(self.x.shape[1:]) not in info.shapes:  # the default shape or one of the run's buckets
            raise QueryError("x", f"must have shape {shape_text(info)} for teacher {info.name!r}, got {list(self.x.shape)}")
        b = self.x.shape[0]
        if b < 1:
            raise QueryError("x", "batch is empty")
        if not np.isfinite(self.x).all():
            raise QueryError("x", "contains NaN or inf")
        sigma = np.asarray(self.sigma)
        if sigma.shape != (b,):
            raise QueryError("sigma", f"must hold one value per sample ({b}), got shape {list(sigma.shape)}")
        if not np.isfinite(sigma).all() or (sigma < 0).any() or (sigma > 1).any():
            raise QueryError("sigma", "must lie in [0, 1] (1 = pure noise, 0 = clean)")
        if len(self.prompts) != b or not all(isinstance(p, str) for p in self.prompts):
            raise QueryError("prompt", f"need one prompt string per sample ({b}), got {len(self.prompts)}")
        if self.source is None:
            if info.requires_source:
                raise QueryError("source", f"teacher {info.name!r} edits an image: send the source image")
        else:
            if not info.takes_source:
                raise QueryError("source", f"teacher {info.name!r} takes no source image")
            if self.source.dtype != np.float32 or tuple(self.source.shape) != tuple(self.x.shape):
                raise QueryError("source", f"must be float32 with x's shape {list(self.x.shape)}, got {self.source.dtype} {list(self.source.shape)}")
            if not np.isfinite(self.source).all():
                raise QueryError("source", "contains NaN or inf")


def _np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def merge_key(query: VelocityQuery) -> tuple:
    """Queries with the same key can share one model call: the same adapter, and a source for all or none (a
    Kontext teacher appends source tokens: a zero source is not the same as none) and the same sample shape."""
    return (query.adapter, query.source is None, tuple(query.x.shape[1:]))  # one shape per call (aspect-ratio buckets)


def concat_queries(queries: list[VelocityQuery]) -> VelocityQuery:
    """Merge queries of one merge_key into one batch."""
    x = np.concatenate([q.x for q in queries])
    sigma = np.concatenate([np.asarray(q.sigma, dtype=np.float32) for q in queries])
    prompts = [p for q in queries for p in q.prompts]
    if len({merge_key(q) for q in queries}) != 1:
        raise ValueError("concat_queries: queries differ in adapter, source presence or sample shape; group them by merge_key first")
    source = None if queries[0].source is None else np.concatenate([q.source for q in queries])
    return VelocityQuery(x, sigma, prompts, source, queries[0].adapter)


def split_rows(array: np.ndarray, queries: list[VelocityQuery]) -> list[np.ndarray]:
    out, i = [], 0
    for q in queries:
        out.append(array[i:i + q.num_samples])
        i += q.num_samples
    return out


def info_to_dict(info: FieldInfo) -> dict:
    return {"name": info.name, "kind": info.kind, "sample_shape": list(info.sample_shape),
            **({"bucket_shapes": [list(s) for s in info.shapes[1:]]} if len(info.shapes) > 1 else {}),
            "takes_source": info.takes_source, "requires_source": info.requires_source,
            "guidance": None if info.guidance is None or not math.isfinite(info.guidance) else info.guidance,
            # a model teacher's family, resolution and weights checksum (which merged weights answer)
            **{k: v for k, v in info.extra.items() if k in INFO_EXTRA}}


INFO_EXTRA = ("family", "resolution", "weights_sha256", "adapters")  # model teachers' identity; an adapter bank's teachers


def info_from_dict(d: dict) -> FieldInfo:
    extra = {k: d[k] for k in INFO_EXTRA if k in d}
    return FieldInfo(d["name"], d["kind"], tuple(d["sample_shape"]), d["takes_source"], d["requires_source"], d.get("guidance"), extra,
                     tuple(tuple(s) for s in d.get("bucket_shapes", ())))
