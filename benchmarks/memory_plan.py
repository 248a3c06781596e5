"""The memory plan (danceopd.memory_plan) against what a train worker and a teacher replica really allocate, on CPU.

    python benchmarks/memory_plan.py [--quick] [--out benchmarks/results/memory_plan.json]

Models: the tiny SD3 and FLUX pipelines (danceopd tiny-pipeline) and mid-size ones (the same pipelines with a
165M-parameter SD3 and an 81M-parameter FLUX transformer, random weights). Each case runs in a fresh process with
MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors go back to the OS and the resident set follows the live
allocations; the process's peak (VmHWM, reset through /proc/self/clear_refs) gives a step's transient peak.

Measured, per case:
  weights       bytes of the loaded pipeline's parameters and buffers, per component (the loaded tensors) vs the
                plan's component parts (built on the meta device from the configs);
  optimizer     gradients + AdamW moments after one step (the tensors) vs the plan's;
  activations   peak resident growth during a training step (after a warm-up step, gradients kept) vs the plan's;
  query         peak resident growth during a teacher's no-grad forward at the same batch vs the plan's.
--quick: the tiny models only (what tests/test_memory_plan.py runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MID = {"sd3": {"num_attention_heads": 12, "attention_head_dim": 64, "num_layers": 8, "caption_projection_dim": 768, "pos_embed_max_size": 128},
       "flux": {"num_attention_heads": 12, "attention_head_dim": 64, "num_layers": 2, "num_single_layers": 4, "axes_dims_rope": [8, 28, 28]}}


def build_models(root: Path, quick: bool) -> dict[str, Path]:
    """Tiny pipelines, and mid-size ones: the tiny pipeline with a larger random transformer."""
    import diffusers
    import torch

    from danceopd.testing.tiny import build_tiny_pipeline

    out = {}
    for fam in ("sd3", "flux"):
        tiny = build_tiny_pipeline(fam, root / f"{fam}-tiny", seed=0)
        out[f"{fam}-tiny"] = tiny
        if quick:
            continue
        mid = root / f"{fam}-mid"
        shutil.copytree(tiny, mid)
        cfg = json.loads((tiny / "transformer" / "config.json").read_text())
        cfg.update(MID[fam])
        torch.manual_seed(0)
        model = getattr(diffusers, cfg["_class_name"]).from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        shutil.rmtree(mid / "transformer")
        model.save_pretrained(mid / "transformer")
        out[f"{fam}-mid"] = mid
    return out


def case_job(base: str, resolution: int, batch: int, ckpt: bool, adapter: str = "lora"):
    from trainer.job import load_job_config

    return load_job_config(None, {
        "device": "cpu", "dtype": "float32", "student.base": base, "student.resolution": resolution, "student.adapter": adapter,
        "student.lora": {"rank": 8, "alpha": 8}, "student.gradient_checkpointing": ckpt, "optim.batch_size": batch,
        "optim.ema_decay": 0.0, "cluster.num_workers": 1, "routes": {"t2i": {"capability": "t2i", "teacher": {}}},
        "services.teacher_defaults": {"num_replicas": 1, "batching": {"max_batch_size": batch}}})


# ------------------------------------------------------------------------------------------ one case, in a child
def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_growth(fn) -> int:
    import gc

    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    fn()
    return _status("VmHWM") - before


def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


def measure(base: str, resolution: int, batch: int, ckpt: bool, adapter: str) -> dict:
    import torch

    from danceopd.fields.base import Conditions
    from danceopd.student import build_student
    from danceopd.teacher_model import load_teacher_field

    torch.set_num_threads(2)
    job = case_job(base, resolution, batch, ckpt, adapter)
    st = build_student(job.student, device="cpu", dtype="float32")
    weights = {k: tensor_bytes(m) for k, m in st.pipe.components.items() if isinstance(m, torch.nn.Module)}
    if st.config.trains_lora:  # the frozen base, without the adapters (the plan's trainable part)
        weights["transformer"] -= sum(p.numel() * p.element_size() for p in st.trainable_parameters())
    else:
        weights.pop("transformer")
    field = st.field
    c, h, w = field.info.sample_shape
    x, s = torch.randn(batch, c, h, w), torch.full((batch,), 0.5)
    cond = Conditions(prompts=["a red circle"] * batch)
    opt = torch.optim.AdamW(st.trainable_parameters(), lr=1e-3)

    def step():
        loss = (field.velocity(x, s, cond) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as between the trainers' steps

    step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in st.trainable_parameters())
    adam = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values() if t.dim() > 0)
    activations = _peak_growth(step)
    teacher = load_teacher_field(job.routes["t2i"].model_teacher, "t2i", resolution, default_base=base, device="cpu", dtype="float32")
    teacher.encode_prompts(cond.prompts)
    with torch.no_grad():
        query = _peak_growth(lambda: teacher.velocity(x, s, cond))
    return {"weights": weights, "trainable": sum(p.numel() * p.element_size() for p in st.trainable_parameters()),
            "gradients": grads, "adamw": adam, "activations": activations, "query": query}


# ------------------------------------------------------------------------------------------ the comparison
def compare(name: str, base: str, resolution: int, batch: int, ckpt: bool, adapter: str = "lora") -> dict:
    from danceopd.memory_plan import plan_job

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    args = json.dumps([base, resolution, batch, ckpt, adapter])
    proc = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = plan_job(case_job(base, resolution, batch, ckpt, adapter))
    worker, teacher = plan.roles["train_worker"], plan.roles["teacher:t2i"]
    planned_weights = {k.split(" (")[0]: v for k, v in worker.parts.items() if k.endswith("(float32)") and not k.startswith(("trainable", "gradients", "adamw"))}
    rows = {
        "weights": (sum(planned_weights.values()), sum(got["weights"].values())),
        "trainable + gradients + adamw": (worker.parts["trainable (fp32)"] + worker.parts["gradients (fp32)"] + worker.parts["adamw (fp32)"],
                                          got["trainable"] + got["gradients"] + got["adamw"]),
        "activations (training step)": (worker.parts["activations"], got["activations"]),
        "query activations (teacher)": (teacher.parts["query activations"], got["query"]),
    }
    return {"case": name, "resolution": resolution, "batch": batch, "gradient_checkpointing": ckpt, "adapter": adapter,
            "components": {k: {"planned": planned_weights.get(k), "measured": v} for k, v in got["weights"].items()},
            "rows": {k: {"planned": p, "measured": m, "error": (p - m) / m if m else None} for k, (p, m) in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny models only")
    ap.add_argument("--out", default="benchmarks/results/memory_plan.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), args.quick)
        cases = [(n, str(p), r, b, ck) for n, p in models.items()
                 for r, b, ck in ([(64, 2, False)] if n.endswith("tiny") else [(128, 2, False), (128, 2, True), (256, 1, True)])]
        results = []
        for name, base, res, batch, ck in cases:
            results.append(compare(name, base, res, batch, ck))
            r = results[-1]
            print(f"{name} {res}px batch {batch}{' checkpointing' if ck else ''}:", flush=True)
            for k, v in r["rows"].items():
                err = "" if v["error"] is None else f"{v['error']:+.1%}"
                print(f"    {k:<32} planned {v['planned'] / 2**20:9.2f} MiB  measured {v['measured'] / 2**20:9.2f} MiB  {err}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
