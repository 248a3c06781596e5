"""DDP start-up and gradient memory for a LoRA student: what the distributed job's DDP options save.

    python benchmarks/ddp_startup.py [--frozen-gb 1.0] [--trainable-mb 200] [--out benchmarks/results/ddp_startup.json]

Two gloo ranks on this machine each hold a "student" of the shape a LoRA run has: frozen bf16 weights (the base)
and fp32 trainable ones (the adapters), as nn.Linear layers. It times DDP's construction, which broadcasts rank 0's
parameters and buffers to every rank (at start and at every restart of the worker group):

- `broadcast all`: DDP's default: every parameter, the frozen base included;
- `skip frozen`: the job's option (trainer.distributed.skip_frozen_broadcast): only the trainable parameters.

and the process memory after one backward with `gradient_as_bucket_view` off (DDP's default: each gradient and its
all-reduce bucket are two copies) and on (the job's option: the gradients are views into the buckets). It prints a
table, writes JSON, and projects the broadcast to FLUX.1-dev's 23.8 GB base from the bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYER = 2048  # square layers: 2048 x 2048


def student(frozen_bytes: int, trainable_bytes: int) -> torch.nn.Module:
    """Frozen bf16 layers and trainable fp32 layers of about the given sizes, the same on every rank."""
    torch.manual_seed(0)
    frozen = [torch.nn.Linear(LAYER, LAYER, bias=False, dtype=torch.bfloat16) for _ in range(max(1, frozen_bytes // (LAYER * LAYER * 2)))]
    trainable = [torch.nn.Linear(LAYER, LAYER, bias=False) for _ in range(max(1, trainable_bytes // (LAYER * LAYER * 4)))]
    model = torch.nn.ModuleDict({"base": torch.nn.Sequential(*frozen), "adapters": torch.nn.Sequential(*trainable)})
    model["base"].requires_grad_(False)
    return model


def rss() -> int:
    return psutil.Process().memory_info().rss


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.distributed import skip_frozen_broadcast

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for mode in ("broadcast all", "skip frozen"):
        times = []
        for _ in range(args.repeats):
            model = student(int(args.frozen_gb * 1e9), int(args.trainable_mb * 1e6))
            if mode == "skip frozen":
                skip_frozen_broadcast(model)
            dist.barrier()
            t0 = time.perf_counter()
            DDP(model)
            dist.barrier()
            times.append(time.perf_counter() - t0)
            del model
        results[mode] = sorted(times)[len(times) // 2]
    memory = {}
    for view in (False, True):
        model = student(int(args.frozen_gb * 1e9), int(args.trainable_mb * 1e6))
        skip_frozen_broadcast(model)
        ddp = DDP(model, gradient_as_bucket_view=view)
        before = rss()
        x = torch.randn(4, LAYER)
        ddp.module["adapters"](x).float().square().mean().backward()  # gradients for every trainable layer
        grads = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
        memory[view] = {"rss_growth_bytes": rss() - before, "gradient_bytes": grads}
        del ddp, model
    if rank == 0:
        Path(out).write_text(json.dumps({"init_s": results, "memory": {str(k): v for k, v in memory.items()}}))
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLUX_BASE_BYTES = 23.8e9  # FLUX.1-dev transformer in bf16 (docs: ../shared real-scale table)
SD35M_BASE_BYTES = 4.9e9  # SD3.5-Medium transformer in bf16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frozen-gb", type=float, default=1.0, help="frozen bf16 weights per rank (GB)")
    p.add_argument("--trainable-mb", type=float, default=200.0, help="trainable fp32 weights per rank (MB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "ddp_startup.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(rank_main, args=(2, free_port(), args, f"{d}/r.json"), nprocs=2, join=True)
        r = json.loads(Path(f"{d}/r.json").read_text())
    init, mem = r["init_s"], r["memory"]
    saved = init["broadcast all"] - init["skip frozen"]
    bandwidth = args.frozen_gb * 1e9 / max(saved, 1e-9)  # bytes/s of the frozen broadcast, measured
    rows = [("DDP construction, broadcast all (s)", f"{init['broadcast all']:.3f}"),
            ("DDP construction, skip frozen (s)", f"{init['skip frozen']:.3f}"),
            (f"saved per start / restart for {args.frozen_gb:g} GB frozen (s)", f"{saved:.3f}"),
            ("frozen broadcast bandwidth here, gloo loopback (GB/s)", f"{bandwidth / 1e9:.2f}"),
            ("  projected for FLUX.1-dev's 23.8 GB base at that bandwidth (s)", f"{FLUX_BASE_BYTES / bandwidth:.1f}"),
            ("  projected for SD3.5-Medium's 4.9 GB base (s)", f"{SD35M_BASE_BYTES / bandwidth:.1f}"),
            ("RSS growth after backward, gradient_as_bucket_view off (MB)", f"{mem['False']['rss_growth_bytes'] / 1e6:.0f}"),
            ("RSS growth after backward, gradient_as_bucket_view on (MB)", f"{mem['True']['rss_growth_bytes'] / 1e6:.0f}"),
            ("  gradient bytes (MB)", f"{mem['True']['gradient_bytes'] / 1e6:.0f}")]
    width = max(len(k) for k, _ in rows)
    print(f"DDP start-up, 2 gloo ranks, {args.frozen_gb:g} GB frozen bf16 + {args.trainable_mb:g} MB trainable fp32 per rank "
          f"(median of {args.repeats}; {os.cpu_count()} cores, torch {torch.__version__})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"frozen_gb": args.frozen_gb, "trainable_mb": args.trainable_mb, "repeats": args.repeats, **r,
                                    "saved_s": saved, "broadcast_gb_per_s": bandwidth / 1e9,
                                    "projected_saved_s": {"flux.1-dev": FLUX_BASE_BYTES / bandwidth, "sd3.5-medium": SD35M_BASE_BYTES / bandwidth},
                                    "cpu_count": os.cpu_count(), "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
