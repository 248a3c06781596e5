"""One DanceOPD step on a full-size SD3.5-Medium transformer (random weights from the published config, no
download): LoRA r128 student (bf16 base, fp32 adapters, gradient checkpointing), 16-step no-grad rollout on the
SD3 shift-3 grid, one Beta(5,2) query per sample, the teacher's velocity there, MSE, backward, AdamW. Random
prompt embeddings of the real shapes stand in for the text encoders (333 tokens x 4096, pooled 2048).

    python benchmarks/sd35_step.py [--resolutions 512 1024] [--steps 3] [--tiny]   # --tiny: a small config, any device

The teacher is measured two ways: in this process, and as a Ray Serve replica on the same GPU (numpy over the
wire, as the trainers query teachers). Prints a table (step time and its parts, peak GPU memory) and writes
benchmarks/results/sd35-step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from danceopd.flow import gather_states, rollout_states, sample_query_indices, sd3_sigmas, velocity_mse  # noqa: E402
from danceopd.models.published import SD35_MEDIUM_TRANSFORMER  # noqa: E402
from danceopd.models.sd3 import SD3Family, call_sd3_transformer  # noqa: E402

TINY = {**SD35_MEDIUM_TRANSFORMER, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 32,
        "joint_attention_dim": 64, "pooled_projection_dim": 32, "dual_attention_layers": [0], "pos_embed_max_size": 64}
TEXT_TOKENS = 77 + 256  # CLIP + T5 tokens of SD3's encode_prompt at max_sequence_length 256


def build_transformer(config: dict, device, dtype, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    return model.to(dtype=dtype).requires_grad_(False).eval()


def embeddings(config: dict, batch: int, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, TEXT_TOKENS, config["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g).to(device, dtype)
    return hidden, pooled


class ServedTeacher:
    """The teacher transformer in a Serve replica (GPU share), answering numpy queries."""

    def __init__(self, config: dict, tiny: bool):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = build_transformer(config, self.device, self.dtype, seed=1)
        self.config = config

    def velocity(self, x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        xt = torch.tensor(x).to(self.device, self.dtype)  # a copy: Serve hands over read-only arrays
        hidden, pooled = embeddings(self.config, xt.shape[0], self.device, self.dtype)
        with torch.inference_mode():
            v = call_sd3_transformer(self.model, xt, torch.from_numpy(sigma).to(self.device), hidden, pooled, None, False)
        return v.float().cpu().numpy()

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0


def step(student, params, opt, teacher_fn, config, res: int, batch: int, device, dtype, times: dict) -> None:
    c, h = 16, res // 8
    hidden, pooled = embeddings(config, batch, device, dtype)
    sigmas = sd3_sigmas(16, 3.0).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    noise = torch.randn(batch, c, h, h, device=device, dtype=dtype)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        traj = rollout_states(lambda x, s: call_sd3_transformer(student, x, s, hidden, pooled, None, False), noise, sigmas)
    idx = sample_query_indices(16, batch, 1, "low", torch.Generator().manual_seed(0))
    x, s = gather_states(traj.states, traj.sigmas, idx)
    sync()
    t1 = time.perf_counter()
    target = teacher_fn(x, s)
    sync()
    t2 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = call_sd3_transformer(student, x, s, hidden, pooled, None, False)
    loss = velocity_mse(pred.float(), target.float())
    loss.backward()
    sync()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    t4 = time.perf_counter()
    for k, v in (("rollout", t1 - t0), ("teacher", t2 - t1), ("forward_backward", t3 - t2), ("optimizer", t4 - t3), ("total", t4 - t0)):
        times.setdefault(k, []).append(v)


def main(argv=None) -> int:
    from peft import LoraConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1, help="samples per step (the recipe: 1 per GPU, accumulated 4x)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config: checks the script on any machine")
    ap.add_argument("--no-serve", action="store_true", help="skip the Serve-replica teacher")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/sd35-step.json (sd35-step-tiny.json with --tiny)")
    a = ap.parse_args(argv)
    a.out = a.out or Path(f"benchmarks/results/sd35-step{'-tiny' if a.tiny else ''}.json")
    rank = 8 if a.tiny else 128
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY if a.tiny else SD35_MEDIUM_TRANSFORMER
    if device.type != "cuda" and not a.tiny:
        print("sd35_step: no CUDA GPU; the full-size model needs one (use --tiny to check the script)", file=sys.stderr)
        return 2
    student = build_transformer(config, device, dtype, seed=0)
    student.add_adapter(LoraConfig(r=rank, lora_alpha=rank,
                                   target_modules=list(SD3Family.default_lora_targets), init_lora_weights=True))
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # fp32 adapters on the bf16 base
    student.enable_gradient_checkpointing()
    student.train()
    opt = torch.optim.AdamW(params, lr=2e-4)
    local_teacher = build_transformer(config, device, dtype, seed=1)

    def in_process(x, s):
        hidden, pooled = embeddings(config, x.shape[0], device, dtype)
        with torch.inference_mode():
            return call_sd3_transformer(local_teacher, x, s, hidden, pooled, None, False)

    teachers = {"in-process": in_process}
    replica = None
    if not a.no_serve:
        import ray
        from ray import serve

        ray.init(address="local", include_dashboard=False, logging_level="ERROR", configure_logging=False,
                 num_gpus=1 if device.type == "cuda" else 0)
        opts = {"num_gpus": 0.5} if device.type == "cuda" else {"num_cpus": 0.5}
        replica = serve.run(serve.deployment(ServedTeacher).options(ray_actor_options=opts).bind(config, a.tiny),
                            name="sd35-teacher", route_prefix=None)

        def served(x, s):
            v = replica.velocity.remote(x.float().cpu().numpy(), s.float().cpu().numpy()).result(timeout_s=600)
            return torch.tensor(v).to(device, dtype)

        teachers["serve replica"] = served
    rows = []
    for res in a.resolutions:
        for name, fn in teachers.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times: dict = {}
            step(student, params, opt, fn, config, res, a.batch, device, dtype, {})  # warm-up
            for _ in range(a.steps):
                step(student, params, opt, fn, config, res, a.batch, device, dtype, times)
            row = {"resolution": res, "teacher_at": name, **{k: statistics.median(v) for k, v in times.items()},
                   "peak_gib_trainer": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
            if name == "serve replica":
                row["peak_gib_replica"] = replica.peak_memory.remote().result(timeout_s=60) / 2**30 if device.type == "cuda" else None
            rows.append(row)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"DanceOPD step, SD3.5-Medium transformer ({'tiny config' if a.tiny else 'full size, random weights'}), "
          f"LoRA r{rank}, {dtype}, rollout 16, batch {a.batch}, card: {card}")
    print(f"{'res':>5} {'teacher':<14}{'step s':>8}{'rollout':>9}{'teacher':>9}{'fwd/bwd':>9}{'optim':>8}{'peak GiB':>10}")
    for r in rows:
        peak = "-" if r["peak_gib_trainer"] is None else f"{r['peak_gib_trainer']:.1f}"
        print(f"{r['resolution']:>5} {r['teacher_at']:<14}{r['total']:>8.2f}{r['rollout']:>9.2f}{r['teacher']:>9.2f}"
              f"{r['forward_backward']:>9.2f}{r['optimizer']:>8.3f}{peak:>10}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"card": card, "dtype": str(dtype), "tiny": a.tiny, "lora_rank": rank, "rows": rows}, indent=2))
    print(f"json: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
