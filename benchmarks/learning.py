"""Learning benchmark: train a student from scratch with DanceOPD defaults for a wall-clock budget, then score
it per capability against the exact teachers (accuracy / edit success beside PSNR and T2I mode coverage).

    python benchmarks/learning.py --minutes 10 [--config experiments/base.yaml] [--device cuda] [key=value ...]

Prints a table and writes benchmarks/results/learning-<tier>-<device>.json (and the run's grid.png).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from danceopd.config import ConfigError, load_config, parse_override  # noqa: E402
from danceopd.evaluation import evaluate, summary_table, write_report  # noqa: E402
from danceopd.student import count_parameters  # noqa: E402
from trainer.job import JobConfig  # noqa: E402
from trainer.reference import ReferenceTrainer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=Path("experiments/base.yaml"))
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    over = dict(parse_override(o) for o in a.overrides)
    over.setdefault("steps", 1_000_000)
    over.setdefault("optim.lr_schedule", "constant")  # the run's length is a time budget, not a step count
    over["max_minutes"] = a.minutes
    over.setdefault("run_name", f"bench-learning-{int(time.time())}")
    over.setdefault("output_dir", "runs")
    if a.device:
        over["device"] = a.device
    try:
        cfg = load_config(a.config, over, model=JobConfig)  # job files carry cluster/services too
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr = ReferenceTrainer(cfg, log=lambda m: print(m, flush=True))
    with tr.final_weights():
        before = evaluate(tr.student.field, tr.teachers, cfg.routes, tr.suite, cfg.eval, device=tr.device)
    t0 = time.perf_counter()
    run = tr.fit()
    train_s = time.perf_counter() - t0
    with tr.final_weights():
        after = evaluate(tr.student.field, tr.teachers, cfg.routes, tr.suite, cfg.eval, device=tr.device, grid_path=cfg.run_dir / "grid.png")
    device = str(tr.device)
    card = torch.cuda.get_device_name(tr.device) if tr.device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {
        "tier": cfg.suite.tier, "device": device, "card": card, "minutes_budget": a.minutes,
        "steps": tr.step, "train_seconds": train_s, "seconds_per_step": train_s / max(run["steps"], 1),
        "student_parameters": count_parameters(tr.student.transformer),
        "time_share": tr.history[-1]["time_share"] if tr.history else None,
        "before": before, "after": after, "config": json.loads(cfg.model_dump_json()),
    }
    print("\nbefore training:\n" + summary_table(before))
    print(f"\nafter {tr.step} steps ({train_s / 60:.1f} min, {result['seconds_per_step']:.3f} s/step) on {card}:\n" + summary_table(after))
    out = a.out or Path("benchmarks/results") / f"learning-{cfg.suite.tier}-{tr.device.type}.json"
    write_report(result, out)
    print(f"\nresults: {out}\ngrid:    {after['grid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
