"""Memory plan: what each process of a job holds on its device, computed before anything loads.

Every pipeline component is built on the meta device from its config (a local folder's config.json files, the
Hugging Face cache, or the published configs in danceopd.models.published): no weights, no network, seconds.

Roles: `train_worker` (one Ray Train worker), `teacher:<deployment>` (one replica of each deployed teacher),
`evaluation` (a train worker while it evaluates, before and after training), and under student.text_embeddings:
precompute `text_encoding` (the task that encodes the run's prompts before training: the largest encoder set). With
precompute no worker or job-deployed teacher holds a text encoder or a prompt cache on its GPU (embeddings come from
the store, cached in host memory); with cpu the encoders and cache are in host memory. Parts, in bytes:

  <component> (<dtype>)   frozen weights and buffers of each pipeline component in the dtype it is loaded in
  trainable (fp32)        the LoRA adapters (and a grown input layer), or the whole transformer (adapter: full)
  gradients (fp32)        one per trainable parameter
  adamw (fp32)            AdamW's two moments
  ema (fp32)              when optim.ema_decay > 0
  autocast copies         adapter: full in 16 bits: the 16-bit weight copies autocast holds during a step
  prompt cache            student.prompt_cache_size prompts' embeddings (compact copies)
  adapters (<dtype>)      an adapter-bank teacher's unfused LoRAs (local files; a hub LoRA counts 0 until prefetched)
  activations             what the training step keeps for its backward: the student predicts the worker's micro-batch
                          x the states queried per sample (K; N under dense), at most optim.states_per_backward of
                          them per backward, x2 under student CFG
  query activations       a teacher's no-grad forward at its largest batch (the micro-batch x K states; x2 under CFG)
  sampling / vae decode   evaluation's no-grad forward at its batch, and the VAE decoding images 4 at a time

Activations are a per-token estimate, calibrated on this repository's CPU measurements of tiny and mid-size
(80-165M parameter) SD3 and FLUX transformers (benchmarks/memory_plan.py): per transformer block, a LoRA training
step keeps ACT_TRAIN values per token and hidden unit; with gradient checkpointing only ACT_CKPT per block plus one
block's ACT_TRAIN during its recomputation; a no-grad forward peaks at ACT_NOGRAD for one block.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

GIB = 1024 ** 3
ACT_TRAIN = 18.5  # values per (token x hidden unit) kept per block for the backward (LoRA student)
ACT_TRAIN_FULL = 24.0  # the same when every weight trains: the linear layers also keep their inputs
ACT_CKPT = 2.0  # per block with gradient checkpointing (the block's inputs), plus one block's ACT_TRAIN
ACT_NOGRAD = 13.0  # the peak of one block's no-grad forward (SD3 ~11-12, FLUX ~15 measured)
VAE_DECODE = 6.0  # values per output pixel x first decoder channel width, per image (uncalibrated estimate)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ValueError):
    """A model whose configs cannot be found offline (the message names it and the fix)."""


@dataclass
class Role:
    name: str
    gpus: float  # the GPU share the process asks Ray for; 0 = it runs on the CPU
    parts: dict[str, int] = field(default_factory=dict)
    busy_fraction: float | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.parts.items(), key=lambda kv: -kv[1])[:n]


@dataclass
class MemoryPlan:
    gpu_memory_gib: float | None
    text_embeddings: str
    roles: dict[str, Role]
    notes: list[str] = field(default_factory=list)  # what the figures assume that the config alone does not say

    def budget_gib(self, role: Role) -> float | None:
        """The memory a role may use: its share of one card (a fraction of a GPU shares the card)."""
        if self.gpu_memory_gib is None or role.gpus <= 0:
            return None
        return self.gpu_memory_gib * min(1.0, role.gpus)

    def over_budget(self) -> list[Role]:
        return [r for r in self.roles.values() if (b := self.budget_gib(r)) is not None and r.total / GIB > b]

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gib is None:
            return None
        return not self.over_budget()

    def as_json(self) -> dict:
        return {"gpu_memory_gib": self.gpu_memory_gib, "fits": self.fits, "text_embeddings": self.text_embeddings, "notes": self.notes,
                "roles": {name: {"total_gib": round(r.total / GIB, 3), "gpus": r.gpus,
                                 "parts": {k: round(v / GIB, 3) for k, v in r.parts.items()},
                                 **({"busy_fraction": round(r.busy_fraction, 3)} if r.busy_fraction is not None else {})}
                          for name, r in self.roles.items()}}

    def refusal(self) -> str:
        """One message naming every role over its budget, its total and its largest parts."""
        lines = []
        for r in self.over_budget():
            parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in r.largest())
            lines.append(f"{r.name} needs {r.total / GIB:.1f} GiB of a {self.budget_gib(r):.0f} GiB GPU share (largest: {parts} GiB)")
        return "; ".join(lines)

    def table(self) -> str:
        gpu = f"{self.gpu_memory_gib:g} GiB GPUs" if self.gpu_memory_gib else "no GPU size given (nothing refused)"
        out = [f"memory plan ({gpu}; text embeddings: {self.text_embeddings})"]
        for r in self.roles.values():
            budget = self.budget_gib(r)
            verdict = "" if budget is None else ("  fits" if r.total / GIB <= budget else "  DOES NOT FIT")
            where = f"{r.gpus:g} GPU" if r.gpus > 0 else "CPU"
            busy = f", busy {r.busy_fraction:.0%} of a step" if r.busy_fraction is not None else ""
            out.append(f"{r.name} ({where}{busy}): {r.total / GIB:.2f} GiB{verdict}")
            for k, v in sorted(r.parts.items(), key=lambda kv: -kv[1]):
                out.append(f"    {k:<44} {v / GIB:8.2f}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# ------------------------------------------------------------------------------------------- the models' shapes
@dataclass
class Component:
    name: str
    class_name: str
    floats: int  # floating-point parameter and buffer values
    config: dict
    module: object  # the component on the meta device (module names and shapes, no memory)


@lru_cache(maxsize=16)
def pipeline_components(base: str) -> dict[str, Component]:
    """The torch components of a pipeline, from configs only: a local folder, the Hugging Face cache, or the
    published configs of the recipes' hub ids."""
    from danceopd.models.published import meta_component

    out = {}
    for name, (library, class_name, config) in pipeline_specs(base).items():
        module = meta_component(library, class_name, config)
        floats = sum(t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
        out[name] = Component(name, class_name, floats, dict(config), module)
    return out


def pipeline_specs(base: str) -> dict[str, tuple[str, str, dict]]:
    """{component: (library, class name, config)} of a pipeline: a local folder, the Hugging Face cache, or the
    published configs of the recipes' hub ids."""
    from danceopd.models.published import PIPELINES

    from danceopd.models.hub import local_dir

    folder = local_dir(base)
    specs = _local_specs(folder) if folder is not None else None
    if specs is None:
        specs = PIPELINES.get(base)
    if specs is None:
        raise PlanError(f"no configs for {base!r} offline: run `danceopd prefetch` for it (the plan reads its config.json "
                        f"files from the cache), or set cluster.memory_check: off")
    return specs


def _local_specs(folder: Path) -> dict | None:
    from danceopd.student import is_student_folder, read_student_config

    if is_student_folder(folder):  # a trained student served as a teacher: its base's shapes
        from danceopd.models.hub import local_dir

        base = read_student_config(folder).base
        inner = None if base is None else local_dir(base)
        return None if inner is None else _local_specs(inner)
    index = folder / "model_index.json"
    if not index.exists():
        return None
    specs = {}
    for name, entry in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] not in ("diffusers", "transformers"):
            continue
        cfg = folder / name / "config.json"
        if cfg.exists():
            specs[name] = (entry[0], entry[1], json.loads(cfg.read_text()))
    return specs


def lora_file_floats(path: str) -> int:
    """Values in a LoRA file (its safetensors header only): a local one, or a hub id's in the cache; 0 when it is not on
    this machine."""
    from danceopd.models.hub import local_dir

    p = local_dir(path)
    files = [] if p is None else [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files:
        return 0
    from safetensors import safe_open

    total = 0
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            n = 1
            for s in f.get_slice(key).get_shape():
                n *= s
            total += n
    return total


# ------------------------------------------------------------------------------------------- the plan
def _tokens(family, transformer: Component, vae: Component | None, size: tuple[int, int], max_sequence_length: int,
            with_source: bool) -> tuple[int, int, int, int]:
    """(image tokens, text tokens, hidden size, blocks) of one forward of a family's transformer."""
    cfg = transformer.config
    if vae is None:
        factor = 8
    elif "temperal_downsample" in vae.config:  # Qwen-Image's video VAE
        factor = 2 ** len(vae.config["temperal_downsample"])
    else:
        factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
    image = (size[0] // factor // 2) * (size[1] // factor // 2)  # SD3 patchifies 2x2, FLUX packs 2x2
    if with_source and family.native_source:
        image *= 2  # Kontext: the source latents' tokens follow the noisy ones
    text = max_sequence_length + (77 if family.name == "sd3" else 0)  # SD3 appends T5 to the 77 CLIP tokens
    hidden = cfg.get("dim") or cfg["num_attention_heads"] * cfg["attention_head_dim"]  # Z-Image names it dim
    # blocks over the joint sequence; Z-Image's refiners run over the image and the caption tokens apart (~1 block each)
    blocks = cfg.get("num_layers", 0) + cfg.get("num_single_layers", 0) + cfg.get("n_layers", 0) + cfg.get("n_refiner_layers", 0)
    return image, text, hidden, blocks


def _prompt_bytes(family, components: dict[str, Component], max_sequence_length: int, nbytes: int) -> int:
    t = components["transformer"].config
    text = max_sequence_length + (77 if family.name == "sd3" else 0)
    width = t.get("joint_attention_dim") or t["cap_feat_dim"]  # Z-Image: the caption's feature size
    return (text * width + t.get("pooled_projection_dim", 0)) * nbytes


def plan_job(job, gpu_memory_gib: float | None = None) -> MemoryPlan:
    """The plan of a validated JobConfig (trainer.job)."""
    from danceopd.models import get_family
    from danceopd.models.published import lora_parameter_count

    st = job.student
    family = st.model_family
    roles: dict[str, Role] = {}
    on_gpu = str(job.device).startswith("cuda")
    dtype_name = dtype_for(job.dtype, on_gpu)
    nbytes = DTYPE_BYTES[dtype_name]
    any_source = any(job.route_takes_source(r) for r in job.routes)  # Kontext-style edits: the source's tokens join the sequence
    size, size_note = job.planned_image_size()
    seq = st.max_sequence_length or family.default_max_sequence_length
    worker = Role("train_worker", job.cluster.gpus_per_worker if on_gpu else 0.0)
    queried = job.method.queried_states  # rows per sample of the prediction (with grad) and of the teacher query
    rows_per_backward = min(job.worker_batch_size * queried, job.optim.states_per_backward or job.worker_batch_size * queried)
    student_cfg = 1 if job.method.student_cfg_scale == 1.0 else 2  # its unconditional pass rides in the same call
    resident: dict[str, int] = {}
    text = job.text_embeddings()
    # precompute: no text encoder in a worker (prompt embeddings read from the store, cached in host memory); cpu: the
    # encoders and the cache in host memory; on_device: both on the GPU
    encoders_on_gpu = text.mode == "on_device"
    if family.name == "pixel":
        student_blocks = None
    else:
        comps = pipeline_components(st.base)
        t = comps["transformer"]
        full = not st.trains_lora
        for name, c in comps.items():
            if (name == "transformer" and full) or (name.startswith("text_encoder") and not encoders_on_gpu):
                continue
            resident[f"{name} ({dtype_name})"] = c.floats * nbytes
        targets = tuple(st.lora.target_modules or family.default_lora_targets)
        trainable = t.floats if full else lora_parameter_count(t.module, st.lora.rank, targets)
        if st.edit_input or (any_source and not family.native_source and family.name == "sd3"):
            trainable += 2 * t.config.get("in_channels", 16) * t.config["num_attention_heads"] * t.config["attention_head_dim"] * 4
        resident["trainable (fp32)"] = trainable * 4
        resident["gradients (fp32)"] = trainable * 4
        resident["adamw (fp32)"] = trainable * 8
        if job.optim.ema_decay > 0:
            resident["ema (fp32)"] = trainable * 4
        if job.cluster.num_workers > 1:
            resident["ddp buckets"] = 0  # gradient_as_bucket_view: the gradients are the buckets
        if full and nbytes < 4:
            resident["autocast copies"] = t.floats * nbytes
        if encoders_on_gpu:
            resident["prompt cache"] = st.prompt_cache_size * _prompt_bytes(family, comps, seq, nbytes)
        image, tokens, hidden, blocks = _tokens(family, t, comps.get("vae"), size, seq, any_source)
        per_block = rows_per_backward * student_cfg * (image + tokens) * hidden * nbytes  # optim.states_per_backward: a chunk's
        act = ACT_TRAIN_FULL if full else ACT_TRAIN
        worker.parts.update(resident)
        worker.parts["activations"] = int(per_block * ((ACT_CKPT * blocks + act) if st.gradient_checkpointing else act * blocks))
        student_blocks = (t, comps, image, tokens, hidden)
    roles[worker.name] = worker

    # teachers: one replica of each deployed teacher
    tc = job.teachers_config()
    # a student step in forward-equivalents: the rollout, then the prediction's forward + backward (x3) on the queried
    # states, plus its recomputation under gradient checkpointing
    steps_per_student = student_cfg * (job.method.rollout_steps + queried * (3 + (1 if st.gradient_checkpointing else 0)))
    weights = {name: r.weight for name, r in job.routes.items()}
    total_weight = sum(weights.values()) or 1.0
    by_name = {t.name: t for t in tc.teachers}
    for teacher in tc.teachers:
        if not teacher.deploy:
            continue
        base_field = teacher.field
        while base_field.kind == "cfg":  # the CFG base is built in the same replica
            base_field = by_name[base_field.base].field
        gpus = teacher.ray_actor_options.num_gpus
        t_gpu = gpus > 0 and teacher.device != "cpu"  # auto: CUDA where the replica was given a GPU
        gpus = gpus if t_gpu else 0.0
        t_dtype = dtype_for(teacher.dtype, t_gpu)
        role = Role(f"teacher:{teacher.name}", gpus)
        routes = [r for r in job.routes if job.teacher_name(r) == teacher.name]
        work = sum(weights[r] * (2 if job.routes[r].cfg_alpha is not None else 1) for r in routes) / total_weight  # CFG: 2 halves
        cfg_factor = 2 if any(job.routes[r].cfg_alpha is not None for r in routes) else 1
        replicas = teacher.num_replicas or (teacher.autoscaling_config.min_replicas if teacher.autoscaling_config else 1)
        # one query is a micro-batch x its queried states, answered max_batch_size samples per call (batching or not)
        batch = min(job.worker_batch_size * queried, teacher.batching.max_batch_size) if not teacher.batching.enabled \
            else teacher.batching.max_batch_size
        if base_field.kind == "suite":
            role.parts["suite field"] = 0
            cost = 0.0
        else:
            tb = DTYPE_BYTES[t_dtype]
            comps = pipeline_components(base_field.path)
            stored = getattr(base_field, "text_embeddings", None) is not None  # reads the store: no text encoder
            t_family = get_family(base_field.family) if base_field.family else family  # the job writes each teacher's family
            for name, c in comps.items():  # no VAE (queries carry latents) unless the text encoder sees the source image
                if (name != "vae" or t_family.text_sees_source) and not (stored and name.startswith("text_encoder")):
                    role.parts[f"{name} ({t_dtype})"] = c.floats * tb
            if base_field.kind == "adapter_bank":
                role.parts[f"adapters ({t_dtype})"] = sum(lora_file_floats(lora.path) for a in base_field.adapters.values()
                                                         for lora in a.loras) * tb
            t = comps["transformer"]
            image, tokens, hidden, blocks = _tokens(t_family, t, comps.get("vae"), size, seq, any_source)
            role.parts["query activations"] = int(batch * cfg_factor * (image + tokens) * hidden * tb * ACT_NOGRAD)
            if not stored:
                role.parts["prompt cache"] = st.prompt_cache_size * _prompt_bytes(t_family, comps, seq, tb)
            # forward cost relative to the student's: parameters x tokens (the same tokens: same resolution)
            cost = t.floats / student_blocks[0].floats if student_blocks else 1.0
        role.busy_fraction = job.cluster.num_workers * work * queried * cost / (replicas * steps_per_student)
        roles[role.name] = role

    # evaluation on a train worker: its resident state plus the sampling forward and the VAE decoding
    if student_blocks is not None:
        t, comps, image, tokens, hidden = student_blocks
        ev = Role("evaluation", worker.gpus)
        ev.parts.update(resident)
        e = job.eval  # a model student's evaluation: velocity errors in chunks of 32, the grid's 3 conditions x n
        batch = max(min(32, e.velocity_error_samples), min(128, 3 * e.samples_per_condition_in_grid),
                    min(128, e.velocity_error_samples) if e.clip_model else 0)
        ev.parts[f"sampling activations (batch {batch})"] = int(batch * (image + tokens) * hidden * nbytes * ACT_NOGRAD)
        vae = comps.get("vae")
        if vae is not None:
            from danceopd.evaluation import DECODE_CHUNK

            width = vae.config["block_out_channels"][0] if "block_out_channels" in vae.config else vae.config["base_dim"]  # Qwen
            ev.parts[f"vae decode ({DECODE_CHUNK} images)"] = int(DECODE_CHUNK * size[0] * size[1] * width * nbytes * VAE_DECODE)
        roles[ev.name] = ev
    if text.mode == "precompute" and student_blocks is not None:  # the encoding task: one encoder set at a time, one prompt
        enc = Role("text_encoding", 1.0 if on_gpu else 0.0)
        sets = {}
        for key in dict.fromkeys((k.base, k.dtype) for k in job.text_encoder_keys(dtype_name, job.teacher_dtypes())):
            c = pipeline_components(key[0])
            b = DTYPE_BYTES[key[1]]
            sets[key] = {f"{n} ({key[1]})": v.floats * b for n, v in c.items() if n.startswith("text_encoder")}
        enc.parts.update(max(sets.values(), key=lambda p: sum(p.values())))
        enc.parts["encoder activations (1 prompt)"] = int(_prompt_bytes(family, comps, seq, nbytes) * ACT_NOGRAD)  # estimate
        roles[enc.name] = enc
    return MemoryPlan(gpu_memory_gib, text.mode if family.name != "pixel" else "on_device", roles, [size_note] if size_note else [])



def dtype_for(dtype: str | None, on_gpu: bool) -> str:
    """A dtype setting's name as a process resolves it, without asking a device (auto: bfloat16 on a GPU)."""
    table = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
    if dtype in (None, "auto"):
        return "bfloat16" if on_gpu else "float32"
    return table[dtype]


def device_memory_gib() -> float | None:
    """This process's first CUDA device's memory, when it has one."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None
