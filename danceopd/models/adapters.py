"""LoRA adapters, through peft and diffusers' own loaders: reading a teacher's adapter (a diffusers LoRA file or
a PEFT folder), checking that its keys name modules of the base transformer (before anything loads), merging
it into a frozen teacher once, and a checksum of the merged weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    """The safetensors file of an adapter: the file itself, or the LoRA file inside a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    names = (weight_name,) if weight_name else LORA_FILE_NAMES
    for n in names:
        if (p / n).exists():
            return p / n
    raise ValueError(f"{p} holds no LoRA file (looked for {list(names)}): give a diffusers LoRA file or a PEFT adapter folder")


def peft_alpha_ratio(path: str | Path) -> float:
    """lora_alpha / r of a PEFT adapter folder (diffusers' loader assumes alpha = r for a state dict without metadata)."""
    cfg = Path(path).expanduser() / "adapter_config.json"
    if Path(path).is_dir() and cfg.exists():
        c = json.loads(cfg.read_text())
        return float(c.get("lora_alpha", c.get("r", 1))) / float(c.get("r", 1))
    return 1.0


def _module_of_key(key: str) -> str | None:
    for marker in (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up."):
        if marker in key:
            return key.split(marker)[0]
    return None


def _strip(key: str) -> str:
    for prefix in ("base_model.model.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def lora_modules(path: str | Path, weight_name: str | None = None) -> set[str] | None:
    """The transformer modules an adapter's keys name (read from the safetensors header only), or None when its
    keys are in another tool's naming (kohya, original FLUX) that diffusers converts at load."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path, weight_name)), "pt") as f:
        keys = list(f.keys())
    if not keys or not all(_module_of_key(k) for k in keys if not k.endswith(".alpha")):
        return None
    if any(k.startswith(("text_encoder", "lora_unet", "lora_te")) for k in keys):
        return None
    return {_strip(_module_of_key(k)) for k in keys if _module_of_key(k)}


def transformer_module_names(base: str | Path, subfolder: str = "transformer") -> set[str] | None:
    """Module names of a local pipeline's transformer, built on the meta device from its config (no weights)."""
    cfg_file = Path(base).expanduser() / subfolder / "config.json"
    if not cfg_file.exists():
        return None
    import diffusers
    from accelerate import init_empty_weights

    config = json.loads(cfg_file.read_text())
    cls = getattr(diffusers, config["_class_name"])
    with init_empty_weights(include_buffers=True):  # every tensor on meta: no memory, allowed in a job driver
        model = cls.from_config(config)
    return {name for name, _ in model.named_modules()}


def check_lora_keys(path: str | Path, base: str | Path, weight_name: str | None = None) -> None:
    """ValueError when an adapter's keys name modules the base transformer does not have (a LoRA for another
    model, or a typo'd folder); silent where it cannot be decided offline (hub ids, converted formats)."""
    if not Path(path).expanduser().exists():
        return
    wanted = lora_modules(path, weight_name)
    have = transformer_module_names(base)
    if wanted is None or have is None:
        return
    missing = sorted(wanted - have)
    if len(missing) == len(wanted):
        raise ValueError(f"none of the {len(wanted)} modules named by the LoRA {path} exists in the transformer of {base} "
                         f"(e.g. {missing[0]!r}): is the adapter for another model?")
    if missing:
        raise ValueError(f"{len(missing)} of the {len(wanted)} modules named by the LoRA {path} do not exist in the transformer "
                         f"of {base} (e.g. {missing[0]!r}): is the adapter for another model?")


def load_lora(pipe: Any, path: str | Path, adapter_name: str, weight_name: str | None = None) -> float:
    """Load an adapter into the pipeline's transformer with the pipeline's own LoRA loader (diffusers, kohya and
    PEFT layouts; a hub repo is fetched first). Returns the factor its scale must be multiplied by (a PEFT
    folder's alpha / r, which diffusers' loader does not see in a bare state dict)."""
    from diffusers.utils import logging as diffusers_logging
    from safetensors.torch import load_file

    # diffusers warns once per text encoder that a transformer-only LoRA has no keys for it: expected here.
    diffusers_logging.set_verbosity_error()
    p = Path(path).expanduser()
    if not p.exists():  # a hub repo (diffusers LoRA or PEFT adapter): fetch its files, then treat it as a folder
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
    if p.is_dir() and (p / "adapter_config.json").exists():  # a PEFT folder: keys without the transformer. prefix
        sd = {f"transformer.{_strip(k)}": v for k, v in load_file(str(lora_file(p, weight_name))).items()}
        pipe.load_lora_weights(sd, adapter_name=adapter_name)
        return peft_alpha_ratio(p)
    f = lora_file(p, weight_name)
    pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=adapter_name)
    return 1.0


def merge_lora(pipe: Any, path: str | Path, scale: float, adapter_name: str, weight_name: str | None = None) -> None:
    """Load an adapter, fuse it into the transformer at `scale`, and drop the adapter layers: the teacher is then a
    plain frozen transformer (no per-call LoRA cost)."""
    ratio = load_lora(pipe, path, adapter_name, weight_name)
    pipe.transformer.fuse_lora(lora_scale=scale * ratio, adapter_names=[adapter_name])
    pipe.transformer.unload_lora()


def weights_checksum(module: torch.nn.Module) -> str:
    """sha256 over the module's parameters and buffers (names, dtypes, shapes, bytes): the identity of a teacher."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
