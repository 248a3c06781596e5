"""Where a model a config names lives on this machine: a local folder or file as given, or a hub id's snapshot in the
Hugging Face cache.

Every offline check (a base's family from its model_index.json, its VAE geometry, a LoRA's keys against the
transformer's modules, the memory plan's configs) reads files. For a local folder they are there; for a hub id they
are there once `danceopd prefetch` (or any earlier download) put the repository in the cache, in the standard layout
`$HF_HUB_CACHE/models--ORG--NAME/refs/main` (a commit id) + `snapshots/<commit>/` (the files). `local_dir` resolves both,
so the same checks run for `./models/flux` and for `black-forest-labs/FLUX.1-dev`. The cache location is read from
the environment at each call (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), as a new process of the
cluster would see it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

LOCAL_PREFIXES = ("/", "./", "../", "~")
# A repository id: ORG/NAME, each a letter or digit then letters, digits, '.', '_' and '-' (the Hub's own rule).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# What a repository name does not end with, but a file does: `loras/x.safetensors` is a missing file, not a hub id.
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".yaml", ".yml", ".jsonl", ".parquet",
                 ".png", ".jpg", ".jpeg", ".webp", ".txt", ".csv")


def looks_local(name: str) -> bool:
    """A name written as a path (absolute, ./, ../ or ~), or one that exists relative to the working directory."""
    return name.startswith(LOCAL_PREFIXES) or Path(name).expanduser().exists()


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a Hugging Face repository id (ORG/NAME) rather than a local path."""
    return not looks_local(name) and HUB_ID.match(name) is not None and ".." not in name \
        and not name.lower().endswith(FILE_SUFFIXES)


def check_model_name(name: str, what: str) -> str:
    """`name` unless it is neither an existing local path nor a plausible hub id: then a ValueError saying which."""
    if looks_local(name):
        if not Path(name).expanduser().exists():
            raise ValueError(f"{what} {name} does not exist")
        return name
    if not is_hub_id(name):
        raise ValueError(f"{what} {name!r} is not a local path (no such file or folder under {Path.cwd()}) and not a hub id "
                         "(ORG/NAME): give a path that exists, starting with ./ or / to be explicit, or a repository id")
    return name


def absolute_if_local(path: str | None) -> str | None:
    """A local path made absolute (Ray workers and Serve replicas run in other working directories); hub ids as given."""
    if path is None or not looks_local(path):
        return path
    return str(Path(path).expanduser().resolve())


def hub_cache() -> Path:
    """The Hugging Face cache as a process started now would use it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of a hub repository (its files, as far as they were downloaded), or None."""
    if not is_hub_id(repo_id):
        return None
    repo = hub_cache() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def local_dir(name: str | Path | None) -> Path | None:
    """Where the model `name` is on this machine: the local path itself (when it exists), a hub id's cached snapshot, or
    None (a hub id not in the cache, a missing path)."""
    if name is None:
        return None
    p = Path(name).expanduser()
    if looks_local(str(name)):
        return p if p.exists() else None
    return cached_snapshot(str(name))


def where(name: str) -> str:
    """How to say where a model was looked for, in an error message."""
    return f"{name} (Hugging Face cache {hub_cache()})" if is_hub_id(name) else str(name)


def file_digest(path: Path, known: dict | None = None) -> str:
    """sha256 of a file's contents: a Hugging Face cache blob's name, a digest in `known` for the same path, size and
    mtime, else read and hashed (and recorded in `known`)."""
    known = {} if known is None else known
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs":  # a Hugging Face cache: the blob's name is its content hash
        return real.name
    st = real.stat()
    cached = known.get(str(real))
    if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
        return cached[2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(16 * 1024 ** 2):
            h.update(chunk)
    known[str(real)] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return h.hexdigest()
