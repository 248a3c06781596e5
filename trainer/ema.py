"""Exponential moving average of the student's weights: the model that is evaluated, saved and served.

The raw weights of a constant-learning-rate run jitter from step to step (one route per update); the
average over the last ~1/(1 - decay) updates is the stable estimate.
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up: early on, follow the weights closely (decay (1 + t) / (10 + t), capped at `decay`).
        d = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)
