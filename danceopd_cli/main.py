"""`danceopd` command line.

    danceopd train --config configs/demo.yaml --eval [--reference] [key.path=value ...]
    danceopd serve configs/teachers.yaml [--address ADDR] [--host H] [--port P]
    danceopd query t2i --prompt "a red circle" --sigma 0.5 --url http://127.0.0.1:8000
    danceopd eval --student runs/demo/student --config configs/demo.yaml
    danceopd experiment experiments/specs/*.yaml --report docs/results.md [--smoke]
    danceopd bench step|teachers|learning|families|shared-base [its arguments]
    danceopd serve-config configs/teachers.yaml > deploy/serve-teachers.yaml
    danceopd prefetch --config configs/gpu-cluster.yaml   (HF_HOME: the shared cache; HF_TOKEN for gated models)
    danceopd plan --config configs/gpu-cluster.yaml --gpu-memory 80 [--json plan.json]
    danceopd tiny-pipeline --family sd3|flux|flux-kontext|flux2|flux2-klein|z-image|qwen-image|qwen-image-edit[-plus] --out DIR
                           [--seed N] [--sample-size PX]
    danceopd tiny-lora --base DIR --out DIR [--rank R] [--std S] [--seed N]

Exit codes: 0 ok, 2 bad input (config, paths), 1 unexpected failure. `python -m trainer.main` stays the entry point
of `ray job submit` (it is what `danceopd train` runs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = {  # name -> (script, what it measures); the scripts live in the repository's benchmarks/
    "step": ("step.py", "training samples/s: the reference trainer and the distributed job, one speed-up at a time"),
    "teachers": ("teacher_query.py", "teacher query cost: in-process vs Serve handle vs REST, and batched throughput"),
    "learning": ("learning.py", "train from scratch for --minutes; per-capability scores against the teachers"),
    "families": ("families.py", "per model family: LoRA distillation of a tiny base + LoRA teacher on the distributed job"),
    "shared-base": ("shared_base.py", "adapter teachers on one shared base vs merged copies: memory and per-query cost"),
}

from danceopd.config import ConfigError, load_config, parse_override


# = danceopd.testing.tiny.FAMILIES, spelt out so that the CLI starts without importing torch (a test keeps them equal)
TINY_FAMILIES = ("sd3", "sd3.5", "flux", "flux-kontext", "flux2", "flux2-klein", "z-image", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus")

def _eval(args) -> int:
    from danceopd.data.routes import build_route_data
    from danceopd.evaluation import evaluate_run, summary_table, write_report
    from danceopd.routes import build_route_fields
    from danceopd.student import STUDENT_MARKER, is_student_folder, load_student
    from danceopd.suite import CapabilitySuite
    from trainer.steps import run_sigmas

    from trainer.job import JobConfig

    cfg = load_config(args.config, dict(parse_override(o) for o in args.overrides), model=JobConfig)  # run or job file
    if not is_student_folder(args.student):
        raise ConfigError(f"--student {args.student}: not a saved student folder (expected {args.student}/{STUDENT_MARKER}); "
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
    from danceopd.testing.tiny import build_tiny_pipeline

    try:
        path = build_tiny_pipeline(args.family, args.out, seed=args.seed, sample_size=args.sample_size)
    except ValueError as e:  # e.g. a sample size that is not a multiple of 4
        raise ConfigError(str(e)) from e
    print(path)
    return 0


def _tiny_lora(args) -> int:
    from danceopd.testing.tiny import build_random_lora

    if not (args.base / "model_index.json").exists():
        raise ConfigError(f"--base {args.base}: not a diffusers pipeline folder (no model_index.json); make one with `danceopd tiny-pipeline`")
    print(build_random_lora(args.base, args.out, rank=args.rank, std=args.std, seed=args.seed))
    return 0


def _tiny_hub(args) -> int:
    from danceopd.config import ConfigError, describe_sources
    from danceopd.prefetch import sources_in, settings_of
    from danceopd.testing.tiny_hub import build_tiny_hub

    sources = [s for config in args.config for s in sources_in(settings_of(config))]  # each recipe's models, together
    print(f"tiny models for the hub ids of {describe_sources(args.config)} -> {args.out / 'hub'}", flush=True)
    try:
        written = build_tiny_hub(sources, args.out, say=lambda m: print(m, flush=True))
    except ValueError as e:  # a hub id with no known stand-in and no family
        raise ConfigError(str(e)) from None
    print(f"{len(written)} hub models; use them with: export HF_HOME={args.out.resolve()} HF_HUB_OFFLINE=1")
    return 0


def _train(args) -> int:
    if args.reference:
        from trainer.reference import run
    else:
        from trainer.main import run
    return run(args)


def _serve(args) -> int:
    """Deploy the teachers file's teacher applications, REST gateway and router on a Ray cluster."""
    import contextlib
    import signal

    from router.deployment import router_app
    from services.teachers.app import GATEWAY_APP, deploy_teachers, router_args
    from services.teachers.config import load_teachers_config
    from trainer.main import quiet_console

    cfg = load_teachers_config(args.config)  # every key validated before Ray starts
    address = args.address or os.environ.get("RAY_ADDRESS")
    log_file = quiet_console(args.logs, args.verbose, "serve.log")
    import ray
    from ray import serve

    with contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(open(log_file, "a")):
        if address:
            ray.init(address=address, logging_level="WARNING", log_to_driver=args.verbose)
        else:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING", configure_logging=False, log_to_driver=args.verbose)
        print(f"{'attached to ' + address if address else 'started a local Ray'}; framework logs: {log_file.resolve()}", flush=True)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"enable_access_log": False})
        t0 = time.perf_counter()
        deploy_teachers(cfg, listen_host=args.host)
        if cfg.router.enabled:
            serve.run(router_app(router_args(cfg, args.host)), name="router", route_prefix=cfg.router.route_prefix)
    names = [cfg.app_name(t.name) for t in cfg.teachers if t.deploy]
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"deployed {len(names)} teachers {names}, {GATEWAY_APP}{' and router' if cfg.router.enabled else ''} in {time.perf_counter() - t0:.0f} s")
    print(f"REST: {url}{cfg.gateway.route_prefix.rstrip('/')}/v1/fields (danceopd query <teacher> --sigma 0.5 --url {url})")
    if cfg.router.enabled:
        print(f"router: {url}{cfg.router.route_prefix}/v1/runs")
    if address:
        print("the applications keep running on the cluster (serve status; serve delete <name>)")
        return 0
    print("serving on this machine's own Ray until Ctrl-C", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


def _prefetch(args) -> int:
    from danceopd.config import describe_sources
    from danceopd.models.hub import hub_cache
    from danceopd.prefetch import prefetch, settings_of, sources_in

    overrides = dict(parse_override(o) for o in args.overrides)
    settings = settings_of(args.config, overrides)

    def validate() -> None:
        if isinstance(settings.get("teachers"), list):
            from services.teachers.config import load_teachers_config

            load_teachers_config(settings)
        else:
            from trainer.job import load_job_config

            load_job_config(args.config, overrides)

    try:  # a bad key or value stops here, before any download (exit 2) ...
        validate()
        checked = True
    except ConfigError as e:  # ... unless what fails is a model this command is about to fetch (a hub id's family)
        if "danceopd prefetch" not in str(e):
            raise
        checked = False
    sources = sources_in(settings)
    print(f"{len(sources)} models named by {describe_sources(args.config)}; Hugging Face cache: {hub_cache()} "
          f"(HF_HOME={os.environ.get('HF_HOME', '<unset>')}; token: {'HF_TOKEN' if os.environ.get('HF_TOKEN') else 'none'})", flush=True)
    if prefetch(sources, say=lambda m: print(m, flush=True)):
        return 1
    if not checked:  # with the models here, the whole config validates (families from the cache, LoRA keys against bases)
        validate()
        print(f"{describe_sources(args.config)} validates with these models", flush=True)
    return 0


def _plan(args) -> int:
    import json

    from danceopd.memory_plan import PlanError, plan_job
    from danceopd.offline import models_only
    from trainer.job import gpu_memory_of, load_job_config

    with models_only() as unchecked:  # the plan needs the models' configs only: data and LoRA files may be elsewhere
        job = load_job_config(args.config, dict(parse_override(o) for o in args.overrides))
        gib = gpu_memory_of(job, args.gpu_memory)
        try:
            plan = plan_job(job, gib)
        except PlanError as e:
            raise ConfigError(str(e)) from None
    plan.notes = [f"not checked: {u}" for u in unchecked] + plan.notes
    print(plan.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan.as_json(), indent=2))
        print(f"wrote {args.json}")
    if plan.fits is False:
        print(f"error: {plan.refusal()}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    script = REPO / "benchmarks" / BENCHMARKS[args.name][0]
    if not script.exists():
        raise ConfigError(f"{script} does not exist: benchmarks run from a clone of the repository (pip install -e .)")
    return subprocess.run([sys.executable, str(script), *args.args], cwd=REPO).returncode


def main(argv: list[str] | None = None) -> int:
    from services.teachers.query_cli import CliError, add_parser as add_query
    from trainer.cli import add_train_arguments

    parser = argparse.ArgumentParser(prog="danceopd", description="DanceOPD: distil several flow-matching teachers (capabilities) "
                                     "into one student, with teachers served on Ray Serve and training on Ray Train.",
                                     epilog="Each command's --help says more. Exit codes: 0 ok, 2 bad input (naming the key), 1 failure.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser("train", help="train a student: the distributed job (default) or the single-process reference trainer",
                        description="Train a student. By default the distributed job: teachers on Ray Serve, the router, Ray Train "
                                    "workers (a local Ray unless RAY_ADDRESS or cluster.address names one); with --reference, the "
                                    "single-process reference trainer. For `ray job submit`, the entrypoint is `python -m trainer.main` "
                                    "with the same arguments. Re-running resumes the run from its latest checkpoint.")
    tr.add_argument("--reference", action="store_true", help="the single-process reference trainer (no Ray)")
    add_train_arguments(tr)
    tr.set_defaults(run=_train)
    sv = sub.add_parser("serve", help="deploy the teachers, REST gateway and router of a teachers file on Ray Serve",
                        description="Deploy every teacher of a teachers file (one Serve application each), the REST gateway and the "
                                    "router. On a cluster (--address or RAY_ADDRESS) it deploys and returns; otherwise it starts a "
                                    "local Ray and serves until Ctrl-C. `serve deploy` of the file rendered by `danceopd serve-config` "
                                    "does the same with Ray's own CLI.")
    sv.add_argument("config", type=Path, help="teachers file, e.g. configs/teachers.yaml")
    sv.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    sv.add_argument("--host", default="127.0.0.1", help="Serve's HTTP host (beyond loopback the REST APIs need a token)")
    sv.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    sv.add_argument("--logs", type=Path, default=Path("runs/serve/logs"), help="folder for the framework logs (serve.log)")
    sv.add_argument("--verbose", action="store_true", help="show what Ray and Serve say on the console")
    sv.set_defaults(run=_serve)
    add_query(sub)
    pf = sub.add_parser("prefetch", help="download every model a config names into the Hugging Face cache ($HF_HOME), once",
                        description="Download every model a training config or teachers file names (student base, teachers' bases, "
                                    "checkpoints and LoRAs, the CLIP model of eval.clip_model) into the Hugging Face cache, "
                                    "$HF_HOME: the cache the cluster's nodes share, so that no worker or replica downloads at "
                                    "start-up. Gated models need HF_TOKEN. Prints each model's size; exit 1 naming each model it "
                                    "could not fetch.")
    pf.add_argument("--config", type=Path, action="append", required=True, help="a training config (configs/gpu-cluster.yaml) "
                    "or a teachers file; given again, later files override earlier ones key by key")
    pf.add_argument("overrides", nargs="*", help="key.path=value, as for train")
    pf.set_defaults(run=_prefetch)
    pl = sub.add_parser("plan", help="the memory each worker, teacher replica and evaluation will hold, before anything loads",
                        description="Per process role (train_worker, teacher:<deployment>, evaluation): frozen weights by component, "
                                    "trainable weights, gradients, AdamW, EMA, caches and activations at the configured batch and "
                                    "resolution, computed on the meta device from the models' configs (no weights, no network), "
                                    "and each teacher's expected busy fraction. With a GPU size: whether each role fits its share "
                                    "(exit 2 if not, as the job itself refuses under cluster.memory_check: strict).")
    pl.add_argument("--config", type=Path, action="append", required=True, help="a training job config; given again, later "
                    "files override earlier ones key by key (e.g. --config RECIPE --config configs/smoke.yaml)")
    pl.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory of one GPU (default: cluster.gpu_memory_gib, else this machine's GPU)")
    pl.add_argument("--json", type=Path, metavar="F", help="also write the plan as JSON")
    pl.add_argument("overrides", nargs="*", help="key.path=value, as for train")
    pl.set_defaults(run=_plan)
    sc = sub.add_parser("serve-config", help="render the `serve deploy` config for a teachers config")
    sc.add_argument("config", type=Path)
    sc.add_argument("--host", default="0.0.0.0")
    sc.add_argument("--port", type=int, default=8000)
    sc.set_defaults(run=_serve_config)
    ev = sub.add_parser("eval", help="sample a student per capability, score it against the exact teachers, write report.json + grid.png")
    ev.add_argument("--student", type=Path, required=True, help="a saved student folder (e.g. a checkpoint's student/)")
    ev.add_argument("--config", type=Path, action="append", help="run config naming the routes and eval settings (default: "
                    "embedded); given again, later files override earlier ones key by key")
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
    tp.add_argument("--family", required=True, choices=TINY_FAMILIES)
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
    th = sub.add_parser("tiny-hub", help="write an offline Hugging Face cache of tiny random models under the hub ids configs name",
                        description="For every hub id the configs name (student and teacher bases, checkpoints, LoRA repositories, "
                                    "a CLIP model), write a tiny random model with the real repository's pipeline class and "
                                    "components (LoRAs in the real repository's file name and format) into <out>/hub, the standard "
                                    "cache layout. Then HF_HOME=<out> HF_HUB_OFFLINE=1 runs the recipes on a CPU, no hub needed. "
                                    "Offline, seconds.")
    th.add_argument("--config", type=Path, action="append", required=True, help="a recipe or teachers file (repeat for several)")
    th.add_argument("--out", type=Path, required=True, help="the HF_HOME to write (the cache is <out>/hub)")
    th.set_defaults(run=_tiny_hub)
    bn = sub.add_parser("bench", help="run a benchmark (prints a table, writes benchmarks/results/<name>.json)",
                        description="Run one of the repository's benchmarks; arguments after the name go to it (see "
                                    "`danceopd bench NAME --help`). " + " ".join(f"{k}: {v[1]}." for k, v in BENCHMARKS.items()),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bn.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    bn.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments, e.g. --repeats 3 or key.path=value")
    bn.set_defaults(run=_bench)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["train"]:  # options and key=value overrides in any order, as the trainers take them
        args = tr.parse_intermixed_args(argv[1:])
    else:
        args, extra = parser.parse_known_args(argv)
        unknown = [e for e in extra if e.startswith("-") or "=" not in e or args.command not in ("eval", "prefetch")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # exits 2
        if args.command in ("eval", "prefetch"):
            args.overrides = list(args.overrides) + extra
    try:
        return args.run(args)
    except (ConfigError, CliError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
