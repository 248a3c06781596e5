"""Data buckets: per capability, the conditions of a batch (prompts, source images, instructions).

Buckets hold conditions only; targets come from the routed teacher field. Sampling is a pure function of
(bucket, seed): a retried or resumed worker draws exactly the same conditions.
"""

from __future__ import annotations

import numpy as np
import torch

from danceopd.fields.base import Conditions
from danceopd.suite import world

CAPABILITIES = ("t2i", "local_edit", "global_edit", "realism", "uncond")


def check_capability(name: str) -> str:
    if name not in CAPABILITIES:
        raise ValueError(f"unknown capability {name!r}: choose from {list(CAPABILITIES)}")
    return name


class Bucket:
    def __init__(self, capability: str, tier: world.Tier):
        self.capability, self.tier = check_capability(capability), tier
        self.prompts = world.t2i_prompts(tier)

    @property
    def takes_source(self) -> bool:
        return self.capability in ("local_edit", "global_edit")

    def sample(self, n: int, seed: int) -> Conditions:
        rng = np.random.default_rng(seed)
        cap, tier = self.capability, self.tier
        if cap in ("t2i", "realism"):
            return Conditions([self.prompts[i] for i in rng.integers(0, len(self.prompts), n)])
        if cap == "uncond":
            return Conditions([""] * n)
        scenes = [world.random_scene(self.prompts[rng.integers(len(self.prompts))], tier, rng) for _ in range(n)]
        source = torch.stack([world.render(s, tier.size) for s in scenes])
        if cap == "global_edit":
            edits = [tier.global_edits[i] for i in rng.integers(0, len(tier.global_edits), n)]
            return Conditions([world.global_edit_instruction(e) for e in edits], source)
        instructions = []
        for s in scenes:
            obj = s.objects[rng.integers(len(s.objects))]
            taken = {o.colour for o in s.objects}
            choices = [c for c in tier.colours if c not in taken]
            instructions.append(world.local_edit_instruction(obj.shape, choices[rng.integers(len(choices))]))
        return Conditions(instructions, source)

    def evaluation_set(self, n: int, seed: int = 12345) -> Conditions:
        """A fixed evaluation set; for t2i-like buckets every prompt appears equally often (n rounded up)."""
        if self.capability in ("t2i", "realism"):
            reps = -(-n // len(self.prompts))
            prompts = [p for p in self.prompts for _ in range(reps)] if len(self.prompts) <= n else self.sample(n, seed).prompts
            return Conditions(prompts)
        return self.sample(n, seed)
