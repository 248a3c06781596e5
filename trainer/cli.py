"""The command line shared by the trainers' entry points (trainer.reference, trainer.main)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from danceopd.config import ConfigError, parse_override


def parse_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=Path, help="YAML run or job config (default: embedded defaults)")
    p.add_argument("--no-resume", action="store_true", help="start a new run even if this run has checkpoints")
    p.add_argument("--eval", action="store_true", help="evaluate after training; write report.json + grid.png")
    p.add_argument("overrides", nargs="*", help="key.path=value settings, e.g. steps=100 optim.lr=3e-4 cluster.num_workers=4")
    return p.parse_intermixed_args(argv)


def load_or_report(loader, args: argparse.Namespace):
    """The validated config, or None after printing the error (the caller exits 2)."""
    try:
        return loader(args.config, dict(parse_override(o) for o in args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
