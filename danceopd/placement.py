"""Where models may live. A job's driver (the `ray job submit` entrypoint, often on a head node without a GPU) only
orchestrates: the student, its evaluation and every teacher load on the workers and replicas Ray gave resources to.
`no_model_weights()` makes that a checked rule rather than a convention: inside it, giving a module a parameter
that holds memory (building or loading any torch model: diffusers, transformers, the pixel model) raises
`ModelInDriverError`. Parameters on the meta device (shape-only plans, `torch.device("meta")`) stay allowed.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_lock = threading.Lock()


class ModelInDriverError(RuntimeError):
    """A model's weights were about to be created or loaded in a process that must not hold any."""


@contextlib.contextmanager
def no_model_weights(where: str = "the job driver"):
    """Inside the block, registering a non-meta parameter on any torch module raises ModelInDriverError."""
    with _lock:
        original = torch.nn.Module.register_parameter

        def guarded(module, name, param):
            if param is not None and param.device.type != "meta":
                raise ModelInDriverError(
                    f"{type(module).__name__}.{name} ({tuple(param.shape)}) was about to be loaded in {where}, which holds no "
                    "model: build models on the Ray Train workers or the teacher replicas (they own the GPUs)")
            return original(module, name, param)

        torch.nn.Module.register_parameter = guarded
    try:
        yield
    finally:
        with _lock:
            torch.nn.Module.register_parameter = original
