"""The kohya / ComfyUI LoRA layout (`lora_unet_<module with _>.lora_down / lora_up / alpha`), written from a trained
student's diffusers LoRA (student.export_formats: comfyui). Each family maps its diffusers module names to the original
model's (ComfyUI's) names, where some projections are one fused layer: there the down matrices are stacked and the up
matrix is block-diagonal, which is the same update (and what diffusers' converters split again). The scale
alpha / rank is baked into the up matrices; alpha keys say the rank (scale 1)."""

from __future__ import annotations

import torch

Pair = tuple[torch.Tensor, torch.Tensor]  # (down [r, in], up [out, r]) of one module


def pairs(lora: dict[str, torch.Tensor], scale: float) -> dict[str, Pair]:
    """module name -> (down, up x scale), from a peft / diffusers LoRA state dict (keys `<module>.lora_A.weight`)."""
    return {k.split(".lora_A.")[0]: (v, lora[k.replace(".lora_A.", ".lora_B.")] * scale) for k, v in lora.items() if ".lora_A." in k}


def fuse(parts: list[Pair | None], name: str, slots: list[str]) -> Pair:
    """One fused layer's LoRA from its projections' (all of them: a fused layer has no partial adapter)."""
    missing = [s for s, p in zip(slots, parts) if p is None]
    if missing:
        raise ValueError(f"{name}: ComfyUI's fused layer needs LoRAs on all of {slots} (missing {missing}): target them together")
    return torch.cat([p[0] for p in parts]), torch.block_diag(*[p[1] for p in parts])


def put(out: dict[str, torch.Tensor], name: str, pair: Pair) -> None:
    key = "lora_unet_" + name.replace(".", "_")
    down, up = pair
    out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.contiguous(), up.contiguous()
    out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
