"""An offline Hugging Face cache of tiny random models under the real hub ids: what the shipped recipes name, runnable on
a CPU with no hub.

    danceopd tiny-hub --config configs/sd35-medium-lora.yaml --config configs/flux-kontext-lora.yaml --out runs/tiny-hub
    export HF_HOME=runs/tiny-hub HF_HUB_OFFLINE=1     # DiffusionPipeline.from_pretrained("black-forest-labs/FLUX.1-dev") ...

Every model a config names by hub id (student and teacher bases, checkpoints, LoRA repositories, a CLIP model) is written
into `<out>/hub` in the standard cache layout, `models--ORG--NAME/refs/main` (a commit id) + `snapshots/<commit>/`, so
diffusers, huggingface_hub and this project resolve it as they would a downloaded repository. Each tiny pipeline has the
real repository's pipeline class and components (TINY_PIPELINES says where it differs); pipelines of one latent space
share one VAE (its weights too), as the real ones do, while their transformers differ. LoRA repositories hold their
adapter under the file name and in the format the real repository has (LORA_LAYOUTS); an id this module does not know
(the recipes' `your-org/...` placeholders) gets a diffusers-layout LoRA for its base. Local paths are left alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_SIZE = 64  # px: the tiny VAEs scale by 2, so 64 px is a 32 x 32 latent (FLUX.2 [klein] takes edit sources from 64 px)
VERSION = "1"  # part of every snapshot's commit id: a change to the builders writes new snapshots


@dataclass(frozen=True)
class TinyPipeline:
    tiny: str  # danceopd.testing.tiny.build_tiny_pipeline's family key
    pipeline_class: str  # the real repository's model_index.json _class_name (the tiny one has the same)
    differs: str  # how the tiny stand-in's components differ from the real repository's, beyond their sizes
    source: str  # where the real layout comes from


_TOKENIZERS = "tokenizers are offline Unigram / byte vocabularies"
_QUOTED = "its model_index.json as quoted in public code (found with the search tool, 2026-12)"
TINY_PIPELINES = {
    "stabilityai/stable-diffusion-3.5-medium": TinyPipeline(
        "sd3.5", "StableDiffusion3Pipeline", f"none (CLIP-L, CLIP-G, T5 + tokenizers; MMDiT-X: dual attention, RMS q/k norm); "
        f"{_TOKENIZERS}", f"{_QUOTED}; transformer config in danceopd.models.published"),
    "stabilityai/stable-diffusion-3.5-large": TinyPipeline(
        "sd3.5", "StableDiffusion3Pipeline", f"its transformer has no dual attention (the tiny one has Medium's); {_TOKENIZERS}",
        "the same pipeline class and components as Medium"),
    "black-forest-labs/FLUX.1-dev": TinyPipeline(
        "flux", "FluxPipeline", f"none (CLIP-L, T5, guidance embedding); {_TOKENIZERS}",
        "FluxPipeline's components in diffusers 0.42; transformer config in danceopd.models.published"),
    "black-forest-labs/FLUX.1-Kontext-dev": TinyPipeline(
        "flux-kontext", "FluxKontextPipeline", f"none (FLUX.1-dev's components); {_TOKENIZERS}",
        "FluxKontextPipeline's components in diffusers 0.42"),
    "black-forest-labs/FLUX.2-dev": TinyPipeline(
        "flux2", "Flux2Pipeline", "tokenizer: danceopd.models.processors.TextOnlyPixtralProcessor in place of PixtralProcessor "
        "(needs torchvision); the text encoder a Mistral3ForConditionalGeneration as there", f"{_QUOTED}: tokenizer PixtralProcessor"),
    "black-forest-labs/FLUX.2-klein-base-4B": TinyPipeline(
        "flux2-klein", "Flux2KleinPipeline", "tokenizer: PreTrainedTokenizerFast in place of Qwen2TokenizerFast",
        f"{_QUOTED}: Qwen3ForCausalLM, Qwen2TokenizerFast, is_distilled (false for the base)"),
    "Qwen/Qwen-Image": TinyPipeline(
        "qwen-image", "QwenImagePipeline", "tokenizer: PreTrainedTokenizerFast in place of Qwen2Tokenizer",
        "QwenImagePipeline's components in diffusers 0.42"),
    "Qwen/Qwen-Image-Edit": TinyPipeline(
        "qwen-image-edit", "QwenImageEditPipeline", "processor: danceopd.models.processors.ImageOnlyQwen2VLProcessor in place "
        "of Qwen2VLProcessor (its video processor needs torchvision); tokenizer: PreTrainedTokenizerFast",
        "QwenImageEditPipeline's components in diffusers 0.42"),
    "Qwen/Qwen-Image-Edit-2509": TinyPipeline(
        "qwen-image-edit-plus", "QwenImageEditPlusPipeline", "processor: danceopd.models.processors.ImageOnlyQwen2VLProcessor in "
        "place of Qwen2VLProcessor (its video processor needs torchvision); tokenizer: PreTrainedTokenizerFast",
        "Qwen-Image-Edit-2511's model_index.json (the same pipeline) as quoted in public code: processor Qwen2VLProcessor"),
    "Tongyi-MAI/Z-Image": TinyPipeline(
        "z-image", "ZImagePipeline", "tokenizer: PreTrainedTokenizerFast in place of Qwen2Tokenizer",
        "Z-Image-Turbo's model_index.json as quoted in public code: Qwen3Model, Qwen2Tokenizer"),
    "Tongyi-MAI/Z-Image-Turbo": TinyPipeline(
        "z-image", "ZImagePipeline", "tokenizer: PreTrainedTokenizerFast in place of Qwen2Tokenizer", _QUOTED),
}
# A family's tiny pipeline, for a hub id this module does not know but whose config gives `family`
FAMILY_TINY = {"sd3": "sd3.5", "flux": "flux", "flux-kontext": "flux-kontext", "flux2": "flux2", "flux2-klein": "flux2-klein",
               "z-image": "z-image", "qwen-image": "qwen-image", "qwen-image-edit": "qwen-image-edit",
               "qwen-image-edit-plus": "qwen-image-edit-plus"}
# One VAE per latent space (the families' latent_space tags), so that teachers and students of a space share it
VAE_SEEDS = {"sd3": 1003, "flux": 1013, "flux2": 1023, "qwen-image": 1033, "z-image": 1043}


@dataclass(frozen=True)
class LoraLayout:
    file: str  # the adapter's file name in the repository
    format: str  # "peft" (adapter_config.json + base_model.model.* keys) or "diffusers" (transformer.* keys)
    rank: int
    alpha: float
    targets: tuple[str, ...] | None  # module-name suffixes; None: the family's default LoRA targets
    source: str


# Flow-GRPO's SD3.5-Medium LoRAs: PEFT adapters (loaded with PeftModel.from_pretrained(pipe.transformer, repo) in their
# README and evaluation code); r 32, lora_alpha 64, gaussian init, the attention projections (yifan123/flow_grpo, train_sd3.py).
_FLOW_GRPO = LoraLayout("adapter_model.safetensors", "peft", 32, 64.0,
                        ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
                         "attn.to_q", "attn.to_v"), "yifan123/flow_grpo (README, train_sd3.py LoraConfig)")
LORA_LAYOUTS = {f"jieliu/SD3.5M-FlowGRPO-{task}": _FLOW_GRPO for task in ("Text", "GenEval", "PickScore")}
DEFAULT_LORA = LoraLayout("pytorch_lora_weights.safetensors", "diffusers", 4, 4.0, None,
                          "diffusers' save_lora_weights default (placeholder ids such as your-org/...)")


DELTA_STD = 0.15


def commit_id(repo_id: str, sample_size: int = SAMPLE_SIZE) -> str:
    return hashlib.sha1(f"{repo_id}|tiny-hub {VERSION}|{sample_size}".encode()).hexdigest()


def snapshot_dir(home: Path, repo_id: str) -> Path:
    return home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit_id(repo_id)


def _publish(home: Path, repo_id: str, write) -> tuple[Path, bool]:
    """Write a repository's files with `write(folder)` into its snapshot (unless it is there already) and point
    refs/main at it. Returns (the snapshot folder, whether it was written now)."""
    snapshot = snapshot_dir(home, repo_id)
    repo = snapshot.parents[1]
    done = repo / ".danceopd-tiny-hub"
    if done.is_file() and done.read_text() == snapshot.name and snapshot.is_dir():
        return snapshot, False
    shutil.rmtree(snapshot, ignore_errors=True)
    snapshot.mkdir(parents=True)
    write(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    done.write_text(snapshot.name)
    return snapshot, True


def _seed(repo_id: str) -> int:
    return int(hashlib.sha256(repo_id.encode()).hexdigest()[:6], 16) % 100_000


def pipeline_for(repo_id: str, family: str | None) -> TinyPipeline:
    """The tiny pipeline standing in for a hub id: the known repositories', else the config's family's."""
    if repo_id in TINY_PIPELINES:
        return TINY_PIPELINES[repo_id]
    if family in FAMILY_TINY:
        from danceopd.models import get_family

        return TinyPipeline(FAMILY_TINY[family], get_family(family).pipeline_classes[0], "a family default (unknown repository)",
                            f"the config's family: {family}")
    raise ValueError(f"{repo_id}: no tiny stand-in is known for this hub id; set its family in the config "
                     f"({sorted(FAMILY_TINY)}) and a tiny pipeline of that family is written")


def write_pipeline(home: Path, repo_id: str, family: str | None = None) -> tuple[Path, bool]:
    from danceopd.testing.tiny import build_tiny_pipeline

    spec = pipeline_for(repo_id, family)

    def write(folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_pipeline(spec.tiny, tmp, seed=_seed(repo_id), sample_size=SAMPLE_SIZE, vae_seed=_vae_seed(spec))
        for item in tmp.iterdir():
            item.rename(folder / item.name)
        tmp.rmdir()
        written = json.loads((folder / "model_index.json").read_text())["_class_name"]
        if written != spec.pipeline_class:
            raise RuntimeError(f"{repo_id}: the tiny {spec.tiny} pipeline is a {written}, the repository's is {spec.pipeline_class}")

    return _publish(home, repo_id, write)


def _vae_seed(spec: TinyPipeline) -> int:
    from danceopd.models import FAMILIES

    space = next(f.latent_space for f in FAMILIES.values() if spec.pipeline_class in f.pipeline_classes)
    return VAE_SEEDS[space]


def random_lora_state(transformer: torch.nn.Module, rank: int, targets: tuple[str, ...], seed: int, std: float = 0.05) -> dict:
    """Random LoRA matrices (both A and B drawn, so the adapter changes the model) for every linear layer whose name is
    a target or ends with '.' + target (peft's rule), keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * std
            out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * std
    if not out:
        raise ValueError(f"no linear layer of {type(transformer).__name__} matches the LoRA targets {list(targets)}")
    return out


def write_lora(home: Path, repo_id: str, base_dir: Path, base_id: str, weight_name: str | None = None) -> tuple[Path, bool]:
    """A LoRA repository for the transformer of `base_dir` (the tiny base), in the real repository's layout."""
    from safetensors.torch import save_file

    from danceopd.models import family_of_folder
    from danceopd.models.base import component_config
    from danceopd.models.published import random_component

    layout = LORA_LAYOUTS.get(repo_id, DEFAULT_LORA)
    family = family_of_folder(base_dir)
    targets = layout.targets or family.default_lora_targets
    file = weight_name or layout.file

    def write(folder: Path) -> None:
        config = component_config(base_dir, "transformer")
        transformer = random_component("diffusers", config["_class_name"], config, "cpu", torch.float32)
        # the update (alpha / r) B A has entries of std ~DELTA_STD: a capability that moves the tiny model's velocity by a
        # few percent (measured: ~1% of its mean square on the tiny SD3.5), as a fine-tune does
        std = (DELTA_STD / (layout.rank ** 0.5 * layout.alpha / layout.rank)) ** 0.5
        state = random_lora_state(transformer, layout.rank, targets, seed=_seed(repo_id), std=std)
        if layout.format == "peft":
            save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(folder / file))
            (folder / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "base_model_name_or_path": base_id, "r": layout.rank, "lora_alpha": layout.alpha,
                "target_modules": list(targets), "init_lora_weights": "gaussian", "lora_dropout": 0.0, "bias": "none",
                "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "task_type": None, "modules_to_save": None},
                indent=2))
        else:
            save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(folder / file))

    return _publish(home, repo_id, write)


def write_clip(home: Path, repo_id: str) -> tuple[Path, bool]:
    from danceopd.testing.tiny import build_tiny_clip

    return _publish(home, repo_id, lambda folder: build_tiny_clip(folder, seed=_seed(repo_id)))


def build_tiny_hub(sources, home: str | Path, say=print) -> list[tuple[str, str, Path]]:
    """Write a tiny model for every hub id among `sources` (danceopd.prefetch.ModelSource) into the cache at `home`/hub:
    pipelines first, then what applies to them (LoRAs, checkpoints). Returns (hub id, kind, snapshot) per model."""
    from danceopd.models.hub import is_hub_id

    home = Path(home).expanduser().resolve()
    hub = [s for s in sources if is_hub_id(s.source)]
    done: dict[str, Path] = {}
    out = []

    def record(s, result):
        folder, fresh = result
        done[s.source] = folder
        out.append((s.source, s.kind, folder))
        say(f"  {s.source:<52} {s.kind:<10} {'written' if fresh else 'present':<8} {folder}")

    for s in hub:
        if s.kind == "pipeline" and s.source not in done:
            record(s, write_pipeline(home, s.source, s.family))
    for s in hub:
        if s.source in done:
            continue
        if s.kind in ("lora", "checkpoint"):
            base_dir = done.get(s.base) if s.base else None
            if base_dir is None:
                from danceopd.models.hub import local_dir

                base_dir = local_dir(s.base) if s.base else None
            if base_dir is None:
                raise ValueError(f"{s.key}: {s.source} applies to {s.base!r}, which is neither a local folder nor a hub id of the "
                                 "config: give the teacher a base")
            if s.kind == "lora":
                record(s, write_lora(home, s.source, base_dir, s.base, s.weight_name))
            else:  # a fine-tuned checkpoint: a pipeline of the base's kind with other transformer weights
                record(s, write_pipeline(home, s.source, s.family or _family_name(base_dir)))
        elif s.kind == "clip":
            record(s, write_clip(home, s.source))
    return out


def _family_name(folder: Path) -> str:
    from danceopd.models import family_of_folder

    return family_of_folder(folder).name
