"""Checkpoints: the student (save_pretrained), optimizer, step, RNG states and routing cursor.

Layout: <run_dir>/checkpoints/step-XXXXXXXX/{student/, optimizer.pt, state.json}. student/ holds the
weights to evaluate and serve (the EMA when it is on; for a LoRA student, a diffusers LoRA folder);
optimizer.pt holds the raw trainable weights, the fp32 EMA, the optimizer state and the RNGs. A checkpoint is
written to a temporary folder, fsynced, and renamed into place, so a crash (even of the machine) never leaves a
half-written "latest".
"""

from __future__ import annotations

import contextlib
import json
import os
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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, step: int, student, ema, optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """`student` is saved with the EMA weights applied (when `ema` is given); its transformer must be the
    unwrapped model being trained."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:08d}"
    tmp = d / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = student.transformer
    raw = trainable_state(model)
    with ema.applied(model) if ema is not None else contextlib.nullcontext():
        student.save_pretrained(tmp / "student")
    torch.save({"optimizer": optimizer.state_dict(), "training_weights": raw, "ema": ema.state_dict() if ema is not None else None,
                "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    fsync_tree(tmp)  # the data is on disk before the rename makes it "latest"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_path(d)  # and the rename itself
    for old in sorted(p for p in d.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and root) to disk: a rename is durable only after its data is."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def export_student(student, ema, final: Path) -> Path:
    """The trained student (the EMA weights when the EMA is on) as a student folder at `final`, written beside it and
    renamed into place. (The merged export, student.save_merged, is made from this folder afterwards: see
    danceopd.student.save_merged_transformer.)"""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with ema.applied(student.transformer) if ema is not None else contextlib.nullcontext():
        student.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def restore_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema=None) -> dict:
    """Resume from a checkpoint folder: raw trainable weights, optimizer, EMA and RNGs; returns state.json.

    The tensors are read onto the CPU whatever device they were saved from, then copied into this process's own
    parameters and optimizer state: every rank restores onto its own device, never onto the device (cuda:0, cuda:1,
    ...) of the rank that wrote the checkpoint. (FLUX.1-dev LoRA r128: ~8 GB of host memory per rank, for a moment.)"""
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    result = model.load_state_dict(blob["training_weights"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} holds weights this student does not have: {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(blob["optimizer"])
    if ema is not None and blob.get("ema") is not None:
        ema.load_state_dict(blob["ema"])
    elif ema is not None:  # a checkpoint from before the fp32 EMA was stored: its student/ holds the EMA weights
        from danceopd.student import load_student

        saved = dict(load_student(path / "student", device="cpu", dtype="float32").transformer.named_parameters())
        ema.load_state_dict({n: saved[n].detach().float() for n in ema.params})
    torch.set_rng_state(blob["torch_rng"])
    np.random.set_state(blob["numpy_rng"])
    random.setstate(blob["python_rng"])
    return json.loads((path / "state.json").read_text())
