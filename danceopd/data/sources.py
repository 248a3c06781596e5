"""Data sources the way LoRA trainers keep data: caption folders, edit folders, Hugging Face datasets, manifests.

`data.sources: [{path, route, kind, columns, split}]`, each feeding the route it names (a manifest's or a dataset's
rows may name their own routes instead). Every source becomes manifest rows (uid, route, prompt, source_image,
target_image) and goes through the manifest's own validation (danceopd.data.manifest.validate_records), once, in the
driver, before any model loads; workers reuse the validated rows.

kinds (`auto` picks by what the path is):
- `captions`: a folder of images (png, jpg, jpeg, webp, bmp; subfolders too) with a same-name `.txt` caption beside
  each (ai-toolkit, SimpleTuner `textfile`, musubi `image_directory`): text-to-image rows, the image the row's target;
  uid = the image's path in the folder without its suffix.
- `edit_folder`: `source/NAME.<img>` with its instruction in `source/NAME.txt`, and optionally the edited result in
  `target/NAME.<img>`: edit rows; uid = NAME (its path under source/).
- `dataset`: a Hugging Face dataset: a folder written by `save_to_disk`, a folder of Parquet / Arrow files, or a hub
  dataset id (`split`, default train). `columns` maps the row fields to dataset columns ({prompt: caption,
  source_image: input_image, ...}); unmapped fields use a column of their own name when there is one. Image columns
  may hold paths (relative to the dataset folder) or images (datasets' Image feature: bytes, read undecoded); images
  are written once, content-addressed, to `image_dir` and used as files.
- `manifest`: the JSONL / Parquet manifest (`data.manifest: F` is the shorthand for one such source).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from danceopd.data.manifest import (IMAGE_COLUMNS, HeaderIndex, Manifest, ManifestBucket, ManifestError, ManifestRow, _problem,
                                    _read_records, validate_records)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FIELDS = ("uid", "route", "prompt", "source_image", "target_image")
KINDS = ("captions", "edit_folder", "dataset", "manifest")


class DataSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a folder, a manifest file, or a Hugging Face hub dataset id")
    route: str | None = Field(None, description="the route this source's rows feed (a manifest's or dataset's rows may name it)")
    kind: Literal["auto", "captions", "edit_folder", "dataset", "manifest"] = Field("auto",
            description="auto (from what the path holds), captions (image + same-name .txt), edit_folder (source/, "
                        "target/), dataset (Hugging Face) or manifest")
    columns: dict[str, str] = Field(default_factory=dict, description="dataset only: row field -> dataset column, e.g. "
                                    "{prompt: caption, source_image: input_image}")
    split: str = Field("train", description="dataset only: the split to read")

    @field_validator("columns")
    @classmethod
    def _fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown fields {unknown}: the fields are {list(FIELDS)}")
        return v


def resolve_kind(source: DataSource) -> str:
    if source.kind != "auto":
        return source.kind
    p = Path(source.path).expanduser()
    if p.is_file():
        return "manifest"
    if p.is_dir():
        if any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")) or \
                any(p.glob("*.parquet")) or any(p.glob("*.arrow")):
            return "dataset"
        if (p / "source").is_dir():
            return "edit_folder"
        return "captions"
    if "/" in source.path and not source.path.startswith((".", "/", "~")):
        return "dataset"  # a hub id
    raise ValueError(f"{source.path} does not exist (a folder, a manifest file, or a hub dataset id)")


def load_source(source: DataSource, key: str, routes: list[str], image_size: tuple[int, int] | None,
                image_dir: Path, buckets: list[tuple[int, int]] | None = None, index: HeaderIndex | None = None,
                validate_images_below: int | None = None) -> Manifest:
    """One source's validated rows. `key` names it in errors (data.sources.<i>); the rest as validate_records."""
    checks = dict(buckets=buckets, index=index, validate_images_below=validate_images_below)
    rows_file = _rows_file(source, resolve_kind(source), routes, image_size, buckets, validate_images_below, index)
    if rows_file is not None and rows_file.exists():
        try:
            return read_rows(rows_file, Path(source.path), buckets)
        except Exception:  # a torn or foreign file: validate again and overwrite it
            pass
    manifest = _load_source(source, key, routes, image_size, image_dir, checks)
    if rows_file is not None and validate_images_below is not None and len(manifest) + len(manifest.skipped) >= validate_images_below:
        write_rows(rows_file, manifest)  # a large source only: a small one has every image checked at every start
    return manifest


def _load_source(source: DataSource, key: str, routes: list[str], image_size: tuple[int, int] | None, image_dir: Path,
                 checks: dict) -> Manifest:
    kind = resolve_kind(source)
    path = Path(source.path).expanduser().absolute()
    if kind == "manifest":
        if not path.is_file():
            raise ValueError(f"{key}.path: manifest file {source.path} does not exist")
        records, problems = _read_records(path)
        if source.route is not None:  # the source's route for rows that name none
            records = [(n, {"route": source.route, **r} if isinstance(r, dict) and "route" not in r and "task" not in r else r)
                       for n, r in records]
        return validate_records(path, path.parent, records, problems, routes, image_size, **checks)
    if kind in ("captions", "edit_folder"):
        if source.route is None:
            raise ValueError(f"{key}.route: a {kind} source feeds one route: name it")
        if not path.is_dir():
            raise ValueError(f"{key}.path: folder {source.path} does not exist")
        records, problems = (_caption_records if kind == "captions" else _edit_records)(path, source.route)
        return validate_records(path, path, records, problems, routes, image_size, **checks)
    records, folder = _dataset_records(source, key, image_dir)
    return validate_records(Path(source.path), folder, records, [], routes, image_size, **checks)


ROWS_FORMAT = 1  # bump when validation or the row table changes: older tables are then ignored


def _rows_file(source: DataSource, kind: str, routes: list[str], image_size, buckets, validate_images_below,
               index: HeaderIndex | None) -> Path | None:
    """Where a large dataset's or manifest's validated rows are kept for later starts (beside the header index): named by a
    digest of everything validation depends on (the source's settings, the run's routes, image size and buckets, and each
    data file's size and mtime). None for folders (listing them costs what validating does) and hub datasets."""
    if index is None or index.file is None or kind not in ("dataset", "manifest"):
        return None
    p = Path(source.path).expanduser()
    if kind == "manifest":
        files = [p] if p.is_file() else []
    else:
        top = list(p.iterdir()) if p.is_dir() else []  # the data files sit at the top, or one split folder down (never the images)
        files = sorted(f for d in [p, *(d for d in top if d.is_dir() and (d / "state.json").exists())] for f in d.iterdir()
                       if f.is_file() and f.suffix in (".parquet", ".arrow", ".json"))
    if not files:
        return None
    stats = [(str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    key = json.dumps([ROWS_FORMAT, source.model_dump(), kind, sorted(routes), image_size, buckets, validate_images_below, stats],
                     default=str)
    return index.file.parent / "data-rows" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.parquet"


def remember_rows(file: Path, manifest: Manifest, routes: list[str], image_size, buckets, validate_images_below,
                  index: HeaderIndex | None) -> None:
    """Keep a manifest's rows, validated by the driver, as the validated rows of `file` (the manifest they were written
    to): the Ray workers that validate `file` again reuse them instead of re-checking every image (a million rows each),
    and a large source's rows set aside at start stay aside."""
    rows_file = _rows_file(DataSource(path=str(file), kind="manifest"), "manifest", routes, image_size, buckets,
                           validate_images_below, index)
    if rows_file is not None:
        write_rows(rows_file, manifest)


def write_rows(file: Path, manifest: Manifest) -> None:
    """A validated source's rows as a Parquet table (and the rows it set aside), written atomically."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = manifest.rows
    text = lambda v: None if v is None else str(v)  # noqa: E731
    table = pa.table({"uid": [r.uid for r in rows], "route": [r.route for r in rows], "prompt": [r.prompt for r in rows],
                      "source_image": [text(r.source_image) for r in rows], "target_image": [text(r.target_image) for r in rows],
                      "bucket_width": [None if r.bucket is None else r.bucket[0] for r in rows],
                      "bucket_height": [None if r.bucket is None else r.bucket[1] for r in rows]},
                     metadata={"skipped": json.dumps([str(e) for e in manifest.skipped])})
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_rows(file: Path, path: Path, buckets: list[tuple[int, int]] | None) -> Manifest:
    """The Manifest write_rows kept: no file is opened but this one (a million rows in seconds). Images removed since are
    found when drawn (skipped and counted, danceopd.data.routes)."""
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    t = table.to_pydict()
    rows = [ManifestRow(u, r, p, None if s is None else Path(s), None if g is None else Path(g), None if w is None else (w, h))
            for u, r, p, s, g, w, h in zip(t["uid"], t["route"], t["prompt"], t["source_image"], t["target_image"],
                                            t["bucket_width"], t["bucket_height"])]
    by_route: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_route.setdefault(r.route, []).append(r)
    manifest = Manifest(path, rows, {route: ManifestBucket(route, members) for route, members in by_route.items()}, buckets)
    skipped = json.loads((table.schema.metadata or {}).get(b"skipped", b"[]"))
    manifest.skipped = [ManifestError(m) for m in skipped]
    return manifest


def _images(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _caption(image: Path, folder: Path, number: int, what: str) -> tuple[str | None, ManifestError | None]:
    text = image.with_suffix(".txt")
    if not text.is_file():
        return None, _problem(folder, number, None, "prompt", f"image {image.relative_to(folder)} has no {what} file "
                              f"{text.relative_to(folder)} beside it: add one (an empty file is an unconditional prompt)")
    return text.read_text(encoding="utf-8").strip(), None


def _caption_records(folder: Path, route: str) -> tuple[list[tuple[int, Any]], list[ManifestError]]:
    records, problems = [], []
    images = _images(folder)
    if not images:
        problems.append(_problem(folder, None, None, None, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder"))
    for number, image in enumerate(images, start=1):
        prompt, problem = _caption(image, folder, number, "caption")
        if problem:
            problems.append(problem)
            continue
        records.append((number, {"uid": image.relative_to(folder).with_suffix("").as_posix(), "route": route, "prompt": prompt,
                                 "target_image": str(image)}))
    return records, problems


def _edit_records(folder: Path, route: str) -> tuple[list[tuple[int, Any]], list[ManifestError]]:
    records, problems = [], []
    sources = _images(folder / "source")
    if not sources:
        problems.append(_problem(folder, None, None, "source_image", "no images in source/: an edit folder holds "
                                 "source/NAME.<img> with source/NAME.txt (the instruction) and, optionally, target/NAME.<img>"))
    for number, image in enumerate(sources, start=1):
        prompt, problem = _caption(image, folder, number, "instruction")
        if problem:
            problems.append(problem)
            continue
        name = image.relative_to(folder / "source").with_suffix("")
        targets = [t for t in (folder / "target" / name).parent.glob(name.name + ".*") if t.suffix.lower() in IMAGE_SUFFIXES]
        row = {"uid": name.as_posix(), "route": route, "prompt": prompt, "source_image": str(image)}
        if targets:
            row["target_image"] = str(sorted(targets)[0])
        records.append((number, row))
    return records, problems


def _open_dataset(source: DataSource, key: str):
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the project
        raise ValueError(f"{key}: reading a dataset needs the `datasets` library (pip install datasets)") from None
    datasets.disable_progress_bars()
    p = Path(source.path).expanduser()
    try:
        if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise ValueError(f"{key}.split: no split {source.split!r} (splits: {sorted(ds)})")
                ds = ds[source.split]
            return ds, p.absolute()
        if p.is_dir():
            files = sorted(p.glob("*.parquet")) or sorted(p.glob("*.arrow"))
            builder = "parquet" if files and files[0].suffix == ".parquet" else "arrow"
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train"), p.absolute()
        return datasets.load_dataset(source.path, split=source.split), Path.cwd()
    except ValueError:
        raise
    except Exception as e:  # datasets raises many types for a missing or corrupt dataset
        raise ValueError(f"{key}.path: cannot read dataset {source.path} ({type(e).__name__}: {e})") from None


def _dataset_records(source: DataSource, key: str, image_dir: Path) -> tuple[list[tuple[int, Any]], Path]:
    import datasets

    ds, folder = _open_dataset(source, key)
    names = list(ds.column_names)
    mapping = {f: source.columns.get(f, f) for f in FIELDS if f in source.columns or f in names}
    for field, column in mapping.items():
        if column not in names:
            raise ValueError(f"{key}.columns.{field}: column {column!r} is not in the dataset (its columns: {names})")
    if "prompt" not in mapping:
        raise ValueError(f"{key}.columns.prompt: the dataset has no 'prompt' column: map one, e.g. columns: {{prompt: caption}} "
                         f"(its columns: {names})")
    if "route" not in mapping and source.route is None:
        raise ValueError(f"{key}.route: name the route this dataset feeds (or map a route column)")
    for field in IMAGE_COLUMNS:  # read images undecoded: bytes are written out once, never held in memory
        if field in mapping and isinstance(ds.features[mapping[field]], datasets.Image):
            ds = ds.cast_column(mapping[field], datasets.Image(decode=False))
    ds = ds.select_columns(sorted(set(mapping.values())))
    records, number = [], 0
    for batch in ds.iter(batch_size=10_000):  # columns of 10k rows at a time: a million rows read in seconds
        for i in range(len(batch[mapping["prompt"]])):
            number += 1
            row = {"uid": str(batch[mapping["uid"]][i]) if "uid" in mapping else f"{source.split}-{number - 1}",
                   "route": batch[mapping["route"]][i] if "route" in mapping else source.route, "prompt": batch[mapping["prompt"]][i]}
            for field in IMAGE_COLUMNS:
                if field in mapping and batch[mapping[field]][i] is not None:
                    row[field] = _image_file(batch[mapping[field]][i], folder, image_dir)
            records.append((number, row))
    return records, folder


def _image_file(value: Any, folder: Path, image_dir: Path) -> str:
    """A dataset cell as an image file: a path (relative to the dataset), or image bytes written content-addressed."""
    if isinstance(value, str):
        return os.path.join(folder, value)
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        return os.path.join(folder, value["path"])
    if isinstance(value, dict):
        data = value["bytes"]
        suffix = Path(value.get("path") or "").suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ".png"
    else:  # a decoded PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data, suffix = buf.getvalue(), ".png"
    file = image_dir / (hashlib.sha256(data).hexdigest()[:32] + suffix)
    if not file.exists():
        image_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(file.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(file)
    return str(file)


def merge(manifests: list[Manifest], name: str, sizes: list[tuple[int, int]] | None = None) -> Manifest:
    """One manifest of several sources' rows (a route's bucket holds every source's rows for it, in source order)."""
    rows = [r for m in manifests for r in m.rows]
    seen: dict[str, int] = {}
    for i, m in enumerate(manifests):
        for r in m.rows:
            if seen.setdefault(r.uid, i) != i:
                raise ValueError(f"data.sources.{i}: uid {r.uid!r} is also in data.sources.{seen[r.uid]}: uids must be unique "
                                 "across sources (give the rows uids, or rename the file)")
    by_route: dict[str, list] = {}
    for r in rows:
        by_route.setdefault(r.route, []).append(r)
    return Manifest(Path(name), rows, {route: ManifestBucket(route, members) for route, members in by_route.items()}, sizes)
