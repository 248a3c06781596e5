"""Checkpoint size per step of a LoRA student, fp32 and bf16 exports, and what it means at full size.

    python benchmarks/checkpoint_size.py [--rank 8] [--out benchmarks/results/checkpoint_size.json]

A tiny random FLUX.1 pipeline (built offline) gets a LoRA student of the given rank; after one AdamW step with
the EMA on (the training defaults), one periodic checkpoint is written with each `student.save_dtype` exactly as
the trainers write it (trainer.checkpoint.save_checkpoint). The table lists the files: student/ is the export
(the LoRA in save_dtype), optimizer.pt holds what a resume needs in fp32 (training weights, EMA, AdamW moments,
RNGs). Bytes per trainable parameter measured here are projected onto the LoRA r128 students of SD3.5-Medium
and FLUX.1-dev (trainable counts from their published configs, danceopd/models/published.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# LoRA r128 on the families' default target modules, counted on the meta device from the published configs
# (danceopd.models.published; see the README's full-size cost table).
FULL_SIZE_TRAINABLE = {"SD3.5-Medium r128": 168_000_000, "FLUX.1-dev r128": 523_000_000}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(base: Path, rank: int, save_dtype: str, out: Path) -> dict:
    from danceopd.student import StudentConfig, build_student, count_parameters
    from trainer.checkpoint import save_checkpoint
    from trainer.ema import EMA

    cfg = StudentConfig(base=str(base), resolution=32, lora={"rank": rank, "alpha": rank}, save_dtype=save_dtype)
    student = build_student(cfg)
    model = student.transformer
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    ema = EMA(model, 0.995)
    sum((p.float() ** 2).sum() for p in params).backward()
    opt.step()
    ema.update(model, 1)
    ckpt = save_checkpoint(out, 1, student, ema, opt, {}, keep=1)
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*")) if p.is_file()}
    return {"save_dtype": save_dtype, "trainable_params": count_parameters(model, trainable_only=True),
            "student_bytes": folder_bytes(ckpt / "student"), "optimizer_bytes": (ckpt / "optimizer.pt").stat().st_size,
            "checkpoint_bytes": folder_bytes(ckpt), "files": files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/checkpoint_size.json")
    args = ap.parse_args()
    from danceopd.testing.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_pipeline("flux", Path(tmp) / "flux", seed=0)
        rows = [measure(base, args.rank, d, Path(tmp) / d) for d in ("float32", "bfloat16")]
    n = rows[0]["trainable_params"]
    print(f"tiny FLUX.1, LoRA r{args.rank}: {n:,} trainable parameters; one checkpoint per save:")
    print(f"{'save_dtype':<10} {'student/ B':>11} {'optimizer.pt B':>15} {'checkpoint B':>13} {'B/param':>8}")
    for r in rows:
        print(f"{r['save_dtype']:<10} {r['student_bytes']:>11,} {r['optimizer_bytes']:>15,} {r['checkpoint_bytes']:>13,} "
              f"{r['checkpoint_bytes'] / n:>8.1f}")
    # The LoRA tensors' share: per parameter 4 B (fp32) or 2 B (bf16) in the export, 16 B in optimizer.pt
    # (training weights, EMA, two AdamW moments). Headers and JSON are fixed costs that vanish at full size.
    projection = {}
    print("\nfull size (bytes per parameter: export 4 or 2, optimizer.pt 16):")
    print(f"{'student':<20} {'export fp32':>12} {'export bf16':>12} {'ckpt fp32':>10} {'ckpt bf16':>10}")
    for name, count in FULL_SIZE_TRAINABLE.items():
        p = {"export_fp32_gb": count * 4 / 1e9, "export_bf16_gb": count * 2 / 1e9,
             "checkpoint_fp32_gb": count * 20 / 1e9, "checkpoint_bf16_gb": count * 18 / 1e9}
        projection[name] = p
        print(f"{name:<20} {p['export_fp32_gb']:>10.2f}GB {p['export_bf16_gb']:>10.2f}GB "
              f"{p['checkpoint_fp32_gb']:>8.2f}GB {p['checkpoint_bf16_gb']:>8.2f}GB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rank": args.rank, "measured": rows, "projection": projection}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
