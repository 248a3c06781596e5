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
    """The safetensors file of an adapter: the file itself, or the LoRA file inside a folder (a hub id's cached
    snapshot folder too)."""
    from danceopd.models.hub import local_dir, where

    p = local_dir(path)
    if p is None:
        raise ValueError(f"{where(str(path))} is not on this machine: run `danceopd prefetch` for it")
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
    if Path(path).expanduser().is_dir() and cfg.exists():
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
    """Module names of a pipeline's transformer (a local folder's or a cached hub id's), built on the meta device from its
    config (no weights); None when its config is not on this machine."""
    from danceopd.models.hub import local_dir

    folder = local_dir(base)
    cfg_file = folder / subfolder / "config.json" if folder is not None else None
    if cfg_file is None or not cfg_file.is_file():
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
    model, or a typo'd folder); silent where it cannot be decided offline (a hub id not in the cache, converted
    formats). Hub ids are read from the Hugging Face cache when they are there."""
    from danceopd.models.hub import local_dir

    if local_dir(path) is None:
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
    from danceopd.models.hub import local_dir

    p = local_dir(path)
    if p is None:  # a hub repo (diffusers LoRA or PEFT adapter) not in the cache: fetch its files, then treat it as a folder
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


def read_student_init(path: str | Path, weight_name: str | None, family) -> tuple[dict[str, torch.Tensor], int, float, list[str]]:
    """An existing LoRA to start a student from (student.lora.init), as the family's diffusers pipeline reads it: a diffusers
    LoRA file, a kohya / ComfyUI / other trainer's file (converted by diffusers' own loaders) or a PEFT adapter folder.
    Returns (its transformer state in peft naming: `<module>.lora_A.weight`, ..., rank, alpha, target modules). Refuses
    an adapter of mixed ranks or one that also adapts text encoders (the student trains its transformer only)."""
    import inspect

    from danceopd.models.hub import local_dir

    p = local_dir(path)
    if p is None:
        raise ValueError(f"{path} is not on this machine: run `danceopd prefetch` for it")
    file = lora_file(p, weight_name)
    if p.is_dir() and (p / "adapter_config.json").exists():  # PEFT: keys base_model.model.<module>..., alpha in its config
        from safetensors.torch import load_file

        state = {_strip(k): v for k, v in load_file(str(file)).items()}
        c = json.loads((p / "adapter_config.json").read_text())
        alpha = float(c.get("lora_alpha", c.get("r", 1)))
    else:
        loader = family.pipeline_class().lora_state_dict
        kwargs = {"return_lora_metadata": True, **({"return_alphas": True} if "return_alphas" in inspect.signature(loader).parameters else {})}
        out = loader(str(file.parent), weight_name=file.name, **kwargs)
        raw, metadata = out[0], out[-1]
        alphas = out[1] if len(out) == 3 else None
        others = sorted({k.split(".")[0] for k in raw if not k.startswith("transformer.")})
        if others:
            raise ValueError(f"the LoRA {path} also adapts {others}: a student trains its transformer's adapters only; give a "
                             "transformer-only LoRA")
        state = {k.removeprefix("transformer."): v for k, v in raw.items()}
        values = {float(v) for v in (alphas or {}).values()}
        alpha = float((metadata or {}).get("lora_alpha") or (values.pop() if len(values) == 1 else 0) or 0)
    ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"the LoRA {path} has modules of ranks {sorted(ranks)}: a student starts from an adapter of one rank")
    rank = ranks.pop()
    modules = sorted({_module_of_key(k) for k in state if _module_of_key(k)})
    return state, rank, alpha or float(rank), modules  # no alpha recorded: diffusers' own assumption, alpha = rank
