"""Reading scenes back from pixels: colour labelling, object masks, shape recognition.

Used by the judges (scoring generated images) and by the exact local-edit teacher (which, like a real
editing model, sees only the source pixels and the instruction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from danceopd.suite.world import BACKGROUND01, PALETTE, shape_mask

MIN_OBJECT_PIXELS = 5


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    shape_iou: float  # IoU of the mask with the best re-rendered shape in the same box
    mask: np.ndarray  # [H, W] bool
    cx: float
    cy: float


def label_pixels(image: torch.Tensor, colours: tuple[str, ...]) -> np.ndarray:
    """[H, W] int labels: 0 = background, k = colours[k-1]; nearest reference colour in RGB."""
    img01 = ((image.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).permute(1, 2, 0).numpy()
    refs = np.asarray([BACKGROUND01] + [PALETTE[c] for c in colours])
    d = ((img01[:, :, None, :] - refs[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def classify_shape(mask: np.ndarray, shapes: tuple[str, ...]) -> tuple[str, float]:
    """Best shape for a mask: re-render each candidate in the mask's bounding box, keep the highest IoU."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    r = max(x1 - x0, y1 - y0) / 2.0
    best, best_iou = shapes[0], -1.0
    for shape in shapes:
        # Pixel-centre rasterisation loses up to half a pixel per side: try the box radius and a bit more.
        for rr in (r, r + 0.25, r + 0.5):
            cand = shape_mask(shape, cx, cy, rr, mask.shape[0])
            iou = float((cand & mask).sum() / max((cand | mask).sum(), 1))
            if iou > best_iou:
                best, best_iou = shape, iou
    return best, best_iou


def detect_objects(image: torch.Tensor, colours: tuple[str, ...], shapes: tuple[str, ...]) -> list[DetectedObject]:
    """One object per palette colour present with at least MIN_OBJECT_PIXELS pixels, largest first."""
    labels = label_pixels(image, colours)
    found = []
    for k, colour in enumerate(colours, start=1):
        mask = labels == k
        if mask.sum() < MIN_OBJECT_PIXELS:
            continue
        shape, iou = classify_shape(mask, shapes)
        ys, xs = np.nonzero(mask)
        found.append(DetectedObject(colour, shape, iou, mask, float(xs.mean() + 0.5), float(ys.mean() + 0.5)))
    found.sort(key=lambda o: -int(o.mask.sum()))
    return found
