"""Training throughput, one speed-up at a time: the reference trainer and the distributed job at equal config
and equal sample budget, from the sequential full-rollout loop of before to the defaults, plus a simulated
device-bound teacher (a teacher that sleeps for one student forward per call, using no core).

    python benchmarks/step.py [--config experiments/base.yaml] [--steps 150] [--repeats 1] [key=value ...]

Prints a table (samples/s, step-time shares, ratios) and writes benchmarks/results/step.json. Samples/s are
steady-state: the first log window (start-up, first allocations) is left out. Ratios are taken within a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from danceopd.config import ConfigError, load_config, parse_override  # noqa: E402
from danceopd.flow import rollout_to_queries, sample_query_indices  # noqa: E402
from trainer.job import JobConfig  # noqa: E402

SEQUENTIAL = {"execution.truncate_rollout": False, "execution.overlap_teacher": False, "execution.prefetch_routing": False,
              "execution.find_unused_parameters": True}  # the distributed loop as it was before these speed-ups
CASES = [  # (name, trainer, overrides); "sim" trainers query the simulated device-bound teachers
    ("reference, full rollout (before)", "reference", {"execution.truncate_rollout": False}),
    ("reference (defaults)", "reference", {}),
    ("distributed, sequential, full rollout (before)", "distributed", SEQUENTIAL),
    ("+ truncated rollouts", "distributed", {**SEQUENTIAL, "execution.truncate_rollout": True}),
    ("+ async teacher dispatch", "distributed", {**SEQUENTIAL, "execution.truncate_rollout": True, "execution.overlap_teacher": True}),
    ("+ prefetch, async reports, no unused search (defaults)", "distributed", {}),
    ("+ one-step-stale schedule", "distributed", {"method.staleness": 1}),
    ("(not default) defaults + cache-sized rollout chunks", "distributed", {"execution.rollout_chunk": "auto"}),
    ("SIMULATED teacher: sequential", "sim", {"execution.overlap_teacher": False}),
    ("SIMULATED teacher: async dispatch (defaults)", "sim", {}),
    ("SIMULATED teacher: one-step-stale", "sim", {"method.staleness": 1}),
]
BASELINE, REFERENCE, DEFAULTS = CASES[0][0], CASES[1][0], CASES[5][0]


def steady_rate(history: list[dict], samples_per_step: int) -> float:
    """Samples/s between the first and the last log window (start-up excluded)."""
    first, last = history[0], history[-1]
    return (last["step"] - first["step"]) * samples_per_step / (last["elapsed_s"] - first["elapsed_s"])


def run_reference(job: JobConfig, threads: int) -> dict:
    from trainer.reference import ReferenceTrainer

    cfg = job.model_copy(update={"torch_threads": threads})
    tr = ReferenceTrainer(cfg, log=lambda m: None)
    tr.fit()
    return {"samples_per_s": steady_rate(tr.history, cfg.optim.batch_size * cfg.optim.grad_accum),
            "time_share": tr.history[-1]["time_share"]}


def run_job(job: JobConfig) -> dict:
    from trainer.distributed import run_distributed

    result = run_distributed(job, f"bench-step-{uuid.uuid4().hex[:8]}")
    if result.error is not None:
        raise RuntimeError(f"distributed run failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / "state.json").read_text())["history"]
    return {"samples_per_s": steady_rate(history, job.optim.batch_size * job.optim.grad_accum),
            "time_share": result.metrics["time_share_total"]}


def rollout_rows(job: JobConfig, batch: int, draws: int = 500) -> float:
    """Velocity rows a truncated rollout computes per sample, as a share of the full rollout's N."""
    n, m = job.method.rollout_steps, job.method
    k = n if m.query_position == "dense" else m.k
    g = torch.Generator().manual_seed(0)
    rows = sum(rollout_to_queries(lambda x, s, r: torch.zeros_like(x), torch.zeros(batch, 1), torch.linspace(1, 0, n + 1),
                                  sample_query_indices(n, batch, k, m.query_position, g, m.query_sampling)).rows_evaluated
               for _ in range(draws))
    return rows / (draws * batch * n)


def student_forward_s(job: JobConfig) -> float:
    """Median seconds of one no-grad student forward on one worker's query batch (the simulated teacher's cost)."""
    from danceopd.data.routes import build_route_data
    from danceopd.student import build_student
    from danceopd.suite import CapabilitySuite

    torch.set_num_threads(job.torch_threads or 1)
    student = build_student(job.student, job.device, job.dtype)
    device = student.field.device
    suite = CapabilitySuite(job.suite.tier, job.suite.tau, job.suite.seed)
    route = next(iter(job.routes))
    cond = build_route_data(job, suite, student)[route].sample(job.worker_batch_size, 0).repeat(job.method.k).to(device)
    x = torch.randn(len(cond), *student.field.info.sample_shape, device=device)
    sigma = torch.full((len(cond),), 0.3, device=device)
    times = []
    with torch.no_grad():
        for _ in range(25):
            t0 = time.perf_counter()
            student.field.velocity(x, sigma, cond)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[5:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("experiments/base.yaml"))
    p.add_argument("--steps", type=int, default=150, help="steps per case (the first log window is left out)")
    p.add_argument("--repeats", type=int, default=1, help="run every case this many times; ratios are per repeat")
    p.add_argument("--cases", default=None, help="comma-separated case numbers (1-based) to run; default all")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/step.json"))
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    over = {"steps": a.steps, "log_every": 25, "checkpoint_every": a.steps, "max_minutes": None, "optim.lr_schedule": "constant",
            "run_name": "bench-step", "output_dir": str(Path("runs").resolve()), "services.gateway": False, "cluster.local_num_cpus": 8,
            **dict(parse_override(o) for o in a.overrides)}
    try:
        base = load_config(a.config, over, model=JobConfig)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = [CASES[int(i) - 1] for i in a.cases.split(",")] if a.cases else CASES
    ref_threads = base.cluster.num_workers * (base.torch_threads or 1)  # the reference gets the workers' cores
    sim_s = student_forward_s(base)
    rows = {"worker": rollout_rows(base, base.worker_batch_size), "reference": rollout_rows(base, base.optim.batch_size)}
    print(f"config {a.config}: {a.steps} steps/case, batch {base.optim.batch_size} ({base.cluster.num_workers} workers x "
          f"{base.worker_batch_size}), rollout {base.method.rollout_steps} steps, query {base.method.query_position}")
    print(f"truncated rollout: {rows['worker']:.3f} (worker batch) / {rows['reference']:.3f} (reference batch) of the full "
          f"rollout's velocity rows per sample; simulated teacher call = one student forward = {sim_s * 1000:.1f} ms", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _, _ in chosen}
    for rep in range(a.repeats):
        for name, trainer, case in chosen:  # the reference first, on a machine without Ray
            if trainer == "reference":
                results[name].append(run_reference(load_config(a.config, {**over, **case}, model=JobConfig), ref_threads))
                print(f"[{rep + 1}/{a.repeats}] {name}: {results[name][-1]['samples_per_s']:.1f} samples/s", flush=True)
        if any(t != "reference" for _, t, _ in chosen):
            import ray

            from trainer.main import connect, ensure_services

            connect(base, verbose=False)  # as `make demo`: the workers' output stays in Ray's logs
            sim = {"services.app_prefix": "sim-", "services.teacher_defaults.simulated_call_s": round(sim_s, 4)}
            ensure_services(base, log=lambda m: None)
            for name, trainer, case in chosen:  # the simulated teachers come up after the real cases: idle replicas cost a share of a core
                if trainer == "sim":
                    ensure_services(load_config(a.config, {**over, **sim}, model=JobConfig), log=lambda m: None)
                if trainer != "reference":
                    job = load_config(a.config, {**over, **case, **(sim if trainer == "sim" else {})}, model=JobConfig)
                    results[name].append(run_job(job))
                    print(f"[{rep + 1}/{a.repeats}] {name}: {results[name][-1]['samples_per_s']:.1f} samples/s", flush=True)
            ray.shutdown()

    def ratio(num: str, den: str) -> list[float]:
        if not (results.get(num) and results.get(den)):
            return []
        return [n["samples_per_s"] / d["samples_per_s"] for n, d in zip(results[num], results[den])]

    ratios = {"distributed_vs_baseline": ratio(DEFAULTS, BASELINE), "distributed_vs_reference": ratio(DEFAULTS, REFERENCE)}
    print(f"\n{'case':<55}{'samples/s':>10}{'vs before':>10}  step-time shares (rollout / teacher / fwd-bwd / optim / router)")
    table = []
    for name, trainer, case in chosen:
        runs = results[name]
        rate = statistics.median(r["samples_per_s"] for r in runs)
        share = runs[-1]["time_share"]
        rel = ratio(name, BASELINE if trainer == "reference" else CASES[2][0])
        table.append({"case": name, "trainer": trainer, "overrides": case, "samples_per_s": [r["samples_per_s"] for r in runs],
                      "time_share": share, "vs_before": rel})
        parts = " / ".join(f"{share.get(k, 0):.0%}" for k in ("rollout", "teacher", "forward_backward", "optimizer", "router"))
        print(f"{name:<55}{rate:>10.1f}{(statistics.median(rel) if rel else float('nan')):>10.2f}  {parts}")
    for key, vals in ratios.items():
        if vals:
            print(f"{key}: {statistics.median(vals):.2f}" + (f" (range {min(vals):.2f}-{max(vals):.2f} over {len(vals)} runs)" if len(vals) > 1 else ""))
    out = {"benchmark": "step", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "config": str(a.config), "overrides": over, "steps_per_case": a.steps, "repeats": a.repeats,
           "truncated_rollout_rows_per_sample": rows, "simulated_teacher_call_s": sim_s, "cases": table,
           "ratios": {k: statistics.median(v) for k, v in ratios.items() if v},
           "ratio_runs": {k: v for k, v in ratios.items() if v}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
