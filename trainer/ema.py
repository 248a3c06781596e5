"""Exponential moving average of the student's trainable weights: the model that is evaluated, saved and served.

The raw weights of a constant-learning-rate run jitter from step to step (one route per update); the
average over the last ~1/(1 - decay) updates is the stable estimate. The average is kept in fp32 whatever the
model's dtype (an EMA step of (1 - 0.995) x a bf16 difference would round away), over the trainable parameters
only (a LoRA student's EMA is its adapters, not a second copy of the base).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().to(torch.float32, copy=True) for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up: early on, follow the weights closely (decay (1 + t) / (10 + t), capped at `decay`).
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in self.params:
                self.params[n].lerp_(p.detach().float(), 1 - d)

    @contextmanager
    @torch.no_grad()
    def applied(self, model: torch.nn.Module):
        """The EMA weights inside the block (to evaluate or save), the training weights again after it."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.params}
        for n, v in self.params.items():
            params[n].copy_(v)
        try:
            yield model
        finally:
            for n, v in backup.items():
                params[n].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            raise ValueError(f"EMA state names other parameters than the model's trainable ones ({len(state)} vs {len(self.params)})")
        for n, v in state.items():
            self.params[n].copy_(v)
