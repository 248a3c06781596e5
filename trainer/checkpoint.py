"""Checkpoints: the student (save_pretrained), optimizer, step, RNG states and routing cursor.

Layout: <run_dir>/checkpoints/step-XXXXXXXX/{student/, optimizer.pt, state.json}. student/ holds the
weights to evaluate and serve (the EMA when it is on); optimizer.pt also holds the raw training weights. A checkpoint is written
to a temporary folder and renamed into place, so a crash never leaves a half-written "latest".
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    d = checkpoint_dir(run_dir)
    if not d.exists():
        return None
    done = sorted(p for p in d.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, step: int, student, training_weights: dict, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:08d}"
    tmp = d / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    student.save_pretrained(tmp / "student")
    torch.save({"optimizer": optimizer.state_dict(), "training_weights": training_weights, "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in d.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the raw training weights into `model`, the optimizer and the RNGs; returns state.json."""
    blob = torch.load(path / "optimizer.pt", weights_only=False)
    model.load_state_dict(blob["training_weights"])
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    np.random.set_state(blob["numpy_rng"])
    random.setstate(blob["python_rng"])
    return json.loads((path / "state.json").read_text())


def restore_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema_model: torch.nn.Module | None,
                       device, dtype) -> dict:
    """Resume from a checkpoint folder: raw weights, optimizer and RNGs (optimizer.pt), the EMA from student/
    (which holds the EMA weights when EMA is on); returns state.json."""
    from danceopd.student import load_student

    state = load_checkpoint_state(path, model, optimizer)
    if ema_model is not None:
        ema_model.load_state_dict(load_student(path / "student", device=device, dtype=dtype).transformer.state_dict())
    return state
