"""`danceopd` command line.

    danceopd eval --student runs/demo/student --config configs/demo.yaml
    danceopd query t2i --prompt "a red circle" --sigma 0.5 --url http://127.0.0.1:8000
    danceopd serve-config configs/teachers.yaml > deploy/serve-teachers.yaml
    danceopd experiment experiments/specs/*.yaml --report docs/results.md [--smoke]
    danceopd tiny-pipeline --family sd3|flux|flux-kontext --out DIR [--seed N] [--sample-size PX]
    danceopd tiny-lora --base DIR --out DIR [--rank R] [--std S] [--seed N]

Exit codes: 0 ok, 2 bad input (config, paths), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from danceopd.config import ConfigError, load_config, parse_override


def _eval(args) -> int:
    from danceopd.data.routes import build_route_data
    from danceopd.evaluation import evaluate_run, summary_table, write_report
    from danceopd.routes import build_route_fields
    from danceopd.student import load_student
    from danceopd.suite import CapabilitySuite
    from trainer.steps import run_sigmas

    from trainer.job import JobConfig

    cfg = load_config(args.config, dict(parse_override(o) for o in args.overrides), model=JobConfig)  # run or job file
    if not (args.student / "danceopd_student.json").exists():
        raise ConfigError(f"--student {args.student}: not a saved student folder (expected {args.student}/danceopd_student.json); "
                          "pass a checkpoint's student/ folder")
    student = load_student(args.student, device=cfg.device, dtype=cfg.dtype)
    if student.family.name == "pixel" and student.config.sample_size != world_size(cfg.suite.tier):
        raise ConfigError(f"--student {args.student} makes {student.config.sample_size}px images but suite.tier {cfg.suite.tier!r} needs {world_size(cfg.suite.tier)}px")
    suite = CapabilitySuite(cfg.suite.tier, cfg.suite.tau, cfg.suite.seed)
    teachers = build_route_fields(cfg, suite, device=student.field.device, dtype=cfg.dtype)
    out = args.out or args.student.parent / "eval"
    student.transformer.eval()
    report = evaluate_run(student, teachers, cfg, suite, build_route_data(cfg, suite, student), run_sigmas(cfg, student),
                          device=student.field.device, grid_path=out / "grid.png")
    path = write_report(report, out / "report.json")
    print(summary_table(report))
    print(f"report: {path}\ngrid:   {report['grid']}")
    return 0


def world_size(tier: str) -> int:
    from danceopd.suite.world import get_tier

    return get_tier(tier).size


def _serve_config(args) -> int:
    from services.teachers.app import render_serve_config
    from services.teachers.config import load_teachers_config

    print(render_serve_config(load_teachers_config(args.config), str(args.config), args.host, args.port), end="")
    return 0


def _experiment(args) -> int:
    from experiments.report import claim_line, claims_table, diversity_table, write_report
    from experiments.runner import run_experiment
    from experiments.spec import load_spec

    specs = [load_spec(p) for p in args.specs]  # every spec and every run config validates before anything trains
    sections = []
    t0 = time.perf_counter()
    for spec in specs:
        results = run_experiment(spec, args.out, smoke=args.smoke, log=lambda m: print(m, flush=True))
        # With --report, the per-experiment JSON, tables and plots sit beside it (docs/results/<name>.*), small
        # enough to commit; the runs themselves (checkpoints) stay under --out.
        where = args.report.parent / args.report.stem if args.report else args.out / spec.name
        summary = write_report(spec, results, where)
        sections.append((spec.name, summary, where / f"{spec.name}.md", results))
        for c in summary["claims"]:
            print(f"{spec.name}: {claim_line(c)}")
    if args.report:
        import os

        import torch

        sections = merged_sections(args.report, sections)
        compute_s = sum(r["seconds"] for *_, results in sections for r in results if "reused_from" not in r)  # paid once
        args.report.parent.mkdir(parents=True, exist_ok=True)
        head = [f"# Experiment results{' (SMOKE: numbers mean nothing)' if args.smoke else ''}", "",
                f"Regenerate: `make results` (every spec). This file was last written by `danceopd experiment "
                f"{' '.join(map(str, args.specs))} --out {args.out} --report {args.report}{' --smoke' if args.smoke else ''}`, which "
                f"kept the other experiments' sections from {args.report.parent / args.report.stem}/. Training + judging time of all "
                f"runs in this report: {compute_s / 60:.1f} min (this invocation: {(time.perf_counter() - t0) / 60:.1f} min; finished runs "
                f"are reused). Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}.", ""]
        body = [md.read_text().replace("](", f"]({os.path.relpath(md.parent, args.report.parent)}/") for _, _, md, _ in sections]
        summaries = [summary for _, summary, _, _ in sections]
        args.report.write_text("\n".join(head + [claims_table(summaries)] + body + [diversity_table(summaries)]))
        print(f"report: {args.report}")
    return 0


def merged_sections(report: Path, fresh: list[tuple]) -> list[tuple]:
    """The report's experiments: those of this invocation, plus those already in the report (their summary and runs
    kept beside it, <report stem>/<name>.json), in the report's order, new ones last."""
    import json
    import re

    folder = report.parent / report.stem
    order = re.findall(r"^## (\S+)$", report.read_text(), re.M) if report.exists() else []
    now = {section[0]: section for section in fresh}
    out = []
    for name in dict.fromkeys(order + list(now)):
        if name in now:
            out.append(now[name])
        elif (folder / f"{name}.json").exists() and (folder / f"{name}.md").exists():
            kept = json.loads((folder / f"{name}.json").read_text())
            out.append((name, kept["summary"], folder / f"{name}.md", kept["runs"]))
    return out


def _tiny_pipeline(args) -> int:
    from danceopd.models.tiny import build_tiny_pipeline

    try:
        path = build_tiny_pipeline(args.family, args.out, seed=args.seed, sample_size=args.sample_size)
    except ValueError as e:  # e.g. a sample size that is not a multiple of 4
        raise ConfigError(str(e)) from e
    print(path)
    return 0


def _tiny_lora(args) -> int:
    from danceopd.models.tiny import build_random_lora

    if not (args.base / "model_index.json").exists():
        raise ConfigError(f"--base {args.base}: not a diffusers pipeline folder (no model_index.json); make one with `danceopd tiny-pipeline`")
    print(build_random_lora(args.base, args.out, rank=args.rank, std=args.std, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    from services.teachers.query_cli import CliError, add_parser as add_query

    parser = argparse.ArgumentParser(prog="danceopd", description="DanceOPD tools")
    sub = parser.add_subparsers(dest="command", required=True)
    add_query(sub)
    sc = sub.add_parser("serve-config", help="render the `serve deploy` config for a teachers config")
    sc.add_argument("config", type=Path)
    sc.add_argument("--host", default="0.0.0.0")
    sc.add_argument("--port", type=int, default=8000)
    sc.set_defaults(run=_serve_config)
    ev = sub.add_parser("eval", help="sample a student per capability, score it against the exact teachers, write report.json + grid.png")
    ev.add_argument("--student", type=Path, required=True, help="a saved student folder (e.g. a checkpoint's student/)")
    ev.add_argument("--config", type=Path, help="run config naming the routes and eval settings (default: embedded)")
    ev.add_argument("--out", type=Path, help="output folder (default: next to the student, eval/)")
    ev.add_argument("overrides", nargs="*", help="key.path=value, e.g. eval.samples_per_capability=48")
    ev.set_defaults(run=_eval)
    ex = sub.add_parser("experiment", help="run experiment specs (arms x seeds), write results JSON, markdown and plots")
    ex.add_argument("specs", nargs="+", type=Path)
    ex.add_argument("--out", type=Path, default=Path("runs/experiments"), help="run folders and per-experiment reports")
    ex.add_argument("--report", type=Path, help="also write one combined markdown report here (e.g. docs/results.md)")
    ex.add_argument("--smoke", action="store_true", help="a few steps and two seeds per arm: checks the pipeline, not the claims")
    ex.set_defaults(run=_experiment)
    tp = sub.add_parser("tiny-pipeline", help="write a tiny random diffusers pipeline (offline, for tests and demos)")
    tp.add_argument("--family", required=True, choices=("sd3", "flux", "flux-kontext"))  # = danceopd.models.tiny.FAMILIES
    tp.add_argument("--out", type=Path, required=True, help="output folder (standard diffusers layout)")
    tp.add_argument("--seed", type=int, default=0, help="same seed, same weights")
    tp.add_argument("--sample-size", type=int, default=32, help="image size in pixels (multiple of 4)")
    tp.set_defaults(run=_tiny_pipeline)
    tl = sub.add_parser("tiny-lora", help="write a random LoRA for a pipeline's transformer (a stand-in capability teacher: base + it)")
    tl.add_argument("--base", type=Path, required=True, help="the pipeline folder the adapter is for")
    tl.add_argument("--out", type=Path, required=True, help="output folder (diffusers LoRA format)")
    tl.add_argument("--rank", type=int, default=4)
    tl.add_argument("--std", type=float, default=0.1, help="std of both LoRA matrices' random entries")
    tl.add_argument("--seed", type=int, default=1)
    tl.set_defaults(run=_tiny_lora)
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "eval"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # exits 2
    if args.command == "eval":
        args.overrides = list(args.overrides) + extra
    try:
        return args.run(args)
    except (ConfigError, CliError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
