"""One DanceOPD update, written once for both trainers.

    update = Update(cfg, student.trainable_parameters(), model, num_steps)
    record = update(step, batches, predict, target, times)

Given a step's micro-batches (each with its queried states and the teacher's velocity there, maybe still in flight), it
zeroes the gradients, predicts the student's velocity at the queried states a chunk at a time (optim.states_per_backward),
takes the MSE against the teacher's (the dense loss's weights under method.loss: dense) divided by every micro-batch of
the update, backpropagates each chunk, clips, checks that loss and gradient are finite, sets the learning rate, steps
AdamW and the EMA. The reference trainer (standing for N workers in one process) and a Ray Train worker (under DDP)
differ only in what they pass: how the student predicts (the DDP-wrapped model), how a target arrives (a teacher call with
retries), how gradients are reduced (`sync`: DDP's no_sync on all but the last backward) and which slot a micro-batch's
loss goes to (the reference's emulated ranks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from danceopd.config import TrainConfig
from trainer.ema import EMA
from trainer.steps import MicroBatch, NonFiniteSteps, StepTimes, chunk_loss, lr_at


@dataclass
class UpdateRecord:
    loss: float  # the update's loss: every micro-batch's share of it, summed (this process's micro-batches)
    grad_norm: float  # the gradient's norm before clipping (all-reduced under DDP: the same on every rank)
    applied: bool  # False: loss or gradient not finite, the update skipped (weights, optimizer and EMA as they were)
    parts: list[list[float]]  # per [slot][route]: the loss's share as that rank alone has it (a slot: one of the ranks the
    # process stands for; the loss was divided by every slot's micro-batches, each slot's share is scaled back by their number)


class Update:
    """AdamW on the fp32 master weights, gradient clipping, the non-finite check, the learning-rate schedule and the EMA,
    around the micro-batches' forward and backward passes."""

    def __init__(self, cfg: TrainConfig, params: list[torch.nn.Parameter], model: torch.nn.Module, num_steps: int,
                 slots: int = 1, check_loss: bool = True):
        """`model`: the module whose trainable weights the EMA follows; `num_steps`: the rollout's N (dense weights);
        `slots`: ranks this process computes (the reference trainer standing for N workers); `check_loss`: whether the
        non-finite check reads the loss besides the gradient (not under DDP, where ranks' losses differ and every rank
        must take the same decision: there the all-reduced gradient decides)."""
        o = cfg.optim
        self.cfg, self.params, self.model, self.num_steps = cfg, params, model, num_steps
        self.slots, self.check_loss, self.routes = slots, check_loss, list(cfg.routes)
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.ema = EMA(model, o.ema_decay) if o.ema_decay > 0 else None
        self.nonfinite = NonFiniteSteps(o.max_nonfinite_steps)

    def __call__(self, step: int, batches: list[MicroBatch], predict: Callable, target: Callable[[MicroBatch], torch.Tensor],
                 times: StepTimes, slot: Callable[[MicroBatch], int] = lambda mb: 0,
                 sync: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext()) -> UpdateRecord:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        device = self.params[0].device
        total = torch.zeros((), device=device)
        parts = torch.zeros(self.slots, len(self.routes), device=device)
        chunks = [(mb, rows) for mb in batches for rows in mb.q.state_chunks(cfg.optim.states_per_backward)]
        for i, (mb, rows) in enumerate(chunks):  # a chunk per micro-batch unless optim.states_per_backward
            with sync(i == len(chunks) - 1):  # under DDP the last backward all-reduces the gradients
                with times.time("forward_backward"):
                    pred = predict(*mb.q.inputs(rows))
                if rows.start == 0:
                    with times.time("teacher"):  # in flight since its states existed: waits only for a slower teacher
                        tgt = target(mb)
                with times.time("forward_backward"):
                    loss = chunk_loss(cfg, pred, tgt, mb.q, rows, self.num_steps) / len(batches)  # groups: accum x groups
                    loss.backward()
            total += loss.detach()
            parts[slot(mb), self.routes.index(mb.route)] += loss.detach()
        with times.time("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
            loss, grad_norm, *flat = torch.cat([torch.stack([total, grad_norm.to(total)]), (parts * self.slots).flatten()]).tolist()
            applied = self.nonfinite.check(*((loss, grad_norm) if self.check_loss else (grad_norm,)))
            if applied:
                for g in self.optimizer.param_groups:
                    g["lr"] = lr_at(cfg, step)
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model, step)
        n = len(self.routes)
        return UpdateRecord(loss, grad_norm, applied, [flat[i * n:(i + 1) * n] for i in range(self.slots)])
