"""Real-model teachers: a base pipeline, optionally a fully fine-tuned transformer checkpoint, optionally LoRA
adapters (each with a scale), merged once at load and frozen; CFG is applied on top by the route
(`danceopd.fields.operators.CFGField`). The spec is validated before anything loads: folders exist, the base's
family is known, and every adapter's keys name modules of the base transformer."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from danceopd.fields.model_field import ModelField
from danceopd.models import ModelFamily, family_of_folder, get_family
from danceopd.models.adapters import check_lora_keys, load_lora, lora_file, merge_lora, weights_checksum
from danceopd.models.base import PromptCache, dtype_name, resolve_device, resolve_dtype, vae_geometry
from danceopd.models.hub import absolute_if_local, check_model_name, local_dir, looks_local, where
from danceopd.offline import skipped
from danceopd.text_embeddings import EncoderKey, TextEmbeddings


class LoraAdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a diffusers LoRA file / folder (pytorch_lora_weights.safetensors) or a PEFT adapter folder")
    scale: float = Field(1.0, description="the adapter's strength when fused")
    weight_name: str | None = Field(None, description="the file inside a folder, when it is not the standard name")

    @model_validator(mode="after")
    def _exists(self) -> "LoraAdapterSpec":
        try:
            check_model_name(self.path, "LoRA")
        except ValueError:
            if not (looks_local(self.path) and skipped(f"LoRA {self.path}: not on this machine")):
                raise
        self.path = absolute_if_local(self.path)
        if local_dir(self.path) is not None:  # a local file or folder, or a hub id in the cache: it holds a LoRA file
            lora_file(self.path, self.weight_name)
        return self


class TeacherModelSpec(BaseModel):
    """base [+ checkpoint] [+ LoRAs]: a capability teacher of a real model family."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(None, description="pipeline folder or hub id; default: the student's base")
    family: str | None = Field(None, description="default: read from the base's model_index.json (a local folder, or a hub id in "
                               "the Hugging Face cache); else the student's when the base is the student's")
    checkpoint: str | None = Field(None, description="a fine-tuned transformer: a transformer folder, or a pipeline folder holding one")
    loras: list[LoraAdapterSpec] = Field(default_factory=list, description="LoRA adapters fused into the frozen teacher "
                                                                           "once at load: [{path, scale, weight_name}]")
    guidance: float | None = Field(None, description="guidance-embedding value (FLUX); default the family's")
    max_sequence_length: int | None = Field(None, ge=1, description="prompt tokens; default the pipeline's (SD3 256, FLUX 512)")

    @field_validator("base", "checkpoint")
    @classmethod
    def _model_name(cls, v: str | None, info) -> str | None:
        if v is None:
            return v
        return absolute_if_local(check_model_name(v, "base folder" if info.field_name == "base" else "checkpoint folder"))

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str | None) -> str | None:
        if v is not None:
            get_family(v)
        return v

    def model_family(self, base: str) -> ModelFamily | None:
        """The family of this teacher on `base` (a pipeline folder, a DanceOPD student folder); None for a hub id
        without `family`."""
        if self.family:
            return get_family(self.family)
        from danceopd.student import is_student_folder, read_student_config

        return read_student_config(base).model_family if is_student_folder(base) else family_of_folder(base)

    def reads_source(self, base: str) -> bool | None:
        """Whether this teacher reads a source image (Kontext, or a student trained for edits); None when a hub id
        without `family` leaves it unknown offline."""
        from danceopd.student import is_student_folder, read_student_config

        if is_student_folder(base):
            c = read_student_config(base)
            return c.edit_input or c.model_family.native_source or c.model_family.name == "pixel"
        family = self.model_family(base)
        return None if family is None else family.native_source

    def check_files(self, base: str) -> None:
        """What can be decided offline before loading: each LoRA names modules of the base transformer."""
        for i, lora in enumerate(self.loras):
            try:
                check_lora_keys(lora.path, self.checkpoint_base(base), lora.weight_name)
            except ValueError as e:
                raise ValueError(f"loras.{i}: {e}") from None

    def checkpoint_base(self, base: str) -> str:
        """The folder (or hub id) whose transformer/ the adapters apply to."""
        folder = local_dir(self.checkpoint) if self.checkpoint else None
        if folder is not None and (folder / "transformer").exists():
            return self.checkpoint
        return base


def _load_base(spec: TeacherModelSpec, base: str, what: str, device: torch.device, dtype: torch.dtype,
               text: TextEmbeddings | None = None):
    """The family and frozen pipeline of a teacher's base, with its fine-tuned checkpoint swapped in if it has one, and
    the prompt cache its fields share (reading the embedding store when `text` names one: no text encoder loaded)."""
    family = spec.model_family(base)
    if family is None:
        raise ValueError(f"{what}: the base {where(base)} is not on this machine, so its model_index.json cannot say its family: "
                         "run `danceopd prefetch` for it, or set the teacher's family")
    # Queries carry latents (sources too), so a teacher's replicas hold no VAE, except where the text encoder reads the
    # source image (Qwen-Image-Edit): the encoder's image is recovered from the source latent by the VAE's decode.
    pipe = family.load_pipeline(base, device, dtype, vae=family.text_sees_source, text_encoders=text.loads_encoders if text else "device")
    if spec.checkpoint:
        p = Path(spec.checkpoint).expanduser()
        kwargs = {} if (p / "config.json").exists() else {"subfolder": "transformer"}  # a transformer folder, or a pipeline
        pipe.transformer = type(pipe.transformer).from_pretrained(str(p), dtype=dtype, **kwargs).to(device)
    seq = spec.max_sequence_length or family.default_max_sequence_length
    store = text.encoder(EncoderKey(base, family.name, dtype_name(dtype), seq)) if text else None
    return family, pipe, PromptCache(store) if store else None


def load_teacher_field(spec: TeacherModelSpec, name: str, resolution: int, default_base: str | None = None,
                       device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                       text: TextEmbeddings | None = None, buckets: list[tuple[int, int]] = ()) -> ModelField:
    """Load, merge and freeze a teacher; its FieldInfo carries the family, resolution and a weights checksum. `text`: an
    embedding store to read prompts from instead of loading text encoders (a DanceOPD student folder keeps its own).
    `buckets`: the (width, height) of the run's aspect-ratio buckets, whose shapes it answers besides `resolution`'s."""
    from danceopd.student import is_student_folder, load_student

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    base = spec.base or default_base
    if base is None:
        raise ValueError(f"teacher {name!r}: no base (set the teacher's base or the student's)")
    if is_student_folder(base):  # a trained DanceOPD student served as a teacher
        student = load_student(base, device=dev, dtype=dt, name=name, buckets=buckets)
        student.transformer.requires_grad_(False).eval()
        return student.field
    family, pipe, prompts = _load_base(spec, base, f"teacher {name!r}", dev, dt, text)
    for i, lora in enumerate(spec.loras):
        merge_lora(pipe, lora.path, lora.scale, adapter_name=f"{name}_lora{i}", weight_name=lora.weight_name)
    transformer = pipe.transformer.requires_grad_(False).eval()
    shape = family.latent_shape(pipe, resolution)
    extra = {"family": family.name, "resolution": resolution, "base": base, "weights_sha256": weights_checksum(transformer)}
    return ModelField(name, "diffusers", family, pipe, transformer, shape, dev, dt, guidance=spec.guidance,
                      max_sequence_length=spec.max_sequence_length, prompt_cache=prompts, extra=extra,
                      bucket_shapes=[family.latent_shape(pipe, b) for b in buckets])


class AdapterBank:
    """Teachers that share a base (and checkpoint) served from one model: the base is held once, each teacher's
    LoRAs stay unfused as named peft adapters, and a query activates its teacher's adapters. For users short of
    GPU memory: N capabilities cost one base plus N adapters instead of N merged copies, at the price of the
    adapters' per-call cost and one teacher at a time per replica (`lock`)."""

    def __init__(self, teachers: dict[str, TeacherModelSpec], resolution: int, default_base: str | None = None,
                 device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", name: str = "bank",
                 cfg_alphas: dict[str, float] | None = None, text: TextEmbeddings | None = None,
                 buckets: list[tuple[int, int]] = ()):
        import threading
        from dataclasses import replace

        first = next(iter(teachers.values()))
        base = first.base or default_base
        keys = {((t.base or default_base), t.family, t.checkpoint) for t in teachers.values()}
        if len(keys) != 1:
            raise ValueError(f"an adapter bank's teachers must share base, family and checkpoint; got {sorted(map(str, keys))}")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        self.family, pipe, prompts = _load_base(first, base, f"adapter bank {name!r}", dev, dt, text)
        self.active: dict[str, tuple[list[str], list[float]]] = {}
        for name, spec in teachers.items():
            names, weights = [], []
            for i, lora in enumerate(spec.loras):
                adapter = f"{name}__{i}"
                weights.append(lora.scale * load_lora(pipe, lora.path, adapter, lora.weight_name))
                names.append(adapter)
            self.active[name] = (names, weights)
        self.pipe, self.transformer = pipe, pipe.transformer.requires_grad_(False).eval()
        shape = self.family.latent_shape(pipe, resolution)
        shapes = [self.family.latent_shape(pipe, b) for b in buckets]
        base_field = ModelField("bank", "diffusers", self.family, pipe, self.transformer, shape, dev, dt,
                                max_sequence_length=first.max_sequence_length, prompt_cache=prompts, bucket_shapes=shapes)
        self.fields = {t: AdapterTeacherField(self, t, ModelField(
            t, "diffusers", self.family, pipe, self.transformer, shape, dev, dt, guidance=spec.guidance,
            max_sequence_length=spec.max_sequence_length, prompt_cache=base_field.prompts,
            extra={"family": self.family.name, "resolution": resolution, "base": base, "shared_base": True}, bucket_shapes=shapes))
            for t, spec in teachers.items()}
        for t, alpha in (cfg_alphas or {}).items():  # a CFG teacher on the shared base: both halves in one call, under the lock
            from danceopd.fields.operators import CFGField

            self.fields[t] = CFGField(self.fields[t], alpha, name=t)
        self.lock = threading.Lock()
        # The replica's contract: one shape for all; queries name their teacher (VelocityQuery.adapter).
        self.info = replace(base_field.info, name=name, kind="adapter_bank",
                            extra={"family": self.family.name, "resolution": resolution, "adapters": sorted(self.fields),
                                   "weights_sha256": weights_checksum(self.transformer)})

    def activate(self, name: str) -> None:
        names, weights = self.active[name]
        if names:
            self.transformer.enable_adapters()
            self.transformer.set_adapters(names, weights)
        elif any(adapters for adapters, _ in self.active.values()):
            self.transformer.disable_adapters()  # this teacher is the base itself


class AdapterTeacherField:
    """One teacher of an AdapterBank, as a velocity field."""

    def __init__(self, bank: AdapterBank, name: str, field: ModelField):
        self.bank, self.name, self.field = bank, name, field
        self.info = field.info

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions) -> torch.Tensor:
        with self.bank.lock:
            self.bank.activate(self.name)
            return self.field.velocity(x, sigma, conditions)


def load_model_field(path: str | Path, name: str | None = None, device: str | torch.device | None = "auto",
                     dtype: str | torch.dtype | None = "auto", resolution: int | None = None,
                     max_sequence_length: int | None = None) -> ModelField:
    """A field from one folder (or hub id): a DanceOPD student folder, or a diffusers pipeline folder at its
    transformer's native size (`resolution` pixels where given)."""
    device = resolve_device(device)  # a bad device is named before any folder is read
    local = Path(path).expanduser()
    check_model_name(str(path), "model folder")
    name = name or local.name
    from danceopd.student import is_student_folder

    if local.exists() and not is_student_folder(local) and family_of_folder(local) is None:
        raise ValueError(f"{local} is neither a diffusers pipeline folder (model_index.json) nor a DanceOPD student folder")
    if resolution is None and not is_student_folder(local):
        resolution = native_resolution(local)
    return load_teacher_field(TeacherModelSpec(base=str(path), max_sequence_length=max_sequence_length), name,
                              resolution or 0, device=device, dtype=dtype)


def native_resolution(base: str | Path) -> int | None:
    """Pixel size of a pipeline's transformer sample_size (SD3) at its VAE's scale, where the configs say it."""
    import json

    from danceopd.models.hub import local_dir

    folder, vae = local_dir(base), vae_geometry(base)
    t = folder / "transformer" / "config.json" if folder is not None else None
    if t is None or not t.is_file() or vae is None:
        return None
    size = json.loads(t.read_text()).get("sample_size")
    return int(size) * vae[1] if size else None
