"""Velocity fields backed by diffusers flow-matching transformers, loaded the standard way.

Two folder layouts load with `load_model_field(path_or_hub_id)`:
- a StableDiffusion3 pipeline folder (model_index.json, transformer/, text_encoder*/, tokenizer*/): the
  prompt is encoded exactly as `StableDiffusion3Pipeline.encode_prompt` does, the transformer is called as
  the pipeline calls it (timestep = 1000 * sigma); works in the pipeline's latent space;
- a DanceOPD student folder (danceopd_student.json, transformer/, text_encoder/, tokenizer/), see
  `danceopd.student`: one CLIP text encoder, source image channel-concatenated for edits.

A transformer whose `in_channels` is twice its `out_channels` takes a source image (concatenated on the
channel axis). Prompt embeddings are cached per prompt (the encoders are frozen).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from danceopd.fields.base import Conditions, FieldInfo, check_query

PromptEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # -> (hidden [B,T,D], pooled [B,P])

STUDENT_MARKER = "danceopd_student.json"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # bf16 where the hardware runs it natively; fp32 on CPU (bf16 matmuls there are slow and lossy).
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(table)} or 'auto'")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine: use 'cpu' or 'auto'")
    return device


class TransformerField:
    """A flow-matching transformer plus its (frozen) prompt encoder, as a batched velocity field."""

    def __init__(self, name: str, kind: str, transformer: torch.nn.Module, encode: PromptEncoder,
                 sample_shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype, cache_prompts: bool = True):
        self.transformer, self._encode = transformer, encode
        self.device, self.dtype = device, dtype
        config = getattr(transformer, "module", transformer).config  # a DDP wrapper keeps the model in .module
        in_ch, out_ch = config.in_channels, config.out_channels or config.in_channels
        self.takes_source = in_ch == 2 * out_ch
        self.info = FieldInfo(name, kind, sample_shape, takes_source=self.takes_source)
        self.cache_prompts = cache_prompts
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cache_prompts:
            return self._encode(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.no_grad():
                hidden, pooled = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (hidden[i], pooled[i])
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """Differentiable w.r.t. the transformer's parameters; wrap in no_grad for inference."""
        check_query(self.info, x, sigma, conditions)
        hidden, pooled = self.encode_prompts(conditions.prompts)
        h = x.to(self.device, self.dtype)
        if self.takes_source:
            src = conditions.source if conditions.source is not None else torch.zeros_like(x)
            h = torch.cat([h, src.to(self.device, self.dtype)], dim=1)
        # diffusers flow-match transformers take t = 1000 * sigma (the schedulers' num_train_timesteps).
        timestep = (sigma.to(self.device, torch.float32) * 1000.0)
        out = self.transformer(hidden_states=h, timestep=timestep, encoder_hidden_states=hidden.to(self.dtype),
                               pooled_projections=pooled.to(self.dtype), return_dict=False)[0]
        return out.to(x.dtype) if out.device == x.device else out.to(x.device, x.dtype)


def _sd3_field(path: str, name: str, device: torch.device, dtype: torch.dtype, max_sequence_length: int) -> TransformerField:
    from diffusers import StableDiffusion3Pipeline

    # No VAE: the field works in latent space; the pipeline's encoders and transformer are all it needs.
    # Components a local folder does not hold (e.g. no T5 encoder) are passed as None explicitly.
    absent = {}
    index_file = Path(path) / "model_index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        for comp in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
            if index.get(comp) in (None, [None, None]):
                absent[comp] = None
    pipe = StableDiffusion3Pipeline.from_pretrained(path, vae=None, dtype=dtype, **absent).to(device)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()

    def encode(prompts: list[str]):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return embeds, pooled

    cfg = pipe.transformer.config
    shape = (cfg.out_channels or cfg.in_channels, cfg.sample_size, cfg.sample_size)
    field = TransformerField(name, "diffusers", pipe.transformer, encode, shape, device, dtype)
    field.pipeline = pipe
    return field


def load_model_field(path: str | Path, name: str | None = None, device: str | torch.device | None = "auto",
                     dtype: str | torch.dtype | None = "auto", max_sequence_length: int = 256) -> TransformerField:
    """Load a field from a local folder (or a hub id where the hub is reachable). Layout is detected."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    local = Path(path)
    name = name or local.name
    if local.exists():
        if (local / STUDENT_MARKER).exists():
            from danceopd.student import load_student

            return load_student(local, device=dev, dtype=dt, name=name).field
        if not (local / "model_index.json").exists():
            raise ValueError(f"{local} is neither a StableDiffusion3 pipeline folder (model_index.json) nor a DanceOPD student folder ({STUDENT_MARKER})")
        index = json.loads((local / "model_index.json").read_text())
        if not str(index.get("_class_name", "")).startswith("StableDiffusion3"):
            raise ValueError(f"{local}/model_index.json names {index.get('_class_name')!r}; supported: StableDiffusion3Pipeline layouts")
    elif str(path).startswith((".", "/")):
        raise ValueError(f"model folder {path} does not exist")
    return _sd3_field(str(path), name, dev, dt, max_sequence_length)
