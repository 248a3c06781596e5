"""The procedural image world behind the capability suite.

Images are float32 tensors `[3, H, W]` in [-1, 1]. A scene is a flat background plus one (basic tier) or
two (hard tier) objects of a palette colour and a shape. Rendering is exact (pixel-centre tests, no
anti-aliasing) so that judges can read colour and shape back from the pixels and exact teachers can
reproduce any scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from danceopd.seeding import derive_seed

# Colours in [0, 1] RGB; images store 2 * c - 1. Every pair is >= 0.6 apart, so that nearest-colour
# labelling survives the realism shading (x0.75) and a student's residual noise.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.10, 0.20, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.90, 0.10, 0.90),
    "cyan": (0.10, 0.90, 0.90),
}
BACKGROUND01 = (0.22, 0.22, 0.22)
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "above")

# Realism rendering: objects are lit from the top-left (brightness falls linearly to REALISM_SHADE_MIN at the
# bottom-right of the object's box) and the background carries a fixed texture of this amplitude ([0, 1] units).
REALISM_SHADE_MIN = 0.75
REALISM_TEXTURE_AMPLITUDE = 0.08

TierName = Literal["basic", "hard"]


@dataclass(frozen=True)
class Tier:
    """A difficulty tier of the world: image size, vocabulary and edit kinds."""

    name: str
    size: int
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    radii: tuple[int, ...]
    objects: int  # objects per scene: 1 (basic) or 2 (hard, with a spatial relation)
    global_edits: tuple[str, ...]
    references_per_prompt: int


TIERS: dict[str, Tier] = {
    "basic": Tier(
        name="basic",
        size=16,
        colours=("red", "green", "blue", "yellow"),
        shapes=("circle", "square", "triangle"),
        radii=(3, 4, 5),
        objects=1,
        global_edits=("invert", "night"),
        references_per_prompt=64,
    ),
    "hard": Tier(
        name="hard",
        size=32,
        colours=tuple(PALETTE),
        shapes=SHAPES,
        radii=(4, 5, 6),
        objects=2,
        global_edits=("invert", "night", "mirror", "rotate"),
        references_per_prompt=32,
    ),
}


def get_tier(name: str) -> Tier:
    try:
        return TIERS[name]
    except KeyError:
        raise ValueError(f"unknown tier {name!r}: choose one of {sorted(TIERS)}") from None


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cx: float  # centre, in pixels (pixel i covers [i, i+1))
    cy: float
    r: float  # half extent, in pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # for two objects: objects[0] <relation> objects[1]


# ----------------------------------------------------------------------------------------------- rendering


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape, by pixel-centre test."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2.0)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {shape!r}")


def texture_pattern(size: int) -> np.ndarray:
    """The fixed realism background texture: +-1 on 2x2 cells, seeded by the size only."""
    rng = np.random.default_rng(1000 + size)
    cells = rng.choice([-1.0, 1.0], size=((size + 1) // 2, (size + 1) // 2))
    return np.kron(cells, np.ones((2, 2)))[:size, :size]


def shading_ramp(cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """u in [-1, 1] across an object's box, -1 at the top-left corner, +1 at the bottom-right."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return np.clip(((xs - cx) + (ys - cy)) / (2.0 * r), -1.0, 1.0)


def render(scene: Scene, size: int, realistic: bool = False) -> torch.Tensor:
    """Render a scene to a [3, size, size] float32 tensor in [-1, 1]."""
    img = np.empty((size, size, 3))
    img[:] = BACKGROUND01
    if realistic:
        img += REALISM_TEXTURE_AMPLITUDE * texture_pattern(size)[..., None]
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.r, size)
        colour = np.asarray(PALETTE[obj.colour])
        if realistic:
            u = shading_ramp(obj.cx, obj.cy, obj.r, size)
            shade = 1.0 - (1.0 - REALISM_SHADE_MIN) * (u + 1.0) / 2.0
            img[mask] = colour[None, :] * shade[mask][:, None]
        else:
            img[mask] = colour
    return torch.from_numpy(np.clip(img, 0.0, 1.0) * 2.0 - 1.0).permute(2, 0, 1).float().contiguous()


# ------------------------------------------------------------------------------------------------- prompts


def describe(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def scene_prompt(scene: Scene) -> str:
    if len(scene.objects) == 1:
        return f"a {describe(scene.objects[0])}"
    a, b = scene.objects
    return f"a {describe(a)} {scene.relation} a {describe(b)}"


def t2i_prompts(tier: Tier) -> list[str]:
    """Every text-to-image prompt of a tier, in a fixed order."""
    if tier.objects == 1:
        return [f"a {c} {s}" for c in tier.colours for s in tier.shapes]
    out = []
    for c1 in tier.colours:
        for s1 in tier.shapes:
            for rel in RELATIONS:
                for c2 in tier.colours:
                    for s2 in tier.shapes:
                        if c1 != c2 and s1 != s2:
                            out.append(f"a {c1} {s1} {rel} a {c2} {s2}")
    return out


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], str | None]:
    """'a red circle left of a blue square' -> ([('red','circle'), ('blue','square')], 'left of')."""
    words = prompt.split()
    if len(words) == 3 and words[0] == "a":
        return [(words[1], words[2])], None
    for rel in RELATIONS:
        token = f" {rel} "
        if token in prompt:
            left, right = prompt.split(token)
            (o1,), _ = parse_prompt(left)
            (o2,), _ = parse_prompt(right)
            return [o1, o2], rel
    raise ValueError(f"not a suite prompt: {prompt!r}")


def prompt_seed(*parts: object) -> int:
    """The suite's seeds (reference sets, unconditional subset): derive_seed with its own separator, so
    the world's draws never coincide with a training run's."""
    return derive_seed(*parts, sep="|")


def random_scene(prompt: str, tier: Tier, rng: np.random.Generator) -> Scene:
    """A scene that satisfies `prompt`, with random size and position (and layout for two objects)."""
    objs, relation = parse_prompt(prompt)
    size = tier.size
    if len(objs) == 1:
        (colour, shape) = objs[0]
        r = float(rng.choice(tier.radii))
        lo, hi = int(math.ceil(r)), int(size - math.ceil(r))
        cx, cy = float(rng.integers(lo, hi + 1)), float(rng.integers(lo, hi + 1))
        return Scene((SceneObject(colour, shape, cx, cy, r),))
    for _ in range(1000):
        r1, r2 = float(rng.choice(tier.radii)), float(rng.choice(tier.radii))
        c = [(float(rng.integers(int(r), size - int(r) + 1)), float(rng.integers(int(r), size - int(r) + 1))) for r in (r1, r2)]
        (x1, y1), (x2, y2) = c
        # The relation must hold with a clear margin, and the boxes must not touch.
        if relation == "left of" and x1 + r1 + 2 > x2 - r2:
            continue
        if relation == "above" and y1 + r1 + 2 > y2 - r2:
            continue
        o1 = SceneObject(objs[0][0], objs[0][1], x1, y1, r1)
        o2 = SceneObject(objs[1][0], objs[1][1], x2, y2, r2)
        return Scene((o1, o2), relation)
    raise RuntimeError(f"could not place {prompt!r}")


# --------------------------------------------------------------------------------------------------- edits


def recolour(scene: Scene, shape: str, colour: str) -> Scene:
    """The local edit: the object of `shape` takes `colour`; everything else stays."""
    return replace(scene, objects=tuple(replace(o, colour=colour) if o.shape == shape else o for o in scene.objects))


def local_edit_instruction(shape: str, colour: str) -> str:
    return f"make the {shape} {colour}"


def parse_local_edit(instruction: str) -> tuple[str, str]:
    words = instruction.split()
    if len(words) != 4 or words[:2] != ["make", "the"]:
        raise ValueError(f"not a local-edit instruction: {instruction!r}")
    return words[2], words[3]


def apply_global_edit(image: torch.Tensor, edit: str) -> torch.Tensor:
    """The global edits, as exact pixel transforms of a [..., 3, H, W] image in [-1, 1]."""
    if edit == "invert":
        return -image
    if edit == "night":  # much darker and bluer: 0.3 x brightness plus a blue cast, still inside [-1, 1]
        offset = torch.tensor([-0.7, -0.64, -0.1], dtype=image.dtype, device=image.device).view(3, 1, 1)
        return (0.3 * image + offset).clamp(-1.0, 1.0)
    if edit == "mirror":
        return image.flip(-1)
    if edit == "rotate":  # a quarter turn counter-clockwise
        return image.rot90(1, dims=(-2, -1))
    raise ValueError(f"unknown global edit {edit!r}")


def global_edit_instruction(edit: str) -> str:
    return edit


def colour_values(names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """[K, 3] colours in [-1, 1]."""
    return torch.tensor([PALETTE[n] for n in names], dtype=torch.float32) * 2.0 - 1.0


def background_value() -> torch.Tensor:
    return torch.tensor(BACKGROUND01, dtype=torch.float32) * 2.0 - 1.0
