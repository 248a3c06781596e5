"""Shared-base adapter teachers against separate merged copies: weight memory for N capability teachers that
are one base plus a LoRA each, and the per-query cost of switching adapters instead of fusing them.

    python benchmarks/shared_base.py [--teachers 3] [--rank 4] [--out benchmarks/results/shared_base.json]

Builds a tiny random FLUX pipeline and N random LoRAs offline, loads the N teachers both ways in this process,
checks that they answer the same velocities, and prints a table: teacher weight bytes (parameters and buffers
of the transformers that stay in memory), process RSS growth, and median query time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from danceopd.fields.base import Conditions  # noqa: E402
from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline  # noqa: E402
from danceopd.teacher_model import AdapterBank, LoraAdapterSpec, TeacherModelSpec, load_teacher_field  # noqa: E402


def weight_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def timed(field, x, s, c, reps: int = 20) -> float:
    times = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            field.velocity(x, s, c)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def published_projection(n: int, rank: int = 128) -> dict:
    """Weight bytes of n teachers = base + one LoRA each, separate merged copies vs one shared base, for the
    published SD3.5-Medium and FLUX.1-dev transformers (counted on the meta device; bf16 = 2 bytes)."""
    from danceopd.models import get_family
    from danceopd.models.published import CONFIGS, lora_parameter_count, meta_transformer

    out = {}
    for name, (family, config) in CONFIGS.items():
        model = meta_transformer(config)
        base = sum(p.numel() for p in model.parameters()) * 2
        lora = lora_parameter_count(model, rank, get_family(family).default_lora_targets) * 2
        out[name] = {"base_bytes": base, "lora_bytes": lora, "separate_bytes": n * base, "shared_bytes": base + n * lora,
                     "shared_vs_separate": (base + n * lora) / (n * base)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shared_base.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="shared-base-"))
    base = build_tiny_pipeline("flux", root / "flux", seed=0)
    specs = {f"cap{i}": TeacherModelSpec(base=str(base), loras=[LoraAdapterSpec(
        path=str(build_random_lora(base, root / f"lora{i}", rank=a.rank, std=0.05, seed=10 + i)))]) for i in range(a.teachers)}
    x, s = torch.randn(4, 4, 16, 16), torch.full((4,), 0.6)
    c = Conditions(["a red circle", "a photo of a horse", "", "a blue square"])

    r0 = rss()
    separate = {n: load_teacher_field(sp, n, 32, device="cpu", dtype="float32") for n, sp in specs.items()}
    r1 = rss()
    bank = AdapterBank(specs, 32, device="cpu", dtype="float32")
    r2 = rss()
    with torch.no_grad():
        diff = max(float((separate[n].velocity(x, s, c) - bank.fields[n].velocity(x, s, c)).abs().max()) for n in specs)
    sep_bytes = weight_bytes(f.transformer for f in separate.values())
    bank_bytes = weight_bytes([bank.transformer])
    t_sep = statistics.median(timed(f, x, s, c) for f in separate.values())
    t_bank = statistics.median(timed(bank.fields[n], x, s, c) for n in specs)
    result = {"teachers": a.teachers, "lora_rank": a.rank, "family": "flux (tiny random)",
              "separate": {"transformer_bytes": sep_bytes, "rss_growth_bytes": r1 - r0, "median_query_s": t_sep},
              "shared_base": {"transformer_bytes": bank_bytes, "rss_growth_bytes": r2 - r1, "median_query_s": t_bank},
              "ratios": {"weights_shared_vs_separate": bank_bytes / sep_bytes, "query_time_shared_vs_separate": t_bank / t_sep},
              "max_abs_velocity_difference": diff}
    print(f"{a.teachers} teachers = base + one rank-{a.rank} LoRA each (tiny random FLUX), CPU, 1 thread")
    print(f"{'':<22}{'weights (MiB)':>14}{'RSS growth (MiB)':>18}{'query (ms)':>12}")
    for k in ("separate", "shared_base"):
        r = result[k]
        print(f"{k:<22}{r['transformer_bytes'] / 2**20:>14.2f}{r['rss_growth_bytes'] / 2**20:>18.2f}{r['median_query_s'] * 1e3:>12.2f}")
    print(f"shared / separate: weights {result['ratios']['weights_shared_vs_separate']:.3f}, "
          f"query time {result['ratios']['query_time_shared_vs_separate']:.2f}; max |dv| {diff:.2e}")
    result["published_models"] = published_projection(a.teachers)
    print(f"\nthe same arithmetic for published transformers (meta device: parameter counts, bf16 bytes), {a.teachers} teachers, "
          f"LoRA rank 128 on the family's attention + feed-forward targets:")
    print(f"{'model':<16}{'base (GiB)':>12}{'LoRA (MiB)':>12}{'separate (GiB)':>16}{'shared (GiB)':>14}{'ratio':>8}")
    for name, r in result["published_models"].items():
        print(f"{name:<16}{r['base_bytes'] / 2**30:>12.2f}{r['lora_bytes'] / 2**20:>12.1f}{r['separate_bytes'] / 2**30:>16.2f}"
              f"{r['shared_bytes'] / 2**30:>14.2f}{r['shared_vs_separate']:>8.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"json: {a.out}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
