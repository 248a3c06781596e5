"""What every model family knows about its own conventions, behind one small protocol.

A family is a stateless object: given a loaded pipeline it encodes prompts, calls its transformer on
unpacked latents `x [B, C, H, W]` with `sigma [B]`, maps images to latents and back, and names its sigma
grid. The field (`danceopd.fields.model_field`), the student and the evaluator are built on these methods
only, so adding a family (as FLUX.2, Qwen-Image and Z-Image were added) is one new module registered in `danceopd.models`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from danceopd.flow.schedule import shift_sigmas
from danceopd.models.hub import local_dir

Embeds = tuple[torch.Tensor, ...]  # per-family prompt embeddings, batch first


def quiet_loading() -> None:
    """No "Loading weights" bars from diffusers' and transformers' from_pretrained: noise in a training log."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class ModelFamily:
    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this family loads; [0] saves LoRAs
    native_source: bool = False  # the source image enters as extra tokens (Kontext); else channel concatenation
    text_sees_source: bool = False  # the text encoder reads the source image too (Qwen-Image-Edit): embeddings per (prompt, image)
    default_guidance: float | None = None  # guidance-embedding value (FLUX.1-dev) where the transformer has one
    # LoRA targets (peft module-name suffixes): attention and feed-forward projections, the paper's recipe.
    default_lora_targets: tuple[str, ...] = ()
    latent_space: str = ""  # families that share a latent space (and transformer calls) can teach each other
    default_max_sequence_length: int = 256  # the pipeline's own default (T5 prompts are padded to it)

    # ----------------------------------------------------------------------------- loading
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def load_pipeline(self, path: str, device: torch.device, dtype: torch.dtype, vae: bool = True,
                      text_encoders: str | None = "device") -> Any:
        """The pipeline's transformer, text encoders and (optionally) VAE, frozen, in `dtype`, on `device`; text encoders
        kept in host memory (`text_encoders="cpu"`) or not loaded at all (None: prompts come from an embedding store)."""
        quiet_loading()
        kwargs = {} if vae else {"vae": None}
        if text_encoders is None:
            kwargs.update(dict.fromkeys(text_components(path)))
        pipe = self.pipeline_class().from_pretrained(path, dtype=dtype, **{**absent_components(path), **kwargs})
        pipe.set_progress_bar_config(disable=True)
        if not vae and (geometry := vae_geometry(path)) is not None:
            pipe.vae_scale_factor = geometry[1]  # without a VAE the pipeline assumes 8; the latent grid stays the VAE's
        pipe = pipe.to(device)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
                if text_encoders == "cpu" and name.startswith("text_encoder"):
                    module.to("cpu")
        return pipe

    def load_text_encoders(self, path: str, device: torch.device, dtype: torch.dtype) -> Any:
        """The pipeline with its tokenizers and text encoders only (the transformer an empty shell on the meta device, for
        the config values encode_prompt reads; no VAE): what encoding prompts needs."""
        import diffusers

        from danceopd.models.published import meta_transformer

        shell = meta_transformer(component_config(path, "transformer"))
        pipe = self.pipeline_class().from_pretrained(path, dtype=dtype, **{**absent_components(path), "vae": None, "transformer": shell})
        for name in text_components(path):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval().to(device)
        return pipe

    # ----------------------------------------------------------------------------- the model call
    def encode_prompts(self, pipe: Any, prompts: list[str], max_sequence_length: int) -> Embeds:
        raise NotImplementedError

    def call_transformer(self, transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, embeds: Embeds,
                         source: torch.Tensor | None, guidance: float | None) -> torch.Tensor:
        raise NotImplementedError

    def takes_source(self, transformer: torch.nn.Module) -> bool:
        """Whether this transformer reads a source image (natively, or on grown input channels)."""
        if self.native_source:
            return True
        cfg = getattr(transformer, "module", transformer).config
        return cfg.in_channels == 2 * (cfg.out_channels or cfg.in_channels)

    # ----------------------------------------------------------------------------- latent space
    latent_patch: int = 1  # the transformer packs or patchifies latents in patches of this side (FLUX, Z-Image: 2)

    def latent_shape(self, pipe: Any, resolution: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the samples at `resolution`: a square's side, or an aspect-ratio bucket's (width, height)."""
        f = pipe.vae_scale_factor
        w, h = image_size(resolution)
        m = self.latent_patch * f
        if w % m or h % m:
            raise ValueError(f"{self.name} takes {self.latent_patch}x{self.latent_patch} latent patches: image sides must be "
                             f"multiples of {m}, got {w}x{h}")
        c = pipe.vae.config.latent_channels if pipe.vae is not None else self._latent_channels(pipe)
        return (c, h // f, w // f)

    def sample_shape_of(self, path: str, resolution: int | tuple[int, int]) -> tuple[int, int, int] | None:
        """The sample shape at `resolution` from a local pipeline's VAE config alone (None for a hub id): what the job
        checks the teachers' shapes against before training."""
        geometry = vae_geometry(path)
        if geometry is None:
            return None
        channels, f = geometry
        w, h = image_size(resolution)
        return (channels, h // f, w // f)

    def size_multiple(self, path: str | None) -> int:
        """Image sides must be multiples of this (the VAE's downscale x the transformer's patch); 8 x patch for a hub id."""
        geometry = None if path is None else vae_geometry(path)
        return self.latent_patch * (8 if geometry is None else geometry[1])

    def _latent_channels(self, pipe: Any) -> int:
        cfg = pipe.transformer.config
        return cfg.out_channels or cfg.in_channels

    def encode_images(self, pipe: Any, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents, with the VAE's shift and scaling (the mode, no sampling)."""
        vae = pipe.vae
        with torch.no_grad():
            z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        with torch.no_grad():
            return vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def default_sigmas(self, pipe: Any, num_steps: int, sample_shape: tuple[int, int, int]) -> torch.Tensor:
        """The family's own sampling grid of `num_steps` steps (N + 1 values, ending at 0)."""
        raise NotImplementedError

    comfyui_lora = None  # (lora state dict without prefix, scale alpha / rank) -> ComfyUI's key layout, where written


class PromptCache:
    """A bounded LRU cache of per-prompt embeddings: the encoders are frozen, prompts repeat across steps, and
    a real encoder's output (SD3: ~2.7 MB per prompt) must not grow without bound over a dataset. Prompts are encoded
    one at a time (T5-XXL at 512 tokens: ~10-20 ms a prompt on an H100 against seconds for a rollout). Where the text
    encoder also sees the source image (`sources`, one latent per prompt), an entry is keyed on (prompt, source)."""

    def __init__(self, encode: Callable[..., Embeds], max_entries: int = 512):
        self.encode, self.max_entries = encode, max_entries
        self.entries: OrderedDict = OrderedDict()
        self.misses = 0

    def clear(self) -> None:
        self.entries.clear()

    def __call__(self, prompts: list[str], sources: torch.Tensor | None = None) -> Embeds:
        if sources is None:
            keys, encode_one = list(prompts), {p: (lambda p=p: self.encode([p])) for p in prompts}
        else:  # (prompt, the source latent's bytes digest): the same prompt on another image is another embedding
            keys = [(p, _digest(sources[i])) for i, p in enumerate(prompts)]
            encode_one = {k: (lambda i=i: self.encode([prompts[i]], sources[i:i + 1])) for i, k in enumerate(keys)}
        if self.max_entries == 0:
            return stack_rows([tuple(t[0] for t in encode_one[k]()) for k in keys])
        got = {k: self.entries[k] for k in dict.fromkeys(keys) if k in self.entries}
        for k in dict.fromkeys(keys):
            if k in got:
                continue
            self.misses += 1
            with torch.no_grad():  # one prompt per call: an embedding must not depend on the batch it was encoded in (kernels
                got[k] = tuple(t[0].clone() for t in encode_one[k]())  # differ in the last bit with the batch size); compact
            self.entries[k] = got[k]
        for k in got:
            self.entries.move_to_end(k)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return stack_rows([got[k] for k in keys])


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def stack_rows(rows: list[tuple[torch.Tensor, ...]]) -> Embeds:
    """Per-prompt embeddings -> one batch; rows of different lengths (Qwen-Image captions) are zero-padded along their
    first axis to the longest (the family's embeddings carry the lengths that mask the padding)."""
    out = []
    for j in range(len(rows[0])):
        parts = [r[j] for r in rows]
        longest = max(p.shape[0] if p.dim() else 0 for p in parts)
        if any(p.dim() and p.shape[0] != longest for p in parts):
            parts = [torch.cat([p, p.new_zeros(longest - p.shape[0], *p.shape[1:])]) for p in parts]
        out.append(torch.stack(parts))
    return tuple(out)


def image_size(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(width, height) of a square side or of a (width, height) bucket."""
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


def model_index(path: str | Path) -> dict | None:
    """A pipeline's model_index.json: a local folder's, or a hub id's in the Hugging Face cache; None when there is none
    (a hub id not in the cache, a folder that is not a pipeline)."""
    folder = local_dir(path)
    f = folder / "model_index.json" if folder is not None else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def component_config(path: str | Path, subfolder: str) -> dict:
    """A pipeline component's config.json (e.g. transformer/), from the local folder or the cache, else downloaded (a
    hub id not prefetched; hf_hub_download honours HF_HUB_OFFLINE)."""
    folder = local_dir(path)
    if folder is not None and (folder / subfolder / "config.json").is_file():
        return json.loads((folder / subfolder / "config.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(str(path), "config.json", subfolder=subfolder)).read_text())


def vae_geometry(path: str | Path) -> tuple[int, int] | None:
    """(latent channels, downscale factor) of a pipeline's VAE, read from its config (no weights loaded): a local
    folder's, or a cached hub id's; None when neither has one."""
    folder = local_dir(path)
    f = folder / "vae" / "config.json" if folder is not None else None
    if f is None or not f.is_file():
        return None
    v = json.loads(f.read_text())
    if "z_dim" in v:  # AutoencoderKLQwenImage: a video VAE, one downsampling per temperal_downsample entry
        return v["z_dim"], 2 ** len(v["temperal_downsample"])
    return v["latent_channels"], 2 ** (len(v["block_out_channels"]) - 1)


def text_components(path: str | Path) -> list[str]:
    """The pipeline's text encoder and tokenizer component names (its model_index.json; a hub id's from the cache)."""
    index = model_index(path)
    if index is None:
        import diffusers

        index = diffusers.DiffusionPipeline.load_config(str(path))
    return [k for k in index if k.startswith(("text_encoder", "tokenizer", "processor"))]


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the pipelines' text-encoder component names


def text_encoder_parameters(pipe: Any) -> int:
    """Parameters of the text encoders this pipeline holds (0 when prompts come from an embedding store)."""
    modules = [getattr(pipe, n, None) for n in TEXT_ENCODERS]
    return sum(p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters())


def text_device(pipe: Any) -> torch.device:
    """Where the pipeline's text encoders are (prompts are encoded there)."""
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return next(module.parameters()).device
    raise RuntimeError("this pipeline holds no text encoder (student.text_embeddings: precompute): prompts come from the store")


def absent_components(path: str | Path) -> dict:
    """Components a local folder declares empty (e.g. SD3 without T5), passed as None to from_pretrained."""
    index = model_index(path) or {}
    return {k: None for k, v in index.items() if not k.startswith("_") and v in (None, [None, None])}


def shifted_linspace(num_steps: int, shift: float) -> torch.Tensor:
    """linspace(1, 1/N, N) shifted by `shift`, then 0: the FLUX / dynamic-shift grid of diffusers' pipelines."""
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return torch.cat([shift_sigmas(s, shift), torch.zeros(1, dtype=torch.float64)]).to(torch.float32)


def scheduler_sigmas(pipe: Any, num_steps: int, image_seq_len: int, linspace_sigmas: bool) -> torch.Tensor:
    """The sigmas the pipeline's own scheduler would use, from a fresh copy of it (never its stateful step()):
    static shift from its config, or the resolution-dependent shift (mu from the image's token count)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = pipe.scheduler.config
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    kwargs: dict = {}
    if linspace_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    else:
        kwargs["num_inference_steps"] = num_steps
    if cfg.get("use_dynamic_shifting", False):
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        kwargs["mu"] = image_seq_len * m + base_shift - m * base_len
    sched.set_timesteps(**kwargs)
    return sched.sigmas.to(torch.float32).cpu()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine: use 'cpu' or 'auto'")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
