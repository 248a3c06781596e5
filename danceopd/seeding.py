"""Derived seeds: every random draw of a run is a pure function of (run seed, purpose, step, rank, micro-batch).

This is what makes retries, resumes and the distributed trainer reproduce the reference trainer exactly:
no random state has to be carried from one step to the next.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object, sep: str = "/") -> int:
    """A stable 63-bit seed from any parts (python's hash() is salted per process)."""
    digest = hashlib.sha256(sep.join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
