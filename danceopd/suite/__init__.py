"""The capability suite: a procedural image world with exact teachers, data buckets and judges."""

from danceopd.suite.suite import CapabilitySuite

__all__ = ["CapabilitySuite"]
