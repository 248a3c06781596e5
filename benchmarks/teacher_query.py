"""Teacher query cost: in-process forward vs Serve handle vs REST, at two batch sizes and a 16 MiB payload,
and throughput with 1, 4 and 8 concurrent callers with and without dynamic batching. One run, one machine.

    python benchmarks/teacher_query.py [--calls 40] [--seconds 6]

Prints a table and writes benchmarks/results/teacher_query.json. Ratios are within this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")  # inherited by the replicas
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from danceopd.contracts import VelocityQuery  # noqa: E402
from danceopd.fields.base import Conditions  # noqa: E402
from danceopd.student import StudentConfig, build_student  # noqa: E402
from services.teachers.app import deploy_teachers  # noqa: E402
from services.teachers.client import TeacherClient  # noqa: E402
from services.teachers.config import load_teachers_config  # noqa: E402
from services.teachers.fields import build_field  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_ms(fn, calls: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def rest_call(url: str, x: np.ndarray, sigma: float, prompt: str) -> np.ndarray:
    body = json.dumps({"x": {"b64": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}, "sigma": sigma, "prompt": prompt}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())["velocity"]
    return np.frombuffer(base64.b64decode(out["b64"]), "<f4").reshape(out["shape"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--seconds", type=float, default=6.0, help="per throughput cell")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_query.json"))
    a = p.parse_args(argv)

    import ray
    from ray import serve

    torch.set_num_threads(1)  # the replicas run with 1 torch thread: compare like with like
    model_dir = Path(tempfile.mkdtemp()) / "student"
    build_student(StudentConfig(seed=0)).save_pretrained(model_dir)
    one = {"num_cpus": 0.25}
    cfg = load_teachers_config({"teachers": [
        {"name": "model", "field": {"kind": "diffusers", "path": str(model_dir)}, "device": "cpu", "dtype": "float32",
         "ray_actor_options": one, "batching": {"enabled": False}},
        {"name": "model_batched", "field": {"kind": "diffusers", "path": str(model_dir)}, "device": "cpu", "dtype": "float32",
         "ray_actor_options": one, "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}},
        {"name": "exact", "field": {"kind": "suite", "capability": "t2i"}, "ray_actor_options": one, "batching": {"enabled": False}},
    ], "gateway": {"max_payload_mb": 64, "num_cpus": 0.1}})
    local = {t.name: build_field(t, cfg) for t in cfg.teachers}
    cases = [("model", 8, "model B=8"), ("model", 64, "model B=64"), ("exact", 5461, "16 MiB payload (exact T2I field)")]

    def inputs(b: int):
        g = torch.Generator().manual_seed(b)
        return torch.randn(b, 3, 16, 16, generator=g), torch.full((b,), 0.4), Conditions(["a red circle"] * b)

    def inproc_ms(name: str, b: int) -> float:
        x, sigma, cond = inputs(b)

        def run():
            with torch.inference_mode():
                local[name].velocity(x, sigma, cond)

        return median_ms(run, a.calls)

    # The in-process baseline runs before Ray starts (same process, same single torch thread).
    baseline = {(n, b): inproc_ms(n, b) for n, b, _ in cases}
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy_teachers(cfg)
    rows, result = [], {"latency": [], "throughput": [], "machine": f"{os.cpu_count()} cores, torch {torch.__version__}"}

    def bench(name: str, b: int, label: str):
        x, sigma, cond = inputs(b)
        client, by_ref = TeacherClient(name), TeacherClient(name, by_value=False)
        q = VelocityQuery.from_torch(x, sigma, cond)
        t_in = baseline[(name, b)]
        t_handle = median_ms(lambda: client.query(q), a.calls)
        t_ref = median_ms(lambda: by_ref._call(lambda h: h.velocity.remote(q), 1 << 40), a.calls)
        t_rest = median_ms(lambda: rest_call(f"http://127.0.0.1:{port}/v1/fields/{name}/velocity", q.x, 0.4, "a red circle"), max(8, a.calls // 2))
        rec = {"case": label, "teacher": name, "batch": b, "payload_mib": q.x.nbytes / 2**20, "in_process_ms": t_in,
               "in_process_with_ray_running_ms": inproc_ms(name, b),
               "handle_ms": t_handle, "handle_by_reference_ms": t_ref, "rest_ms": t_rest,
               "handle_ratio": t_handle / t_in, "handle_by_reference_ratio": t_ref / t_in, "rest_ratio": t_rest / t_in}
        result["latency"].append(rec)
        rows.append(rec)

    for case in cases:
        bench(*case)

    async def caller_loop(client: TeacherClient, stop: float, b: int) -> int:
        g = torch.Generator().manual_seed(0)
        x, sigma, cond = torch.randn(b, 3, 16, 16, generator=g), torch.full((b,), 0.4), Conditions(["a red circle"] * b)
        n = 0
        while time.perf_counter() < stop:
            await client.velocity_async(x, sigma, cond)
            n += b
        return n

    async def throughput(name: str, callers: int, seconds: float, b: int = 8) -> tuple[int, float]:
        client = TeacherClient(name)
        await caller_loop(client, time.perf_counter() + 0.5, b)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(caller_loop(client, start + seconds, b) for _ in range(callers)))
        return sum(counts), time.perf_counter() - start

    # Interleave the two settings in short rounds so that drift of this shared machine hits both alike.
    rounds = 4
    for callers in (1, 4, 8):
        totals = {"model": [0, 0.0], "model_batched": [0, 0.0]}
        for _ in range(rounds):
            for name in totals:
                n, dt = asyncio.run(throughput(name, callers, a.seconds / rounds))
                totals[name][0] += n
                totals[name][1] += dt
        plain, batched = (totals[k][0] / totals[k][1] for k in ("model", "model_batched"))
        result["throughput"].append({"callers": callers, "samples_per_s_unbatched": plain, "samples_per_s_batched": batched,
                                     "batched_over_unbatched": batched / plain})

    print(f"\nteacher query latency (median of {a.calls}; {result['machine']}; replicas and in-process at 1 torch thread)")
    print("in-proc: measured before Ray started; with Ray running it was " + ", ".join(
        f"{r['in_process_with_ray_running_ms']:.1f} ms" for r in rows))
    print(f"{'case':<34}{'in-proc ms':>11}{'handle ms':>11}{'ratio':>7}{'by-ref ms':>11}{'ratio':>7}{'REST ms':>10}{'ratio':>7}")
    for r in rows:
        print(f"{r['case']:<34}{r['in_process_ms']:>11.2f}{r['handle_ms']:>11.2f}{r['handle_ratio']:>7.2f}"
              f"{r['handle_by_reference_ms']:>11.2f}{r['handle_by_reference_ratio']:>7.2f}{r['rest_ms']:>10.2f}{r['rest_ratio']:>7.2f}")
    print(f"\nthroughput, B=8 per call, {a.seconds:.0f} s per cell in {rounds} interleaved rounds; batched: max 16 samples, no wait")
    print(f"{'callers':>8}{'unbatched samples/s':>22}{'batched samples/s':>20}{'ratio':>8}")
    for r in result["throughput"]:
        print(f"{r['callers']:>8}{r['samples_per_s_unbatched']:>22.1f}{r['samples_per_s_batched']:>20.1f}{r['batched_over_unbatched']:>8.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {a.out}")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
