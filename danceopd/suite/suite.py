"""CapabilitySuite: one object that hands out, per capability, the bucket, the exact teacher and the judge."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from danceopd.fields.base import Conditions
from danceopd.suite import world
from danceopd.suite.buckets import CAPABILITIES, Bucket, check_capability
from danceopd.suite.judges import JUDGES
from danceopd.suite.teachers import EmpiricalSetField, PointMassEditField, local_edit_target


class SuiteEditField(PointMassEditField):
    """An exact edit teacher that is total: outside its domain it behaves as a real editing model would.

    An instruction it does not know leaves the image as it is (a point mass at the source); without a source
    image it falls back to the unconditional text-to-image field. This makes the soft-mixing ablation (all
    fields on the same conditions) well defined.
    """

    def __init__(self, name, tier, target_fn, known, fallback: EmpiricalSetField, tau: float = 0.0):
        super().__init__(name, tier, target_fn, tau)
        self.info = replace(self.info, requires_source=False)
        self.known, self.fallback = known, fallback

    def _target(self, src: torch.Tensor, instruction: str) -> torch.Tensor:
        return self.target_fn(src, instruction) if self.known(instruction) else src

    def targets(self, conditions: Conditions) -> torch.Tensor:
        return torch.stack([self._target(src, p) for src, p in zip(conditions.source, conditions.prompts)])

    def velocity(self, x, sigma, conditions):
        if conditions.source is None:
            return self.fallback.velocity(x, sigma, conditions.with_prompts([""] * len(conditions)))
        return super().velocity(x, sigma, conditions)


class SuiteT2IField(EmpiricalSetField):
    """Exact T2I/realism teacher, total: a prompt outside the suite is treated as unconditional."""

    def velocity(self, x, sigma, conditions):
        prompts = [p if self.knows(p) else "" for p in conditions.prompts]
        return super().velocity(x, sigma, Conditions(prompts, conditions.source))

    def knows(self, prompt: str) -> bool:
        if prompt == "":
            return True
        try:
            world.parse_prompt(prompt)
            return True
        except ValueError:
            return False


def _is_local(instr: str) -> bool:
    try:
        world.parse_local_edit(instr)
        return True
    except ValueError:
        return False


class CapabilitySuite:
    def __init__(self, tier: str = "basic", tau: float = 0.0, seed: int = 0):
        self.tier = world.get_tier(tier)
        self.tau = tau
        t = self.tier
        t2i = SuiteT2IField("t2i", t, tau=tau, seed=seed)
        self.fields = {
            "t2i": t2i,
            "uncond": t2i,
            "realism": SuiteT2IField("realism", t, realistic=True, tau=tau, seed=seed),
            "local_edit": SuiteEditField("local_edit", t, lambda s, i: local_edit_target(s, i, t), _is_local, t2i, tau),
            "global_edit": SuiteEditField("global_edit", t, world.apply_global_edit, lambda i: i in t.global_edits, t2i, tau),
        }
        self.buckets = {c: Bucket(c, t) for c in CAPABILITIES}

    @property
    def capabilities(self) -> tuple[str, ...]:
        return CAPABILITIES

    def field(self, capability: str):
        self._check(capability)
        return self.fields[capability]

    def bucket(self, capability: str) -> Bucket:
        self._check(capability)
        return self.buckets[capability]

    def judge(self, capability: str, samples: torch.Tensor, conditions: Conditions) -> dict:
        self._check(capability)
        return JUDGES[capability](samples, conditions, self.tier)

    def clean_samples(self, capability: str, conditions: Conditions, seed: int) -> torch.Tensor:
        """Dataset targets x0 for the conditions (a random reference image, or the exact edit): used by
        off-policy distillation and plain flow matching."""
        self._check(capability)
        f = self.fields[capability]
        if isinstance(f, PointMassEditField):
            return f.targets(conditions) if conditions.source is not None else self.clean_samples("uncond", conditions, seed)
        rng = np.random.default_rng(seed)
        out = []
        for p in conditions.prompts:
            refs = f.references(p if f.knows(p) else "")
            out.append(refs[rng.integers(len(refs))])
        return torch.stack(out)

    def _check(self, capability: str) -> None:
        check_capability(capability)

