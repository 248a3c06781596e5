"""What `danceopd prefetch` downloads for each shipped recipe at full size, and how long that takes at 1 GB/s.

    python benchmarks/prefetch_sizes.py          # prints a table, writes benchmarks/results/prefetch.json

From the published configs (danceopd.models.published: parameter counts on the meta device, no weights, no network),
each pipeline's components as `DiffusionPipeline.download` fetches them (the folders model_index.json names, safetensors
only) in bfloat16, as the repositories store them (SD3.5's T5 in float16: the same 2 bytes); LoRA repositories from
their published layout (Flow-GRPO: PEFT, rank 32 on SD3.5-Medium's attention projections, float32). A hub id shared by
two recipes' teachers is one download; the cache is shared by every node, so this is paid once per cluster. Run it
without HF_HOME pointing at a tiny hub (its configs would be measured instead).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = ("sd35-medium-lora", "gpu-cluster", "flux-kontext-lora", "flux2-klein-from-dev", "qwen-image-edit-lora", "z-image-lora",
           "your-loras")
GB = 1e9


def pipeline_bytes(hub_id: str) -> int:
    from danceopd.memory_plan import pipeline_components

    return sum(c.floats for c in pipeline_components(hub_id).values()) * 2


def lora_bytes(hub_id: str, base: str) -> int | None:
    """A published LoRA repository's size; None for one whose layout is not known (the recipes' placeholders)."""
    from danceopd.memory_plan import pipeline_components
    from danceopd.models.published import lora_parameter_count
    from danceopd.testing.tiny_hub import LORA_LAYOUTS

    layout = LORA_LAYOUTS.get(hub_id)
    if layout is None:
        return None
    return lora_parameter_count(pipeline_components(base)["transformer"].module, layout.rank, layout.targets) * 4


def main() -> int:
    from danceopd.models.hub import is_hub_id
    from danceopd.prefetch import settings_of, sources_in

    rows = {}
    for recipe in RECIPES:
        parts, unknown = {}, []
        for s in sources_in(settings_of(ROOT / "configs" / f"{recipe}.yaml")):
            if not is_hub_id(s.source):  # a local file (your-loras' adapters): nothing to download
                continue
            n = pipeline_bytes(s.source) if s.kind == "pipeline" else lora_bytes(s.source, s.base) if s.kind == "lora" else None
            if n is None:
                unknown.append(s.source)
            else:
                parts[s.source] = n
        total = sum(parts.values())
        rows[recipe] = {"gb": round(total / GB, 1), "minutes_at_1_gb_per_s": round(total / GB / 60, 1),
                        "models": {k: round(v / GB, 2) for k, v in parts.items()}, "not_counted": unknown}
    print(f"{'recipe':<22} {'download (GB)':>13} {'at 1 GB/s':>10}  models")
    for recipe, r in rows.items():
        models = ", ".join(f"{k} {v:g}" for k, v in r["models"].items())
        extra = f"; not counted: {', '.join(r['not_counted'])}" if r["not_counted"] else ""
        print(f"{recipe:<22} {r['gb']:>13.1f} {r['minutes_at_1_gb_per_s']:>8.1f} min  {models}{extra}")
    out = ROOT / "benchmarks" / "results" / "prefetch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
