"""Prompt embeddings encoded once, before training, and read by hash: text encoders only where they are needed.

`student.text_embeddings` chooses where a run's prompts are encoded:

  precompute  one task on one device encodes every prompt of the run (data, held-out rows, "" for CFG) into this
              store before training; train workers and the teacher replicas the job deploys load no text encoder
              and look embeddings up by hash (T5-XXL alone is ~9 GiB of GPU memory per process in bf16)
  on_device   every process keeps its encoders on its device and encodes on a cache miss (any prompt works)
  cpu         the encoders stay in host memory; prompts are encoded there and the embeddings copied over

The store is content-addressed, so runs and teachers share it safely: an embedding's key is
sha256(encoder fingerprint, prompt), and the fingerprint is a hash of what the embedding depends on besides the
prompt: the family, the dtype, the token length and the bytes of every text-encoder and tokenizer file (a file in
a Hugging Face cache is named by its content hash already; other files are hashed once, and the digest kept in
`file-digests.json` by path, size and mtime so that later readers only stat them). Layout:

    <store>/<fingerprint[:16]>/encoder.json                     what the fingerprint covers
    <store>/<fingerprint[:16]>/shard-<hash>.safetensors         tensors "<key>/<i>": the family's embeddings of one prompt

Shards are written to a temporary name and renamed, so readers never see half a shard and concurrent writers
never clash; a reader that misses a key rescans the folder once (a shard may have been added since).

Families whose text encoder also reads the source image (Qwen-Image-Edit) would key on (prompt, image hash); the
families served today (SD3, FLUX.1, Kontext, FLUX.2 [klein], Z-Image) encode text only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from danceopd.models.base import Embeds, stack_rows
from danceopd.models.hub import file_digest

DIGESTS = "file-digests.json"
SHARD_BYTES = 512 * 1024 ** 2  # prompts per shard: as many as fit this size (SD3 ~190, FLUX ~125 at bf16)


class MissingEmbeddingError(KeyError):
    """A prompt the store does not hold, asked of a process without text encoders."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return self.args[0]


@dataclass(frozen=True)
class EncoderKey:
    """What a prompt's embedding depends on besides the prompt."""

    base: str  # the pipeline folder or hub id whose text encoders encode
    family: str
    dtype: str  # the encoders' dtype name (float32, bfloat16)
    max_sequence_length: int


def text_encoder_files(base: str) -> list[Path] | None:
    """Every file of the pipeline's text encoders and tokenizers (a local folder, or a hub id in the local cache)."""
    folder = Path(base).expanduser()
    if not folder.exists():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, local_files_only=True, allow_patterns=["text_encoder*/*", "tokenizer*/*",
                                                                                      "model_index.json"]))
        except Exception:  # not prefetched: the hub id (and the revision the cache would get) stands for the files
            return None
    return sorted(p for p in folder.glob("*/*") if p.is_file() and p.parent.name.startswith(("text_encoder", "tokenizer")))


def encoder_fingerprint(key: EncoderKey, digest_cache: Path | None = None) -> str:
    """sha256 of the family, dtype, token length and text-encoder/tokenizer file contents (see the module doc)."""
    known = _read_json(digest_cache) if digest_cache else {}
    before = dict(known)
    files = text_encoder_files(key.base)
    if files is None:
        contents = {"hub_id": key.base}
    else:
        root = files[0].parents[1] if files else Path(key.base)
        contents = {str(p.relative_to(root)): file_digest(p, known) for p in files}
    if digest_cache and known != before:
        _write_json(digest_cache, known)
    blob = json.dumps({"family": key.family, "dtype": key.dtype, "max_sequence_length": key.max_sequence_length,
                       "files": contents}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prompt_key(fingerprint: str, prompt: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{prompt}".encode()).hexdigest()[:40]


class EmbeddingStore:
    """A folder of prompt embeddings per encoder fingerprint (see the module doc)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self._index: dict[str, dict[str, Path]] = {}  # fingerprint -> key -> shard

    def folder(self, fingerprint: str) -> Path:
        return self.root / fingerprint[:16]

    def fingerprint(self, key: EncoderKey) -> str:
        return encoder_fingerprint(key, self.root / DIGESTS)

    def _scan(self, fingerprint: str) -> dict[str, Path]:
        from safetensors import safe_open

        index = self._index.setdefault(fingerprint, {})
        known = set(index.values())
        for shard in sorted(self.folder(fingerprint).glob("shard-*.safetensors")):
            if shard not in known:
                with safe_open(str(shard), "pt") as f:
                    for name in f.keys():
                        index[name.split("/")[0]] = shard
        return index

    def missing(self, fingerprint: str, prompts: Iterable[str]) -> list[str]:
        index = self._scan(fingerprint)
        return [p for p in dict.fromkeys(prompts) if prompt_key(fingerprint, p) not in index]

    def add(self, fingerprint: str, key: EncoderKey, prompts: Sequence[str], rows: Sequence[Embeds]) -> Path:
        """One shard holding `prompts`' embeddings (`rows[i]`: prompt i's tensors, without a batch axis; their lengths may
        differ, as Qwen-Image captions do)."""
        from safetensors.torch import save_file

        folder = self.folder(fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "encoder.json").exists():
            _write_json(folder / "encoder.json", {"fingerprint": fingerprint, **key.__dict__})
        keys = [prompt_key(fingerprint, p) for p in prompts]
        tensors = {f"{k}/{j}": t.detach().to("cpu").contiguous().clone() for k, row in zip(keys, rows) for j, t in enumerate(row)}
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"fingerprint": fingerprint, "prompts": str(len(keys))})
        shard = folder / f"shard-{name}.safetensors"
        os.replace(tmp, shard)
        return shard

    def lookup(self, fingerprint: str, prompts: Sequence[str]) -> Embeds:
        """The embeddings of `prompts` (batch first, on the CPU); MissingEmbeddingError names the first absent prompt."""
        from safetensors import safe_open

        index = self._index.get(fingerprint) or self._scan(fingerprint)
        keys = [prompt_key(fingerprint, p) for p in prompts]
        if any(k not in index for k in keys):
            index = self._scan(fingerprint)  # another writer may have added a shard since
        absent = [p for p, k in zip(prompts, keys) if k not in index]
        if absent:
            raise MissingEmbeddingError(
                f"prompt {absent[0]!r} ({len(set(absent))} absent in all) is not in the text-embedding store {self.folder(fingerprint)}, "
                "and this process holds no text encoder: encode the run's prompts first (student.text_embeddings: precompute "
                "does it before training), or use student.text_embeddings: on_device")
        rows: dict[str, list[torch.Tensor]] = {}
        by_shard: dict[Path, list[str]] = {}
        for k in dict.fromkeys(keys):
            by_shard.setdefault(index[k], []).append(k)
        for shard, ks in by_shard.items():
            with safe_open(str(shard), "pt") as f:
                names = set(f.keys())
                for k in ks:
                    rows[k] = [f.get_tensor(f"{k}/{j}") for j in range(sum(1 for n in names if n.startswith(k + "/")))]
        return stack_rows([tuple(rows[k]) for k in keys])


class StoreEncoder:
    """A PromptCache's encode function for a process without text encoders: reads the store."""

    def __init__(self, store: EmbeddingStore, key: EncoderKey):
        self.store, self.key = store, key
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.store.fingerprint(self.key)
        return self._fingerprint

    def __call__(self, prompts: list[str]) -> Embeds:
        return self.store.lookup(self.fingerprint, prompts)


@dataclass(frozen=True)
class TextEmbeddings:
    """How a process gets prompt embeddings: its mode, and the store (precompute)."""

    mode: str = "on_device"
    store: str | None = None

    def encoder(self, key: EncoderKey) -> StoreEncoder | None:
        return StoreEncoder(EmbeddingStore(self.store), key) if self.mode == "precompute" and self.store else None

    @property
    def loads_encoders(self) -> str | None:
        """Where the pipeline's text encoders go: 'device', 'cpu', or None (not loaded)."""
        return {"precompute": None, "cpu": "cpu"}.get(self.mode, "device")


def precompute(store_root: str | Path, keys: Sequence[EncoderKey], prompts: Sequence[str], device: str = "auto",
               log: Callable[[str], None] = lambda m: None) -> dict:
    """Encode every prompt the store lacks for each encoder key (pipelines loaded with their text encoders only, one
    after the other); returns per fingerprint what was found and encoded, with seconds and bytes."""
    from danceopd.models import get_family
    from danceopd.models.base import resolve_device, resolve_dtype

    store = EmbeddingStore(store_root)
    dev = resolve_device(device)
    prompts = list(dict.fromkeys(prompts))
    out: dict[str, dict] = {}
    for key in dict.fromkeys(keys):
        fp = store.fingerprint(key)
        if fp in out:  # another key with the same encoders, family and settings (a teacher on the student's base)
            continue
        todo = store.missing(fp, prompts)
        t0, nbytes = time.perf_counter(), 0
        if todo:
            family = get_family(key.family)
            pipe = family.load_text_encoders(key.base, dev, resolve_dtype(key.dtype, dev))
            rows: list[str] = []
            held: list[Embeds] = []
            for i, prompt in enumerate(todo):  # one at a time, as PromptCache does: the embeddings equal on_device's exactly
                with torch.no_grad():
                    embeds = tuple(t[0].to("cpu") for t in family.encode_prompts(pipe, [prompt], key.max_sequence_length))
                rows.append(prompt)
                held.append(embeds)
                size = sum(t.numel() * t.element_size() for t in embeds)
                nbytes += size
                if len(held) * size >= SHARD_BYTES or i == len(todo) - 1:
                    store.add(fp, key, rows, held)
                    rows, held = [], []
            del pipe
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        out[fp] = {"base": key.base, "family": key.family, "dtype": key.dtype, "max_sequence_length": key.max_sequence_length,
                   "prompts": len(prompts), "encoded": len(todo), "seconds": round(time.perf_counter() - t0, 2), "bytes": nbytes,
                   "folder": str(store.folder(fp))}
        log(f"text embeddings {fp[:16]} ({key.family}, {key.dtype}): {len(prompts) - len(todo)} stored, {len(todo)} encoded "
            f"in {out[fp]['seconds']:.1f} s")
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
