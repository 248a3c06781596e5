"""The command line shared by the trainers' entry points (trainer.reference, trainer.main)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from danceopd.config import ConfigError, differences, parse_override


def parse_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_train_arguments(p)
    return p.parse_intermixed_args(argv)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The trainers' arguments (also those of `danceopd train`)."""
    p.add_argument("--config", type=Path, action="append", help="YAML run or job config (default: embedded defaults); given "
                   "again, each later file overrides the earlier ones key by key (e.g. --config RECIPE --config configs/smoke.yaml)")
    p.add_argument("--no-resume", action="store_true", help="start a new run even if this run has checkpoints")
    p.add_argument("--eval", action="store_true", help="evaluate after training; write report.json + grid.png")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though settings that change what is trained differ from the run's (named on refusal)")
    p.add_argument("--verbose", action="store_true",
                   help="also show what Ray, Serve, Ray Train and the model libraries say (by default: <run_dir>/logs)")
    p.add_argument("overrides", nargs="*", help="key.path=value settings, e.g. steps=100 optim.lr=3e-4 cluster.num_workers=4")


def load_or_report(loader, args: argparse.Namespace):
    """The validated config, or None after printing the error (the caller exits 2)."""
    try:
        return loader(args.config, dict(parse_override(o) for o in args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


# Settings that change how a run executes or how far it goes, never what an update computes: a resumed run may
# change them freely (more steps, another time budget, more logging, other services or cluster knobs).
FREE_ON_RESUME = ("steps", "max_minutes", "log_every", "keep_checkpoints", "eval.", "execution.", "tracking.", "device", "torch_threads",
                  "output_dir", "run_name", "services.", "cluster.", "student.save_dtype", "student.save_merged",
                  "data.latent_cache_entries")
FIXED_ON_RESUME = ("cluster.num_workers",)  # the per-worker batch and the router's registration follow from it


def _fixed(key: str) -> bool:
    return key in FIXED_ON_RESUME or not any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE_ON_RESUME)


def check_resume_config(cfg, fresh: bool, allow_change: bool) -> list[str]:
    """Compare the run's saved config (run_dir/config.json) with this one before anything starts; returns the keys
    that differ. A resumed run with other trained-what settings is refused (ConfigError naming the keys) unless
    `allow_change`; the file is (re)written for a new run and for an allowed change."""
    path = cfg.run_dir / "config.json"
    dumped = json.loads(cfg.model_dump_json())
    changed: list[str] = []
    if not fresh and path.exists():
        diff = {k: v for k, v in differences(json.loads(path.read_text()), dumped).items() if _fixed(k)}
        changed = list(diff)
        if changed and not allow_change:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:8])
            raise ConfigError(f"resuming run {cfg.run_dir} with changed settings ({shown}"
                              f"{', ...' if len(changed) > 8 else ''}); pass --allow-config-change to resume anyway, "
                              f"--no-resume to start a new run, or another run_name")
        if not changed:
            return []
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dumped, indent=2))
    return changed


def resume_config_or_report(cfg, args: argparse.Namespace) -> bool:
    """check_resume_config for a CLI: False after printing the refusal (the caller exits 2)."""
    try:
        changed = check_resume_config(cfg, args.no_resume, args.allow_config_change)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    if changed:
        print(f"resuming with changed settings (--allow-config-change): {', '.join(changed)}", flush=True)
    return True
