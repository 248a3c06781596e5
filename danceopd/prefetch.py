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

from danceopd.models.hub import looks_local
from danceopd.remote import last_line


@dataclass(frozen=True)
class ModelSource:
    key: str  # the config key that names it, e.g. "routes.text.teacher.loras.0"
    source: str  # a hub id or a local path
    kind: str  # pipeline | lora | checkpoint | clip | student
    weight_name: str | None = None
    family: str | None = None  # a pipeline's family as the config gives it (a `family` key), when it does
    base: str | None = None  # the pipeline a LoRA or checkpoint applies to

    @property
    def local(self) -> bool:
        return looks_local(self.source)


def settings_of(paths, overrides: dict | None = None) -> dict:
    """A config's settings as written (files laid over each other, then the overrides), before validation."""
    from danceopd.config import apply_overrides, read_config_files

    return apply_overrides(read_config_files(paths), overrides)


def sources_of(paths, overrides: dict | None = None) -> list[ModelSource]:
    """The models a training config or a teachers file names, each once (first key wins), read from its settings as
    written: a hub id's family may come from the very cache this fills, so they are listed before the config is
    validated (`danceopd prefetch` validates it once they are there)."""
    return sources_in(settings_of(paths, overrides))


def sources_in(data: dict) -> list[ModelSource]:
    """The models named by a config's settings (a job config's student, init_from, route teachers and CLIP model, or a
    teachers file's teachers), each once."""
    if isinstance(data.get("teachers"), list):
        return _unique(_teachers_file_sources(data["teachers"]))
    return _unique(_job_sources(data))


def _unique(sources: list[ModelSource]) -> list[ModelSource]:
    seen, out = set(), []
    for s in sources:
        if (s.source, s.kind, s.weight_name) not in seen:
            seen.add((s.source, s.kind, s.weight_name))
            out.append(s)
    return out


def _base_sources(key: str, base: str, family: str | None = None) -> list[ModelSource]:
    """A base: a pipeline, or a DanceOPD student folder (then its own base too)."""
    from danceopd.student import is_student_folder, read_student_config

    if is_student_folder(base):
        inner = read_student_config(base)
        return [ModelSource(key, base, "student")] + (_base_sources(f"{key} (its base)", inner.base, inner.family) if inner.base else [])
    return [ModelSource(key, base, "pipeline", family=family)]


def _spec_sources(key: str, base: str | None, family: str | None, checkpoint: str | None, loras: list) -> list[ModelSource]:
    out = _base_sources(f"{key}.base", base, family) if base else []
    if checkpoint:
        out.append(ModelSource(f"{key}.checkpoint", checkpoint, "checkpoint", family=family, base=base))
    return out + _lora_sources(key, loras, base, family)


def _lora_sources(key: str, loras: list, base: str | None, family: str | None) -> list[ModelSource]:
    out = []
    for i, lora in enumerate(loras):
        lora = lora if isinstance(lora, dict) else {"path": lora}
        out.append(ModelSource(f"{key}.loras.{i}", str(lora["path"]), "lora", lora.get("weight_name"), family=family, base=base))
    return out


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _job_sources(data: dict) -> list[ModelSource]:
    student = _mapping(data.get("student"))
    base, family = student.get("base"), student.get("family")
    out = _base_sources("student.base", base, family) if base else []
    init = _mapping(student.get("lora")).get("init")
    if init:
        out.append(ModelSource("student.lora.init", str(init), "lora", family=family, base=base))
    if data.get("init_from"):
        out += _base_sources("init_from", str(data["init_from"]))
    for name, route in _mapping(data.get("routes")).items():
        teacher = _mapping(route).get("teacher", "suite")
        if teacher == "suite":
            continue
        teacher = {"base": teacher} if isinstance(teacher, str) else _mapping(teacher)
        t_base = teacher.get("base") or base
        t_family = teacher.get("family") or (family if t_base == base else None)  # the student's base: the student's family
        out += _spec_sources(f"routes.{name}.teacher", t_base, t_family, teacher.get("checkpoint"), teacher.get("loras") or [])
    clip = _mapping(data.get("eval")).get("clip_model")
    if clip:
        out.append(ModelSource("eval.clip_model", str(clip), "clip"))
    return out


def _teachers_file_sources(teachers: list) -> list[ModelSource]:
    out = []
    for i, t in enumerate(teachers):
        f = _mapping(_mapping(t).get("field"))
        if f.get("kind") in ("diffusers", "adapter_bank") and f.get("path"):
            out += _spec_sources(f"teachers.{i}.field", f["path"], f.get("family"), f.get("checkpoint"), f.get("loras") or [])
            for name, a in _mapping(f.get("adapters")).items():
                out += _lora_sources(f"teachers.{i}.field.adapters.{name}", _mapping(a).get("loras") or [], f["path"], f.get("family"))
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
