"""Judges: score generated images per capability from the pixels (and the conditions) alone.

Every judge returns a dict with a primary `score` in [0, 1] (the capability metric) plus continuous
measures (IoU, PSNR, reward) so that methods can be told apart after the pass/fail score saturates.
PSNR is over the [-1, 1] range (peak-to-peak 2): 20 dB is an RMSE of 0.2.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from danceopd.fields.base import Conditions
from danceopd.suite import world
from danceopd.suite.perception import detect_objects, label_pixels
from danceopd.suite.teachers import local_edit_target

EDIT_PSNR_THRESHOLD_DB = 20.0
RECOLOURED_FRACTION = 0.8
MODE_MATCH_RMSE = 0.25  # a sample "hits" its nearest reference only if it is this close (RMSE, [-1, 1] units)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()) ** 2
    mse = float(d.mean()) if mask is None else float(d[:, mask].mean()) if mask.any() else 0.0
    return 99.0 if mse <= 1e-10 else min(99.0, 10.0 * math.log10(4.0 / mse))


def t2i_correct(image: torch.Tensor, prompt: str, tier: world.Tier) -> tuple[bool, float]:
    """Prompt following: every named object present with its colour and shape, nothing else, relation held."""
    wanted, relation = world.parse_prompt(prompt)
    found = detect_objects(image, tier.colours, tier.shapes)
    by_colour = {o.colour: o for o in found}
    ious, ok = [], len(found) == len(wanted)
    for colour, shape in wanted:
        obj = by_colour.get(colour)
        if obj is None:
            ok = False
            ious.append(0.0)
            continue
        ok &= obj.shape == shape
        ious.append(obj.shape_iou if obj.shape == shape else 0.0)
    if ok and relation is not None:
        a, b = by_colour[wanted[0][0]], by_colour[wanted[1][0]]
        ok = a.cx < b.cx if relation == "left of" else a.cy < b.cy
    return bool(ok), float(np.mean(ious))


def judge_t2i(samples: torch.Tensor, conditions: Conditions, tier: world.Tier) -> dict:
    results = [t2i_correct(img, p, tier) for img, p in zip(samples, conditions.prompts)]
    return {"score": float(np.mean([r[0] for r in results])), "shape_iou": float(np.mean([r[1] for r in results]))}


def nearest_references(samples: torch.Tensor, prompts: list[str], references) -> list[tuple[str, int, float]]:
    """(prompt, index of the nearest reference, RMSE to it) per sample; `references(prompt)` -> [M, C, H, W]."""
    out = []
    for img, p in zip(samples, prompts):
        refs = references(p)
        rmse = ((refs - img.float().cpu()) ** 2).flatten(1).mean(1).sqrt()
        j = int(rmse.argmin())
        out.append((p, j, float(rmse[j])))
    return out


def diversity(samples: torch.Tensor, prompts: list[str], references) -> dict:
    """How much of the reference distribution the samples cover: distinct reference modes hit."""
    hits = nearest_references(samples, prompts, references)
    modes = {(p, j) for p, j, d in hits if d <= MODE_MATCH_RMSE}
    per_prompt = {}
    for p, j, d in hits:
        if d <= MODE_MATCH_RMSE:
            per_prompt.setdefault(p, set()).add(j)
    return {
        "modes_hit": len(modes),
        "samples": len(hits),
        "matched_fraction": float(np.mean([d <= MODE_MATCH_RMSE for _, _, d in hits])),
        "mean_nearest_rmse": float(np.mean([d for _, _, d in hits])),
        "min_modes_per_prompt": min((len(v) for v in per_prompt.values()), default=0),
    }


def judge_local_edit(samples: torch.Tensor, conditions: Conditions, tier: world.Tier) -> dict:
    """Success: the named object is recoloured (>= 80% of its pixels read as the new colour) and everything
    else is kept (PSNR >= 20 dB outside the object against the source)."""
    success, full_psnr, bg_psnr = [], [], []
    for img, src, instr in zip(samples, conditions.source, conditions.prompts):
        shape, colour = world.parse_local_edit(instr)
        target = local_edit_target(src, instr, tier)
        changed = (target - src).abs().sum(0) > 1e-6
        labels = label_pixels(img, tier.colours)
        k = tier.colours.index(colour) + 1
        recoloured = float((labels[changed.numpy()] == k).mean()) if changed.any() else 0.0
        keep = psnr(img.cpu(), src, ~changed)
        success.append(recoloured >= RECOLOURED_FRACTION and keep >= EDIT_PSNR_THRESHOLD_DB)
        full_psnr.append(psnr(img.cpu(), target))
        bg_psnr.append(keep)
    return {"score": float(np.mean(success)), "psnr_db": float(np.mean(full_psnr)), "background_psnr_db": float(np.mean(bg_psnr))}


def judge_global_edit(samples: torch.Tensor, conditions: Conditions, tier: world.Tier) -> dict:
    """Success: PSNR >= 20 dB against the exact transform of the source."""
    values = [psnr(img.cpu(), world.apply_global_edit(src, instr)) for img, src, instr in zip(samples, conditions.source, conditions.prompts)]
    return {"score": float(np.mean([v >= EDIT_PSNR_THRESHOLD_DB for v in values])), "psnr_db": float(np.mean(values))}


def realism_reward(image: torch.Tensor, tier: world.Tier) -> float:
    """Reward in [0, 1]: half for the background texture, half for the object's top-left lighting.

    Each half is the fitted amplitude of that signal over the amplitude of the realism renders, clipped to
    [0, 1]. A flat render scores ~0, a realistic render ~1.
    """
    img01 = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    labels = label_pixels(image, tier.colours)
    bg = labels == 0
    pattern = world.texture_pattern(tier.size)
    lum = img01.mean(0)
    texture = 0.0
    if bg.sum() > 8:
        p = pattern[bg] - pattern[bg].mean()
        texture = float(np.clip((p * (lum[bg] - lum[bg].mean())).sum() / max((p * p).sum(), 1e-9) / world.REALISM_TEXTURE_AMPLITUDE, 0, 1))
    shading = []
    for obj in detect_objects(image, tier.colours, tier.shapes):
        ys, xs = np.nonzero(obj.mask)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        r = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
        u = world.shading_ramp(cx, cy, r, tier.size)[obj.mask]
        colour_lum = float(np.mean(world.PALETTE[obj.colour]))
        v = lum[obj.mask]
        if u.std() < 1e-6:
            continue
        slope = float(np.polyfit(u, v, 1)[0])
        expected = -(1 - world.REALISM_SHADE_MIN) / 2 * colour_lum
        shading.append(float(np.clip(slope / expected, 0, 1)))
    return 0.5 * texture + 0.5 * (float(np.mean(shading)) if shading else 0.0)


def judge_realism(samples: torch.Tensor, conditions: Conditions, tier: world.Tier) -> dict:
    rewards = [realism_reward(img, tier) for img in samples]
    accuracy = judge_t2i(samples, conditions, tier)["score"]
    return {"score": float(np.mean(rewards)), "reward": float(np.mean(rewards)), "t2i_accuracy": accuracy}


def judge_uncond(samples: torch.Tensor, conditions: Conditions, tier: world.Tier) -> dict:
    """Unconditional samples: the share that is some valid suite image (right object count, known shapes)."""
    valid = []
    for img in samples:
        found = detect_objects(img, tier.colours, tier.shapes)
        valid.append(len(found) == tier.objects and all(o.shape_iou >= 0.7 for o in found))
    return {"score": float(np.mean(valid))}


JUDGES = {
    "t2i": judge_t2i,
    "local_edit": judge_local_edit,
    "global_edit": judge_global_edit,
    "realism": judge_realism,
    "uncond": judge_uncond,
}
