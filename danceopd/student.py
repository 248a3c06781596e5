"""The student: one model of a family, trained as peft LoRA adapters on a frozen base (real diffusers pipelines)
or in full (the suite's tiny pixel model, or `adapter: full`).

Precision: whatever `dtype` the frozen base runs in, the trainable parameters (adapters, or all weights when
training in full) are fp32 master weights, and so are their optimizer state and EMA; the forward runs under
autocast in `dtype`.

Saving: a LoRA student's folder is a diffusers LoRA folder (`pytorch_lora_weights.safetensors`, written by the
pipeline class's `save_lora_weights`), so `pipe.load_lora_weights(folder)` on a fresh pipeline of the base
loads it; `danceopd_student.json` records the family, the base and the resolution. A fully trained student
saves `transformer/` (and, for the pixel model, its text encoder and tokenizer).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from danceopd.fields.model_field import ModelField
from danceopd.models import FAMILIES, ModelFamily, family_of_folder, get_family
from danceopd.models.base import PromptCache, dtype_name, quiet_loading, resolve_device, resolve_dtype
from danceopd.models.hub import absolute_if_local, check_model_name, looks_local, where
from danceopd.offline import skipped
from danceopd.models.pixel import PixelModelConfig, build_pixel_pipeline, load_pixel_pipeline
from danceopd.text_embeddings import EncoderKey, TextEmbeddings

STUDENT_MARKER = "danceopd_student.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes, load_lora_weights reads
COMFYUI_FILE = "comfyui_lora.safetensors"  # student.export_formats: comfyui, beside the diffusers file
INPUT_LAYER_FILE = "input_layer.safetensors"  # a grown input layer (SD3 edits), saved beside the LoRA
# What a model family's student folder records of its StudentConfig (danceopd_student.json): its model, adapter and
# exports; the pixel model's fields and the run's knobs (prompt caches, text embeddings, checkpointing) stay out
MODEL_STUDENT_KEYS = {"family", "base", "resolution", "adapter", "lora", "guidance", "edit_input", "max_sequence_length",
                      "export_formats", "save_dtype", "save_merged"}


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(128, ge=1, description="the paper's recipe: rank 128, alpha 128")
    alpha: float = Field(128.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank")
    target_modules: list[str] | None = Field(None, description="module-name suffixes; default: the family's attention and "
                                                                "feed-forward projections")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    init: str | None = Field(None, description="start from an existing LoRA instead of zero: a diffusers LoRA file, a kohya / "
                             "ComfyUI file, a PEFT adapter folder, or a hub id (danceopd prefetch); its rank, alpha and "
                             "target modules are the student's (a rank, alpha or target_modules set here must agree)")
    init_weight_name: str | None = Field(None, description="the file inside student.lora.init's folder or hub repository, when it "
                                         "is not the standard name")

    @field_validator("init")
    @classmethod
    def _init_name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            check_model_name(v, "LoRA")
        except ValueError:
            if not (looks_local(v) and skipped(f"student.lora.init {v}: not on this machine (planned at student.lora's rank)")):
                raise
        return absolute_if_local(v)


class StudentConfig(PixelModelConfig):
    """The pixel model's settings (used when there is no `base`) plus a real model's."""

    family: str | None = Field(None, description="model family; default: read from the base's model_index.json (a local folder, or "
                               "a hub id in the Hugging Face cache: `danceopd prefetch`); pixel without a base")
    base: str | None = Field(None, description="the base pipeline: a local diffusers folder or a hub id")
    resolution: int = Field(32, ge=8, description="image side in pixels the student is trained at (diffusers families)")
    adapter: Literal["auto", "lora", "full"] = Field("auto", description="auto: LoRA on a diffusers base, full for the pixel model")
    lora: LoraSettings = Field(LoraSettings(), description="the LoRA adapters trained on a diffusers base (peft)")
    guidance: float | None = Field(None, description="guidance-embedding value of the student's own calls (FLUX); default the family's")
    gradient_checkpointing: bool = Field(False, description="recompute the transformer's activations in the backward (less "
                                                            "memory, one more forward per backward)")
    edit_input: bool = Field(False, description="grow the input layer for source latents (families without native image "
                                                "input, SD3): zero-initialised, trained in full beside the LoRA; set "
                                                "automatically when a route edits")
    export_formats: list[Literal["diffusers", "comfyui"]] = Field(["diffusers"], description="LoRA files the student is saved "
                                                                 "in: diffusers (pytorch_lora_weights.safetensors, always) and comfyui "
                                                                 "(comfyui_lora.safetensors in the kohya / ComfyUI key layout: flux, "
                                                                 "flux-kontext, z-image, qwen-image*)")
    save_merged: bool = Field(False, description="also export the final student merged into a full transformer/ (a standalone "
                              "model that loads without peft): once, at the end of training, on the CPU (FLUX.1-dev: ~24 GB of "
                              "host memory and disk in bf16), never inside a periodic checkpoint")
    save_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the exported LoRA (and grown input "
                                                     "layer; the pixel model's weights) in student/ folders: float32 is the "
                                                     "trained weights exactly, bfloat16 halves the file; a resume always "
                                                     "restores the fp32 training weights")
    max_sequence_length: int | None = Field(None, ge=1, description="prompt tokens; default the pipeline's (SD3 256, FLUX 512)")
    prompt_cache_size: int = Field(512, ge=0, description="prompt embeddings kept (LRU); 0 = no cache")
    text_embeddings: Literal["auto", "precompute", "on_device", "cpu"] = Field(
        "auto", description="where prompts are encoded (danceopd.text_embeddings): precompute = once, before training, into "
        "text_embeddings_store, and no train worker or job-deployed teacher loads a text encoder; on_device = each process "
        "keeps its encoders on its device; cpu = in host memory; auto = precompute when the run's prompts are a list "
        "(data.manifest) of at most precompute_max_prompts, else on_device")
    text_embeddings_store: Path | None = Field(None, description="the embedding store (content-addressed: runs and teachers share "
                                               "it); default <output_dir>/text-embeddings. Storage every node reads")
    precompute_max_prompts: int = Field(20000, ge=1, description="auto: the most prompts precomputed (at bf16 ~2.7 MB each for "
                                        "SD3, 4 MiB for FLUX.1: 20k ~ 54-80 GB of store)")

    @model_validator(mode="after")
    def _family(self) -> "StudentConfig":
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: choose from {sorted(FAMILIES)}")
        if self.base is None:
            if self.text_embeddings in ("precompute", "cpu"):
                raise ValueError(f"text_embeddings {self.text_embeddings!r}: the pixel model's text encoder is part of the model "
                                 "(no diffusers base): use auto or on_device")
            if self.family not in (None, "pixel"):
                raise ValueError(f"family {self.family!r} needs student.base: a diffusers pipeline folder or hub id")
            if self.adapter == "lora":
                raise ValueError("adapter 'lora' needs a diffusers base (student.base); the pixel model trains in full")
            return self
        if looks_local(check_model_name(self.base, "base folder")):
            self.base = str(Path(self.base).expanduser().resolve())  # workers and replicas run elsewhere
        found = family_of_folder(self.base)
        if found is None and self.family is None:
            raise ValueError(f"base {where(self.base)} is not on this machine, so its model_index.json cannot say its family: "
                             f"run `danceopd prefetch --config <this config>` first, or set student.family "
                             f"({sorted(n for n in FAMILIES if n != 'pixel')})")
        if found is not None and self.family is not None and found.latent_space != get_family(self.family).latent_space:
            raise ValueError(f"family {self.family!r} does not match base {self.base} ({found.name})")
        family = self.model_family
        if self.lora.init is not None:
            self._init_adapter_settings(family)
        if "comfyui" in self.export_formats and family.comfyui_lora is None:
            have = sorted(f.name for f in FAMILIES.values() if f.comfyui_lora is not None)
            raise ValueError(f"export_formats: comfyui is written for {have}, not {family.name} yet; keep diffusers (the "
                             "standard pytorch_lora_weights.safetensors)")
        return self

    def _init_adapter_settings(self, family: ModelFamily) -> None:
        """student.lora.init: the adapter's rank, alpha and target modules become student.lora's; a value set here that
        disagrees is refused, naming both."""
        from danceopd.models.adapters import read_student_init
        from danceopd.models.hub import local_dir

        if local_dir(self.lora.init) is None:
            if skipped(f"student.lora.init {self.lora.init}: not on this machine (planned at student.lora's rank)"):
                return
            raise ValueError(f"lora.init: {where(self.lora.init)} is not on this machine: run `danceopd prefetch --config "
                             "<this config>` first (its rank, alpha and targets come from the file)")
        _, rank, alpha, modules = read_student_init(self.lora.init, self.lora.init_weight_name, family)
        found = {"rank": rank, "alpha": alpha, "target_modules": modules}
        for key in ("rank", "alpha", "target_modules"):
            given = getattr(self.lora, key)
            if key in self.lora.model_fields_set and given is not None and given != found[key]:
                shown = found[key] if key != "target_modules" else f"{len(modules)} modules, e.g. {modules[:2]}"
                raise ValueError(f"lora.{key} is {given!r} but the adapter student.lora.init ({self.lora.init}) has {shown}: "
                                 f"remove student.lora.{key} (it comes from the file), or start from another adapter")
        self.lora.rank, self.lora.alpha, self.lora.target_modules = rank, alpha, modules

    @property
    def model_family(self) -> ModelFamily:
        if self.family is not None:
            return get_family(self.family)
        return family_of_folder(self.base) if self.base else get_family("pixel")

    @property
    def pixel_model(self) -> PixelModelConfig:
        """The pixel model's own settings (the pixel family)."""
        return PixelModelConfig(**{k: getattr(self, k) for k in PixelModelConfig.model_fields})

    @property
    def trains_lora(self) -> bool:
        return self.adapter == "lora" or (self.adapter == "auto" and self.base is not None)


@dataclass
class Student:
    """The trainable field of a family plus what is needed to save it."""

    family: ModelFamily
    pipe: Any
    field: ModelField
    config: StudentConfig

    @property
    def transformer(self) -> torch.nn.Module:
        return self.field.transformer

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def with_transformer(self, transformer: torch.nn.Module, name: str | None = None) -> "Student":
        return Student(self.family, self.pipe, self.field.with_transformer(transformer, name), self.config)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the student's latent space (VAE with the family's scaling; pixels for the pixel model)."""
        return self.family.encode_images(self.pipe, images)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.family.decode_latents(self.pipe, latents)

    def save_pretrained(self, path: str | Path) -> None:
        quiet_loading()  # and saving: transformers' "Writing model shards" bar
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = getattr(self.transformer, "module", self.transformer)
        cfg = self.config
        dtype = getattr(torch, cfg.save_dtype)
        if cfg.trains_lora:
            from peft.utils import get_peft_model_state_dict

            lora = {k: v.detach().to(dtype) for k, v in get_peft_model_state_dict(model).items()}
            peft = model.peft_config["default"]
            self.family.pipeline_class().save_lora_weights(path, transformer_lora_layers=lora,
                                                           transformer_lora_adapter_metadata=peft.to_dict())
            if "comfyui" in cfg.export_formats:
                from safetensors.torch import save_file

                save_file(self.family.comfyui_lora(lora, peft.lora_alpha / peft.r), str(path / COMFYUI_FILE))
            if cfg.edit_input:
                from safetensors.torch import save_file

                from danceopd.models.sd3 import INPUT_LAYER

                layer = model.get_submodule(INPUT_LAYER)
                save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in layer.state_dict().items()}, str(path / INPUT_LAYER_FILE))
        elif self.family.name == "pixel":
            # save_dtype bfloat16 halves the folder (the committed demo base fits the repository that way); a copy
            # is cast, the trained fp32 weights stay as they are
            saved = model
            if dtype != torch.float32:
                saved = copy.deepcopy(model)
                for t in [*saved.parameters(), *saved.buffers()]:  # not .to(): diffusers warns about its kept-fp32 modules
                    t.data = t.data.to(dtype) if t.is_floating_point() else t.data
            self.pipe.transformer = saved
            self.pipe.save_pretrained(path)
            self.pipe.transformer = model
        else:
            model.save_pretrained(path / "transformer")
        base = cfg.base
        if base is not None and Path(base).expanduser().exists():
            base = str(Path(base).expanduser().resolve())  # loadable from any working directory
        if self.family.name == "pixel":
            config = cfg.model_dump()
        else:  # a model family's student: what loading it needs, nothing of the pixel model
            config = {**cfg.model_dump(include=MODEL_STUDENT_KEYS), "family": self.family.name, "base": base}
            config["lora"] = {**config["lora"], "init": None, "init_weight_name": None}  # its weights are this folder's now
        meta = {"format": 2, "family": self.family.name, "base": base, "resolution": cfg.resolution,
                "adapter": "lora" if cfg.trains_lora else "full", "config": config}
        (path / STUDENT_MARKER).write_text(json.dumps(meta, indent=2))


def _lora_config(cfg: StudentConfig, family: ModelFamily):
    from peft import LoraConfig

    targets = cfg.lora.target_modules or list(family.default_lora_targets)
    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=targets, lora_dropout=cfg.lora.dropout,
                      init_lora_weights=True)


def assemble_student(cfg: StudentConfig, family: ModelFamily, pipe: Any, device: torch.device, dtype: torch.dtype, name: str,
              lora_weights: dict | None = None, input_layer: dict | None = None, text: TextEmbeddings | None = None,
              buckets: list[tuple[int, int]] = ()) -> Student:
    """A student from a pipeline already in memory (loaded, or built by the GPU check): freeze the base in `dtype`, add
    the trainable part in fp32 (LoRA adapters or the whole transformer, and a grown input layer for edits on a family
    without native image input)."""
    transformer = pipe.transformer
    grown = None
    if cfg.edit_input and family.name != "pixel":
        if family.native_source:
            raise ValueError(f"student.edit_input: {family.name} reads source images natively; leave it false")
        from danceopd.models.sd3 import INPUT_LAYER, grow_input_for_source

        grow_input_for_source(transformer)
        grown = transformer.get_submodule(INPUT_LAYER)
        if input_layer is not None:
            grown.load_state_dict(input_layer)
    for module in (getattr(pipe, k, None) for k in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")):
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
            if family.name == "pixel":  # built here in fp32; a diffusers pipeline was loaded in `dtype` on its devices by
                module.to(device)  # from_pretrained, which keeps what its models must keep in fp32 (T5's `wo` under fp16)
                _cast_params(module, dtype)
    if cfg.trains_lora:
        transformer.requires_grad_(False).to(device)
        _cast_params(transformer, dtype)
        # peft draws the A matrices from the global RNG: seeded here (student.seed), a run starts from the same
        # adapters every time, and the process's RNG is left as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            transformer.add_adapter(_lora_config(cfg, family))
        if lora_weights is None and cfg.lora.init is not None:  # an existing adapter to start from (its settings are cfg.lora's)
            from danceopd.models.adapters import read_student_init

            lora_weights = read_student_init(cfg.lora.init, cfg.lora.init_weight_name, family)[0]
        if lora_weights is not None:
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(transformer, lora_weights, adapter_name="default")
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"the student's LoRA has keys the model does not: {result.unexpected_keys[:3]}")
        if grown is not None:  # the new input weights train in full (fp32) beside the adapters
            grown.requires_grad_(True)
        _cast_params(transformer.to(device), torch.float32, trainable=True)
    else:
        transformer.requires_grad_(True).to(device)
        _cast_params(transformer, torch.float32)  # fp32 master weights
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    shape = family.latent_shape(pipe, cfg.resolution)
    seq = cfg.max_sequence_length or family.default_max_sequence_length
    store = text.encoder(EncoderKey(cfg.base, family.name, dtype_name(dtype), seq)) if text and family.name != "pixel" else None
    field = ModelField(name, "student", family, pipe, transformer, shape, device, dtype, guidance=cfg.guidance,
                       max_sequence_length=cfg.max_sequence_length, cache_size=cfg.prompt_cache_size,
                       prompt_cache=PromptCache(store, cfg.prompt_cache_size) if store else None,
                       extra={"family": family.name, "base": cfg.base, "resolution": cfg.resolution},
                       bucket_shapes=[family.latent_shape(pipe, b) for b in buckets])
    return Student(family, pipe, field, cfg)


def _cast_params(module: torch.nn.Module, dtype: torch.dtype, trainable: bool = False) -> None:
    """Cast parameters (all, or the trainable ones) in place; diffusers' Module.to(dtype) warns on every model."""
    for p in module.parameters():
        if p.dtype != dtype and p.is_floating_point() and (p.requires_grad or not trainable):
            p.data = p.data.to(dtype)
    for b in module.buffers():
        if b.is_floating_point() and b.dtype != dtype and not trainable:
            b.data = b.data.to(dtype)


def build_student(cfg: StudentConfig, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                  name: str = "student", text: TextEmbeddings | None = None, buckets: list[tuple[int, int]] = ()) -> Student:
    """A new student: the pixel model randomly initialised from cfg.seed, or the base pipeline with fresh adapters
    (peft's init: B = 0, so the student starts exactly as its base). `text`: where its prompt embeddings come from
    (TrainConfig.text_embeddings(); default: its own encoders on its device)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    family = cfg.model_family
    if family.name == "pixel":
        pipe = build_pixel_pipeline(cfg.pixel_model)
    else:
        pipe = family.load_pipeline(cfg.base, dev, dt, vae=True, text_encoders=text.loads_encoders if text else "device")
    return assemble_student(cfg, family, pipe, dev, dt, name, text=text, buckets=buckets)


def read_student_config(path: str | Path) -> StudentConfig:
    marker = Path(path) / STUDENT_MARKER
    if not marker.exists():
        raise ValueError(f"{path} is not a DanceOPD student folder (no {STUDENT_MARKER})")
    return StudentConfig(**json.loads(marker.read_text())["config"])


def is_student_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / STUDENT_MARKER).exists()


def load_student(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                 name: str = "student", text: TextEmbeddings | None = None, buckets: list[tuple[int, int]] = ()) -> Student:
    """A saved student, trainable again (init_from, resume) or to evaluate and serve (`buckets`: build_student's)."""
    path = Path(path)
    cfg = read_student_config(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    family = cfg.model_family
    if family.name == "pixel":
        pipe = load_pixel_pipeline(path, cfg.pixel_model, torch.float32)
        return assemble_student(cfg, family, pipe, dev, dt, name)
    pipe = family.load_pipeline(cfg.base, dev, dt, vae=True, text_encoders=text.loads_encoders if text else "device")
    if not cfg.trains_lora:
        pipe.transformer = type(pipe.transformer).from_pretrained(path / "transformer", dtype=torch.float32)
        return assemble_student(cfg, family, pipe, dev, dt, name, text=text, buckets=buckets)
    lora = family.pipeline_class().lora_state_dict(str(path))
    lora = lora[0] if isinstance(lora, tuple) else lora
    weights = {k.removeprefix("transformer."): v for k, v in lora.items()}
    return assemble_student(cfg, family, pipe, dev, dt, name, lora_weights=weights, input_layer=_input_layer(path, cfg), text=text,
                            buckets=buckets)


def _input_layer(path: Path, cfg: StudentConfig) -> dict | None:
    if not cfg.edit_input:
        return None
    from safetensors.torch import load_file

    return load_file(str(Path(path) / INPUT_LAYER_FILE))


def load_student_pipeline(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
    """A ready diffusers pipeline of a saved LoRA student: its base with the adapters loaded by the standard
    `pipe.load_lora_weights`. A student without a grown layer needs nothing but that last call. An SD3 edit student
    (grown input layer) comes as `StableDiffusion3EditPipeline`, whose `__call__` takes `image=` and edits it."""
    path = Path(path)
    cfg = read_student_config(path)
    family = cfg.model_family
    if family.name == "pixel" or not cfg.trains_lora:
        raise ValueError(f"{path}: load_student_pipeline is for LoRA students of a diffusers base")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    pipe = family.load_pipeline(cfg.base, dev, dt, vae=True)
    if cfg.edit_input:
        from danceopd.models.sd3 import INPUT_LAYER, grow_input_for_source

        from danceopd.models.sd3_edit import StableDiffusion3EditPipeline

        grow_input_for_source(pipe.transformer).get_submodule(INPUT_LAYER).load_state_dict(_input_layer(path, cfg))
        _cast_params(pipe.transformer.get_submodule(INPUT_LAYER), dt)
        pipe = StableDiffusion3EditPipeline(**pipe.components)
    pipe.load_lora_weights(str(path))
    return pipe


MERGED_DIR = "transformer"


def save_merged_transformer(path: str | Path, dtype: str | torch.dtype = "auto") -> Path:
    """Fuse a saved LoRA student into its base transformer and save it as <path>/transformer: a standalone model that
    loads with `from_pretrained` and no peft. Runs on the CPU from the files (base + student folder), so it never
    takes GPU memory from a training worker; its cost is the base transformer once in host memory and on disk
    (FLUX.1-dev: ~24 GB in bf16, SD3.5-Medium: ~5 GB), a few minutes at full size."""
    import diffusers

    from danceopd.models.base import model_index

    path = Path(path)
    cfg = read_student_config(path)
    if not cfg.trains_lora:
        raise ValueError(f"{path}: only a LoRA student has a base to merge into")
    dt = resolve_dtype(dtype, torch.device("cpu")) if dtype != "auto" else torch.bfloat16
    index = model_index(cfg.base) or diffusers.DiffusionPipeline.load_config(cfg.base)
    transformer_class = getattr(diffusers, index["transformer"][1])
    transformer = transformer_class.from_pretrained(cfg.base, subfolder="transformer", torch_dtype=dt)
    if cfg.edit_input:
        from danceopd.models.sd3 import INPUT_LAYER, grow_input_for_source

        grow_input_for_source(transformer).get_submodule(INPUT_LAYER).load_state_dict(_input_layer(path, cfg))
        _cast_params(transformer.get_submodule(INPUT_LAYER), dt)
    transformer.load_lora_adapter(str(path), prefix="transformer", adapter_name="default", weight_name=LORA_FILE)
    transformer.fuse_lora(adapter_names=["default"])
    transformer.unload_lora()
    out = path / MERGED_DIR
    transformer.save_pretrained(out)
    return out


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
