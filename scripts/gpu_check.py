"""GPU check: one DanceOPD step of the real families at full size, beside the memory plan, on a bare CUDA machine.

    python3 scripts/gpu_check.py [--out DIR] [--models sd3.5-medium flux.1-dev] [--resolutions 1024 512] [--steps 2]
    python3 scripts/gpu_check.py --tiny      # the same code on tiny pipelines, on the CPU (the test suite runs it)

Needs torch, transformers, peft, accelerate, safetensors and tokenizers, plus diffusers and pydantic (the wheels of
`make gpu-wheels`; scripts/gpu_check.sh installs them): no Ray, no network, no downloads. Every component (transformer,
text encoders, VAE) is built from its published config with its class's own random initialisation, on the GPU, in
bf16. The teacher is the base plus a random rank-128 LoRA fused into a copy of it, queried in this process.

Per model, most important first, each part written to its own JSON as soon as it is measured (a cut run still
reports): the text-encoding task (student.text_embeddings: precompute) against the plan's `text_encoding` role, then
for each text-embedding mode (precompute: no encoder on the worker or the teacher, embeddings read from the store;
on_device: each holds its own encoders) and resolution one step as the distributed worker runs it (trainer.steps:
16-step no-grad rollout on the family's grid, one Beta-biased query, K = 1, the teacher's velocity there, the MSE,
backward with gradient checkpointing, AdamW on fp32 LoRA r128 adapters): the time of each part and the peak memory of
the worker and of the teacher, each beside the plan's figure for that role (danceopd.memory_plan).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
MODELS = {"sd3.5-medium": ("sd3", "stabilityai/stable-diffusion-3.5-medium"), "flux.1-dev": ("flux", "black-forest-labs/FLUX.1-dev")}
SCHEDULERS = {  # the pipelines' scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
    "sd3": {"shift": 3.0},
    "flux": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096},
}
PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube on a blue sphere", "two cats sitting on a table",
           "a watercolor painting of a city street at night", "a close view of a flower in the rain", "a dog running on the beach",
           "a bright yellow car in front of a white house", "a mountain lake at sunset, detailed, high quality"]
MODES = ("precompute", "on_device")


def build_pipeline(family, specs: dict, device, dtype, seed: int) -> dict:
    """Random components of every spec (text encoders, transformer, VAE) and the offline tokenizers: the pieces of a
    pipeline, not yet assembled (the phases use different subsets)."""
    from danceopd.models.published import random_component
    from danceopd.testing.tiny import _clip_tokenizer, _t5_tokenizer

    parts = {name: random_component(*spec, device, dtype, seed + i) for i, (name, spec) in enumerate(sorted(specs.items()))}
    for name, module in list(parts.items()):
        if name.startswith("text_encoder"):
            t5 = type(module).__name__.startswith("T5")
            parts[name.replace("text_encoder", "tokenizer")] = _t5_tokenizer() if t5 else _clip_tokenizer()
    return parts


def assemble(family, parts: dict, transformer, vae, scheduler_config: dict, encoders: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls = family.pipeline_class()
    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    accepted = set(cls.__init__.__code__.co_varnames)
    text = {n: (parts.get(n) if encoders else None) for n in names if n in accepted}
    return cls(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config), **text)


def fuse_random_lora(transformer, targets: tuple[str, ...], rank: int, seed: int) -> None:
    """W += B A: a random rank-`rank` LoRA fused into the weights: the teacher is another capability of the same base."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
                a = torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5
                b = torch.randn(module.out_features, rank, generator=g) * (0.02 / rank ** 0.5)
                w = module.weight
                w.add_(b.to(w.device, w.dtype) @ a.to(w.device, w.dtype))  # the product on the weights' device


def tensor_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None for t in [*m.parameters(), *m.buffers()])


class Memory:
    """Peak allocations per phase on CUDA (None on the CPU, where the check only proves the code path)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def start(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self.allocated(), time.perf_counter()

    def end(self, started) -> tuple[int | None, int | None, float]:
        """(allocated at the start, the phase's peak, seconds)."""
        self.sync()
        base, t0 = started
        return base, (torch.cuda.max_memory_allocated() if self.cuda else None), time.perf_counter() - t0


def job_config(tiny: bool, base: str, family: str, res: int, mode: str, manifest: Path, store: Path, device: str, dtype: str, rank: int):
    """The JobConfig this measurement is an instance of: what the plan is computed from, and what the step runs."""
    from trainer.job import load_job_config

    teacher = {"base": base, **({} if tiny else {"family": family})}
    over = {"device": device, "dtype": dtype, "seed": 0, "output_dir": str(store.parent),
            "student": {"base": base, **({} if tiny else {"family": family}), "resolution": res, "lora": {"rank": rank, "alpha": rank},
                        "gradient_checkpointing": True, "text_embeddings": mode, "text_embeddings_store": str(store)},
            "data": {"manifest": str(manifest)},
            "routes": {"t2i": {"teacher": teacher}},
            "method": {"rollout_steps": 16, "schedule": "family", "k": 1, "query_position": "low"},
            "optim": {"batch_size": 1, "grad_accum": 1, "ema_decay": 0.0},
            "cluster": {"num_workers": 1, "gpus_per_worker": 1.0 if device == "cuda" else 0.0},
            "services": {"teacher_defaults": {"device": device, "dtype": dtype, "num_replicas": 1,
                                              "ray_actor_options": {"num_gpus": 1.0 if device == "cuda" else 0.0, "num_cpus": 1},
                                              "batching": {"max_batch_size": 1}}}}
    return load_job_config(None, over)


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))


def gib(x: int | None) -> float | None:
    return None if x is None else round(x / GIB, 3)


def check_model(label: str, family_name: str, base: str, args, out: Path, work: Path, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from danceopd.memory_plan import pipeline_specs, plan_job
    from danceopd.models import get_family
    from danceopd.models.base import PromptCache, dtype_name, text_encoder_parameters
    from danceopd.fields.model_field import ModelField
    from danceopd.student import assemble_student
    from danceopd.text_embeddings import EmbeddingStore, EncoderKey, TextEmbeddings
    from trainer.steps import distillation_loss, query_batch, run_sigmas

    family = get_family(family_name)
    mem = Memory(device)
    rank = 4 if args.tiny else 128
    dev_name, dt_name = device.type, dtype_name(dtype)
    manifest = work / f"{label}.jsonl"
    manifest.write_text("\n".join(json.dumps({"uid": f"p{i}", "route": "t2i", "prompt": p}) for i, p in enumerate(PROMPTS)))
    store_dir = work / f"{label}-store"
    jobs = {(r, m): job_config(args.tiny, base, family_name, r, m, manifest, store_dir, dev_name, dt_name, rank)
            for m in MODES for r in args.resolutions}
    plans = {k: plan_job(j, args.gpu_memory).as_json() for k, j in jobs.items()}
    job0 = jobs[(args.resolutions[0], "precompute")]
    specs = pipeline_specs(base)
    seq = family.default_max_sequence_length
    scheduler = {**SCHEDULERS[family_name], **({"base_image_seq_len": 4, "max_image_seq_len": 64} if args.tiny and family_name == "flux" else {})}

    # 1. the text-encoding task: the encoders, the run's prompts one at a time into the store
    base_alloc = mem.allocated()
    t0 = time.perf_counter()
    encoders = build_pipeline(family, {n: s for n, s in specs.items() if n.startswith("text_encoder")}, device, dtype, seed=10)
    built_s = time.perf_counter() - t0
    from danceopd.models.published import meta_component

    shell = meta_component(*specs["transformer"])
    pipe = assemble(family, encoders, shell, None, scheduler, encoders=True)
    store = EmbeddingStore(store_dir)
    key = EncoderKey(base, family_name, dt_name, seq)
    fp = store.fingerprint(key)
    started = mem.start()
    for p in job0.run_prompts():
        store.add(fp, key, [p], [tuple(t[0] for t in family.encode_prompts(pipe, [p], seq))])
    _, peak, seconds = mem.end(started)
    enc_plan = plans[(args.resolutions[0], "precompute")]["roles"].get("text_encoding", {})
    te = {"model": label, "part": "text_encoding", "prompts": len(job0.run_prompts()), "seconds": round(seconds, 3),
          "build_seconds": round(built_s, 1), "measured_gib": gib(None if peak is None else peak - base_alloc),
          "planned_gib": enc_plan.get("total_gib"), "planned_parts": enc_plan.get("parts")}
    write(out, f"{label}-text_encoding", te)
    say(f"{label}: text encoding {te['prompts']} prompts in {seconds:.2f} s; peak {te['measured_gib']} GiB (plan {te['planned_gib']})")
    for name in encoders:
        if name.startswith("text_encoder"):
            encoders[name].to("cpu")  # precompute: no encoder on the worker's or the teacher's device
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. the student (base + LoRA, the real assembly code) and the teacher (a copy with a random LoRA fused)
    t0 = time.perf_counter()
    comps = build_pipeline(family, {n: s for n, s in specs.items() if n in ("transformer", "vae")}, device, dtype, seed=100)
    teacher_t = copy.deepcopy(comps["transformer"])
    fuse_random_lora(teacher_t, family.default_lora_targets, rank, seed=200)
    text = TextEmbeddings("precompute", str(store_dir))
    student_pipe = assemble(family, encoders, comps["transformer"], comps["vae"], scheduler, encoders=False)
    student = assemble_student(job0.student, family, student_pipe, device, dtype, "student", text=text)
    teacher_pipe = assemble(family, encoders, teacher_t, None, scheduler, encoders=False)
    teacher_pipe.vae_scale_factor = student_pipe.vae_scale_factor
    teacher = ModelField("t2i", "diffusers", family, teacher_pipe, teacher_t, student.field.info.sample_shape, device, dtype,
                         max_sequence_length=seq, prompt_cache=PromptCache(text.encoder(key)))
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    say(f"{label}: student and teacher built in {time.perf_counter() - t0:.0f} s "
        f"({sum(p.numel() for p in params) / 1e6:.2f}M trainable)")

    rows = []
    for mode in MODES:
        if mode == "on_device":  # each process holds its own encoders on the device
            on_dev = {n: m.to(device) for n, m in encoders.items() if n.startswith("text_encoder")}
            teacher_enc = {n: copy.deepcopy(m) for n, m in on_dev.items()}
            for n, m in on_dev.items():
                setattr(student.pipe, n, m)
                setattr(teacher_pipe, n, teacher_enc[n])
            for n in encoders:
                if n.startswith("tokenizer"):
                    setattr(student.pipe, n, encoders[n])
                    setattr(teacher_pipe, n, encoders[n])
            student.field.prompts = PromptCache(lambda p: family.encode_prompts(student.pipe, p, seq))
            teacher.prompts = PromptCache(lambda p: family.encode_prompts(teacher_pipe, p, seq))
        teacher_resident = tensor_bytes(teacher_t, *[getattr(teacher_pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")])
        for res in args.resolutions:
            job = jobs[(res, mode)]
            shape = family.latent_shape(student.pipe, res)
            student.field.info = replace(student.field.info, sample_shape=shape)
            teacher.info = replace(teacher.info, sample_shape=shape)
            sigmas = run_sigmas(job, student).to(device)
            times: dict[str, list[float]] = {}
            peaks = {"worker": 0, "teacher": 0}
            for step in range(1 + args.steps):  # a warm-up step first (kernels, the optimizer's state)
                from danceopd.fields.base import Conditions

                cond = Conditions([PROMPTS[step % len(PROMPTS)]])
                part = {}
                s = mem.start()
                q = query_batch(job, None, sigmas, student.field, "t2i", cond, step, 0, 0, device)
                part["rollout"] = mem.end(s)
                s = mem.start()
                with torch.no_grad():
                    target = teacher.velocity(q.x, q.sigma, q.conditions)
                part["teacher"] = mem.end(s)
                s = mem.start()
                pred = student.field.velocity(q.x, q.sigma, q.conditions)
                loss = distillation_loss(job, pred.float(), target.float(), q, len(sigmas) - 1)
                loss.backward()
                part["forward_backward"] = mem.end(s)
                s = mem.start()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                part["optimizer"] = mem.end(s)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{label} {res} px {mode}: non-finite loss {loss.item()}")
                if step == 0:
                    continue
                for k, (_, _, sec) in part.items():
                    times.setdefault(k, []).append(sec)
                if mem.cuda:
                    worker_peak = max(part[k][1] for k in ("rollout", "forward_backward", "optimizer")) - teacher_resident
                    teacher_peak = teacher_resident + part["teacher"][1] - part["teacher"][0]
                    peaks = {"worker": max(peaks["worker"], worker_peak), "teacher": max(peaks["teacher"], teacher_peak)}
            med = {k: round(statistics.median(v), 4) for k, v in times.items()}
            plan = plans[(res, mode)]["roles"]
            row = {"model": label, "resolution": res, "text_embeddings": mode, "seconds": {**med, "total": round(sum(med.values()), 4)},
                   "loss": loss.item(), "worker_text_encoder_parameters": text_encoder_parameters(student.pipe),
                   "teacher_text_encoder_parameters": text_encoder_parameters(teacher_pipe),
                   "measured_gib": {"train_worker": gib(peaks["worker"]) if mem.cuda else None,
                                    "teacher": gib(peaks["teacher"]) if mem.cuda else None},
                   "planned_gib": {"train_worker": plan["train_worker"]["total_gib"], "teacher": plan["teacher:t2i"]["total_gib"]},
                   "planned_parts": {"train_worker": plan["train_worker"]["parts"], "teacher": plan["teacher:t2i"]["parts"]}}
            write(out, f"{label}-{res}-{mode}", row)
            rows.append(row)
            say(line(row))
    return [te, *rows]


def line(r: dict) -> str:
    s, m, p = r["seconds"], r["measured_gib"], r["planned_gib"]

    def pair(role):
        return f"{m[role] if m[role] is not None else '-'}/{p[role]:.1f}"

    return (f"{r['model']:<13}{r['resolution']:>5} {r['text_embeddings']:<11}{s['total']:>8.2f}{s['rollout']:>9.2f}{s['teacher']:>9.3f}"
            f"{s['forward_backward']:>9.2f}{s['optimizer']:>8.3f}{pair('train_worker'):>16}{pair('teacher'):>14}")


HEADER = (f"{'model':<13}{'px':>5} {'embeddings':<11}{'step s':>8}{'rollout':>9}{'teacher':>9}{'fwd/bwd':>9}{'optim':>8}"
          f"{'worker GiB':>16}{'teacher GiB':>14}   (GiB: measured/plan)")


def say(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU: the same code, checked anywhere")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--resolutions", type=int, nargs="+", help="default 1024 512 (tiny: 32 16)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case, after one warm-up step")
    ap.add_argument("--gpu-memory", type=float, help="GiB per GPU for the plan's verdicts (default: this card)")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/gpu-check (tiny: gpu-check-tiny)")
    args = ap.parse_args(argv)
    args.resolutions = args.resolutions or ([32, 16] if args.tiny else [1024, 512])
    out = args.out or ROOT / "benchmarks" / "results" / ("gpu-check-tiny" if args.tiny else "gpu-check")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu-check: no CUDA GPU visible to torch " + torch.__version__ + " (use --tiny to check the code on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        args.gpu_memory = args.gpu_memory or torch.cuda.get_device_properties(0).total_memory / GIB
    import diffusers
    import transformers

    card = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    env = {"card": card, "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__, "dtype": str(dtype), "tiny": args.tiny}
    say(f"gpu-check on {card} | torch {torch.__version__} | diffusers {diffusers.__version__} | transformers {transformers.__version__}")
    write(out, "environment", env)
    t_all = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        say(HEADER)
        for label in args.models:
            family, base = MODELS[label]
            if args.tiny:
                from danceopd.testing.tiny import build_tiny_pipeline

                base = str(build_tiny_pipeline(family, work / f"tiny-{family}", seed=0))
            results += check_model(label, family, base, args, out, work, device, dtype)
            if device.type == "cuda":
                import gc

                gc.collect()
                torch.cuda.empty_cache()
    write(out, "summary", {**env, "seconds": round(time.perf_counter() - t_all, 1), "results": results})
    say(f"gpu-check done in {time.perf_counter() - t_all:.0f} s; JSON per part in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
