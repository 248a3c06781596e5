"""`danceopd prefetch --config C`: every model a config names, downloaded once into the shared Hugging Face cache.

On a cluster every worker and teacher replica loads its models from $HF_HOME. With one cache shared by the nodes
(a volume in docker-compose.yml, a PersistentVolumeClaim in KubeRay), prefetching once before the first job means no
pod downloads 20-35 GB at start-up, and gated models (SD3.5, FLUX.1-dev, Kontext-dev) need the token ($HF_TOKEN) only
here. A pipeline is fetched as diffusers loads it (`DiffusionPipeline.download`: the components model_index.json
names, safetensors only), a LoRA or CLIP model as its weights and configs; local folders are only measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from danceopd.remote import last_line


@dataclass(frozen=True)
class ModelSource:
    key: str  # the config key that names it, e.g. "routes.text.teacher.loras.0"
    source: str  # a hub id or a local path
    kind: str  # pipeline | lora | checkpoint | clip
    weight_name: str | None = None

    @property
    def local(self) -> bool:
        return self.source.startswith(("/", "./", "../", "~")) or Path(self.source).expanduser().exists()


def sources_of(path: str | Path, overrides: dict | None = None) -> list[ModelSource]:
    """The models a training config or a teachers file names, each once (first key wins), validated first."""
    from danceopd.config import read_yaml_mapping

    data = read_yaml_mapping(path)
    if isinstance(data.get("teachers"), list):
        from services.teachers.config import load_teachers_config

        return _unique(_teachers_file_sources(load_teachers_config(path)))
    from trainer.job import load_job_config

    return _unique(_job_sources(load_job_config(path, overrides)))


def _unique(sources: list[ModelSource]) -> list[ModelSource]:
    seen, out = set(), []
    for s in sources:
        if (s.source, s.kind, s.weight_name) not in seen:
            seen.add((s.source, s.kind, s.weight_name))
            out.append(s)
    return out


def _base_sources(key: str, base: str) -> list[ModelSource]:
    """A base: a pipeline, or a DanceOPD student folder (then its own base too)."""
    from danceopd.student import is_student_folder, read_student_config

    if is_student_folder(base):
        inner = read_student_config(base).base
        return [ModelSource(key, base, "student")] + (_base_sources(f"{key} (its base)", inner) if inner else [])
    return [ModelSource(key, base, "pipeline")]


def _spec_sources(key: str, base: str | None, checkpoint: str | None, loras) -> list[ModelSource]:
    out = _base_sources(f"{key}.base", base) if base else []
    if checkpoint:
        out.append(ModelSource(f"{key}.checkpoint", checkpoint, "checkpoint"))
    out += [ModelSource(f"{key}.loras.{i}", lora.path, "lora", lora.weight_name) for i, lora in enumerate(loras)]
    return out


def _job_sources(job) -> list[ModelSource]:
    out = _base_sources("student.base", job.student.base) if job.student.base else []
    if job.init_from is not None:
        out += _base_sources("init_from", str(job.init_from))
    for name, route in job.routes.items():
        spec = route.model_teacher
        if spec is not None:
            out += _spec_sources(f"routes.{name}.teacher", spec.base or job.student.base, spec.checkpoint, spec.loras)
    if job.eval.clip_model:
        out.append(ModelSource("eval.clip_model", job.eval.clip_model, "clip"))
    return out


def _teachers_file_sources(cfg) -> list[ModelSource]:
    out = []
    for i, t in enumerate(cfg.teachers):
        f = t.field
        if f.kind == "diffusers":
            out += _spec_sources(f"teachers.{i}.field", f.path, f.checkpoint, f.loras)
        elif f.kind == "adapter_bank":
            out += _spec_sources(f"teachers.{i}.field", f.path, f.checkpoint, [])
            for name, a in f.adapters.items():
                out += _spec_sources(f"teachers.{i}.field.adapters.{name}", None, None, a.loras)
    return out


def fetch(source: ModelSource) -> Path:
    """The folder (or file) holding the model: downloaded into the Hugging Face cache for a hub id (a no-op when it is
    there already), as it is for a local path."""
    if source.local:
        return Path(source.source).expanduser()
    from huggingface_hub import snapshot_download

    if source.kind == "pipeline":
        from diffusers import DiffusionPipeline

        return Path(DiffusionPipeline.download(source.source))
    patterns = {"lora": [source.weight_name] if source.weight_name else ["*.safetensors", "*.json"],
                "checkpoint": ["transformer/*", "*.json", "*.safetensors"],
                "clip": ["*.json", "*.txt", "*.safetensors", "*.model"]}[source.kind]
    return Path(snapshot_download(source.source, allow_patterns=patterns))


def size_of(path: Path) -> int:
    """Bytes on disk under `path` (the cache's snapshot links followed to their blobs)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def why(error: BaseException) -> str:
    """One line: why a model could not be fetched, and what to do about it."""
    name, text = type(error).__name__, str(error)
    if name == "GatedRepoError":
        return "the model is gated: accept its license on huggingface.co with your account and set HF_TOKEN"
    if name == "RepositoryNotFoundError":
        return "no such repository on the Hub (or it is private: set HF_TOKEN)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "not in the cache, and HF_HUB_OFFLINE forbids downloading it"
    if name in ("LocalEntryNotFoundError", "ConnectionError", "ConnectError", "ConnectTimeout", "Timeout") or "not fully cached" in text:
        return "the Hugging Face Hub cannot be reached from this machine, and the model is not in the cache"
    return f"{name}: {last_line(error)}"[:300]


def prefetch(sources: list[ModelSource], say=print) -> int:
    """Fetch each source; one line each with its size. Returns the number that could not be fetched (each named in
    one line on stderr)."""
    import sys

    import huggingface_hub.utils
    import transformers
    from diffusers.utils import logging as diffusers_logging

    for library in (diffusers_logging, huggingface_hub.utils.logging, transformers.utils.logging):
        library.set_verbosity_error()  # "Couldn't connect to the Hub ..." and the like: the one line below says it
    failed, total = 0, 0
    for s in sources:
        try:
            where = fetch(s)
        except Exception as e:  # hub errors come in many types; each becomes one line
            failed += 1
            print(f"error: cannot fetch {s.source} ({s.key}): {why(e)}", file=sys.stderr, flush=True)
            continue
        n = size_of(where)
        total += n
        say(f"  {s.key:<42} {s.source:<48} {human(n):>9}  {'local' if s.local else where}")
    say(f"{len(sources) - failed} of {len(sources)} models ready, {human(total)}")
    return failed
