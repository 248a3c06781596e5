"""Dataset manifest: the conditions of each training route's bucket, read from files, for real diffusers models.

A manifest is JSONL (one JSON object per line) or Parquet; every row is one condition of one route:

    {"uid": "e7", "route": "local_edit", "prompt": "make the cup red", "source_image": "images/e7.png"}

`task` is accepted as an alias of `route` (exactly one of them per row). Image paths are relative to the
manifest's folder unless absolute. The whole file is validated at load (schema, duplicate uids, known routes,
image headers and sizes), so that a bad row fails before any model loads, not hours into a run; sampling is
a pure function of (bucket, n, seed), like the suite's buckets, so a retried or resumed worker draws the same
rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from danceopd.data.buckets import cover_crop, draw_bucket, nearest_bucket

COLUMNS = ("uid", "route", "task", "prompt", "source_image", "target_image")
IMAGE_COLUMNS = ("source_image", "target_image")
_MAX_LISTED = 20  # problems spelled out in one ManifestError; the rest are counted


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names file, 1-based row, uid and column, and the fix.

    When several rows are wrong, one error lists them all (`problems` holds one ManifestError per problem;
    `row`, `uid` and `column` are those of the first), so a large manifest is fixed in one pass.
    """

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None, uid: str | None = None,
                 column: str | None = None, problems: Sequence[ManifestError] = ()):
        super().__init__(message)
        self.path, self.row, self.uid, self.column = path, row, uid, column
        self.problems: list[ManifestError] = list(problems) or [self]


def _problem(path: Path, row: int | None, uid: str | None, column: str | None, text: str) -> ManifestError:
    where = str(path)
    if row is not None:
        where += f" row {row}"
    if uid is not None:
        where += f" (uid {uid!r})"
    message = f"{where}: {column}: {text}" if column else f"{where}: {text}"
    return ManifestError(message, path=str(path), row=row, uid=uid, column=column)


def _combine(path: Path, problems: list[ManifestError]) -> ManifestError:
    if len(problems) == 1:
        return problems[0]
    lines = [str(p) for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"... and {len(problems) - _MAX_LISTED} more")
    first = problems[0]
    return ManifestError(f"{path}: {len(problems)} problems:\n  " + "\n  ".join(lines), path=str(path), row=first.row,
                         uid=first.uid, column=first.column, problems=problems)


@dataclass(frozen=True)
class ManifestRow:
    """One condition: a prompt ("" = unconditional) and, for edit routes, the source image (absolute path)."""

    uid: str
    route: str
    prompt: str
    source_image: Path | None = None
    target_image: Path | None = None
    bucket: tuple[int, int] | None = None  # (width, height) of its aspect-ratio bucket (data.buckets), from its image


class _RowSchema(BaseModel):
    # strict: a numeric uid or a null prompt is a mistake in the file, not something to coerce silently
    model_config = ConfigDict(extra="forbid", strict=True)
    uid: str = Field(min_length=1)
    route: str | None = Field(None, min_length=1)
    task: str | None = Field(None, min_length=1)
    prompt: str
    source_image: str | None = Field(None, min_length=1)
    target_image: str | None = Field(None, min_length=1)


def _schema_problems(path: Path, row: int, uid: str | None, err: ValidationError) -> list[ManifestError]:
    out = []
    for e in err.errors():
        column = str(e["loc"][0]) if e["loc"] else None
        if e["type"] == "missing":
            text = "required column is missing" + (" (use \"\" for an unconditional prompt)" if column == "prompt" else "")
        elif e["type"] == "extra_forbidden":
            text = "unknown column: the columns are uid, route (or its alias task), prompt, source_image, target_image"
        else:
            text = f"{e['msg']} (got {e['input']!r})"
        out.append(_problem(path, row, uid, column, text))
    return out


class ManifestBucket:
    """The rows of one route: what that route's training batches and evaluation sets are drawn from.

    With aspect-ratio buckets (rows with a `bucket`), a draw first picks one bucket (by its share of the route's rows;
    `shares` for prompt-only routes, which the Manifest sets from all its images) and then rows of that bucket only."""

    def __init__(self, route: str, rows: Sequence[ManifestRow], shares: dict[tuple[int, int], float] | None = None):
        if not rows:
            raise ValueError(f"route {route!r} has no rows")
        self.route, self.rows = route, list(rows)
        self.by_size: dict[tuple[int, int], list[int]] = {}
        free = []  # rows without an image (prompt only): drawn at whatever bucket their batch has
        for i, r in enumerate(self.rows):
            if r.bucket is not None:
                self.by_size.setdefault(r.bucket, []).append(i)
            else:
                free.append(i)
        bucketed = len(self.rows) - len(free)
        self._own_shares = {b: len(ix) / bucketed for b, ix in self.by_size.items()} if bucketed else None
        if self.by_size and free:
            self.by_size = {b: ix + free for b, ix in self.by_size.items()}
        self.shares = shares  # prompt-only rows under buckets: the run's image shares

    @property
    def takes_source(self) -> bool:
        """Whether the route is an edit route (every row has a source image; mixed buckets fail at load)."""
        return all(r.source_image is not None for r in self.rows)

    def size_shares(self) -> dict[tuple[int, int], float] | None:
        """Each aspect-ratio bucket's share of this route's draws; None without buckets."""
        return self._own_shares or self.shares  # by the route's images (rows without one join every bucket), else the run's

    def sample_sized(self, n: int, seed: int) -> tuple[list[ManifestRow], tuple[int, int] | None]:
        """(n rows drawn with replacement, their bucket): one bucket per draw; a pure function of (bucket, n, seed) so
        retries redraw the same rows. Without buckets the bucket is None and the rows those of `sample`."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(seed)
        shares = self.size_shares()
        if shares is None:
            return [self.rows[int(i)] for i in rng.integers(0, len(self.rows), n)], None
        size = draw_bucket(shares, rng)
        pool = self.by_size.get(size) if self.by_size else None
        if pool is None:  # prompt-only rows: any row, at the drawn size
            return [self.rows[int(i)] for i in rng.integers(0, len(self.rows), n)], size
        return [self.rows[pool[int(i)]] for i in rng.integers(0, len(pool), n)], size

    def sample(self, n: int, seed: int) -> list[ManifestRow]:
        """n rows drawn with replacement (one bucket's, with buckets); a pure function of (bucket, n, seed)."""
        return self.sample_sized(n, seed)[0]

    def evaluation_set(self, n: int, seed: int = 12345) -> list[ManifestRow]:
        """A fixed evaluation set: distinct rows first (a seeded permutation, cycled when n > len(rows))."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        perm = np.random.default_rng(seed).permutation(len(self.rows))
        return [self.rows[int(perm[i % len(perm)])] for i in range(n)]

    def evaluation_sets(self, n: int, seed: int = 12345) -> dict[tuple[int, int] | None, list[ManifestRow]]:
        """{bucket: a fixed evaluation set of n rows of it}, the largest bucket first; {None: evaluation_set} without
        buckets. Prompt-only rows are evaluated at every bucket of the run's shares."""
        shares = self.size_shares()
        if shares is None:
            return {None: self.evaluation_set(n, seed)}
        order = sorted(shares, key=lambda b: (-shares[b], b))
        if not self.by_size:
            rows = self.evaluation_set(n, seed)
            return {b: rows for b in order}
        return {b: ManifestBucket(self.route, [self.rows[i] for i in self.by_size[b]]).evaluation_set(n, seed) for b in order}

    def held_out(self, fraction: float) -> tuple["ManifestBucket", "ManifestBucket"]:
        """(training rows, held-out rows): round(fraction x rows), at least one, are held out for evaluation. The
        choice is a pure function of the uids (the lowest SHA-1 of each uid), not of any seed: every run, worker and
        resume of a manifest holds out the same rows. Raises ValueError when no row would be left to train on."""
        n = len(self.rows)
        k = max(1, round(fraction * n))
        if k >= n:
            raise ValueError(f"route {self.route!r} has {n} row{'s' if n != 1 else ''}: holding out {k} for evaluation leaves "
                             f"none to train on; add rows, lower data.eval_fraction, or give data.eval_manifest")
        rank = sorted(range(n), key=lambda i: hashlib.sha1(f"danceopd-held-out:{self.rows[i].uid}".encode()).hexdigest())
        held = set(rank[:k])
        return (ManifestBucket(self.route, [r for i, r in enumerate(self.rows) if i not in held], self.shares),
                ManifestBucket(self.route, [r for i, r in enumerate(self.rows) if i in held], self.shares))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"ManifestBucket({self.route!r}, {len(self.rows)} rows, takes_source={self.takes_source})"


class Manifest:
    """A validated manifest: its rows in file order, grouped into one bucket per route. With aspect-ratio buckets,
    prompt-only routes draw their sizes by the shares of all the manifest's images (uniform over `sizes` when none)."""

    def __init__(self, path: Path, rows: list[ManifestRow], buckets: dict[str, ManifestBucket],
                 sizes: list[tuple[int, int]] | None = None):
        self.path, self.rows, self._buckets, self.sizes = path, rows, buckets, sizes
        self.skipped: list[ManifestError] = []  # rows set aside: unreadable images of a large source (validate_records)
        if sizes:
            counts = {b: 0 for b in sizes}
            for r in rows:
                if r.bucket is not None:
                    counts[r.bucket] += 1
            total = sum(counts.values())
            shares = {b: c / total for b, c in counts.items() if c} if total else {b: 1 / len(sizes) for b in sizes}
            for b in buckets.values():
                b.shares = shares

    def routes(self) -> list[str]:
        return sorted(self._buckets)

    def bucket(self, route: str) -> ManifestBucket:
        if route not in self._buckets:
            raise _problem(self.path, None, None, "route",
                           f"no rows for route {route!r}: the manifest has routes {self.routes()}; add rows for it "
                           f"or train that route from another source")
        return self._buckets[route]

    def held_out(self, fraction: float) -> tuple["Manifest", "Manifest"]:
        """(training manifest, evaluation manifest): each route's bucket split by ManifestBucket.held_out."""
        parts = {route: b.held_out(fraction) for route, b in self._buckets.items()}
        train = {r: t for r, (t, _) in parts.items()}
        held = {r: e for r, (_, e) in parts.items()}
        return (Manifest(self.path, [r for b in train.values() for r in b.rows], train, self.sizes),
                Manifest(self.path, [r for b in held.values() for r in b.rows], held, self.sizes))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Manifest({str(self.path)!r}, {len(self.rows)} rows, routes={self.routes()})"


def _read_records(path: Path) -> tuple[list[tuple[int, Any]], list[ManifestError]]:
    """(row number, raw record) pairs; JSONL row numbers are line numbers (blank lines are skipped)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise _problem(path, None, None, None, "reading Parquet needs pyarrow (pip install pyarrow), "
                                                   "or convert the manifest to .jsonl") from None
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise _problem(path, None, None, None, f"not a readable Parquet file ({e})") from None
        return list(enumerate(records, start=1)), []
    if suffix not in (".jsonl", ".ndjson"):
        raise _problem(path, None, None, None, "unsupported manifest format: use .jsonl (one JSON object per line) or .parquet")
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(_problem(path, number, None, None,
                                         f"invalid JSON ({e.msg} at character {e.colno}): each line must be one JSON object"))
    return records, problems


def load_manifest(path: str | os.PathLike, routes: Iterable[str] | None = None,
                  image_size: tuple[int, int] | None = None, buckets: list[tuple[int, int]] | None = None,
                  index: "HeaderIndex | None" = None, validate_images_below: int | None = None) -> Manifest:
    """Read and validate every row of a manifest.

    routes: the run's route names; a row of any other route is an error (a typo would otherwise train nothing).
    image_size: (width, height) every image must have, or buckets: the aspect-ratio buckets images go to (any size).
    Image checks read headers only (through `index`, which keeps them for later starts), so a large dataset validates
    in seconds; see validate_records for `validate_images_below`.
    """
    path = Path(path)
    if isinstance(routes, str):
        raise TypeError("routes must be an iterable of route names, not a single string")
    if not path.is_file():
        raise _problem(path, None, None, None, "manifest file does not exist")
    records, problems = _read_records(path)
    return validate_records(path, path.absolute().parent, records, problems, routes, image_size, buckets, index,
                            validate_images_below)


def validate_records(path: Path, folder: Path, records: list[tuple[int, Any]], problems: list[ManifestError],
                     routes: Iterable[str] | None = None, image_size: tuple[int, int] | None = None,
                     buckets: list[tuple[int, int]] | None = None, index: "HeaderIndex | None" = None,
                     validate_images_below: int | None = None) -> Manifest:
    """Manifest rows from raw records (row number, dict with the manifest's columns), every one checked: schema,
    duplicate uids, known routes, image headers and sizes, edit routes all with sources. `path` names the source in
    errors; relative image paths are relative to `folder`. Data sources (danceopd.data.sources) produce such records.

    With `buckets`, images may have any size: each row gets the bucket nearest its image's aspect ratio. A source of
    `validate_images_below` rows or more has its images checked only where buckets need their sizes, and a row whose
    image cannot be read then is set aside (`Manifest.skipped`) instead of failing the source."""
    known = None if routes is None else set(routes)
    shown_folder = f"{path.parent}/" if folder == path.absolute().parent else f"{folder}/"
    index = index if index is not None else HeaderIndex(None)
    large = validate_images_below is not None and len(records) >= validate_images_below
    read_headers = buckets is not None or not large
    folder_text = str(folder)
    bucket_of: dict[tuple[int, int], tuple[int, int]] = {}  # image size -> its bucket (sizes repeat)
    rows: list[ManifestRow] = []
    skipped: list[ManifestError] = []
    first_row_of_uid: dict[str, int] = {}
    row_numbers: dict[str, int] = {}

    for number, raw in records:
        if not isinstance(raw, dict):
            problems.append(_problem(path, number, None, None, f"expected a JSON object, got {type(raw).__name__}"))
            continue
        uid = raw.get("uid") if isinstance(raw.get("uid"), str) and raw.get("uid") else None
        try:
            rec = _RowSchema.model_validate(raw)
        except ValidationError as e:
            problems.extend(_schema_problems(path, number, uid, e))
            continue
        ok = True
        if rec.uid in first_row_of_uid:
            problems.append(_problem(path, number, uid, "uid",
                                     f"duplicate uid (first used at row {first_row_of_uid[rec.uid]}): uids must be unique"))
            ok = False
        else:
            first_row_of_uid[rec.uid] = number
        if (rec.route is None) == (rec.task is None):
            given = "both route and task are given" if rec.route is not None else "neither route nor task is given"
            problems.append(_problem(path, number, uid, "route", f"{given}: give exactly one (task is an alias of route)"))
            continue
        column, route = ("route", rec.route) if rec.route is not None else ("task", rec.task)
        if known is not None and route not in known:
            problems.append(_problem(path, number, uid, column,
                                     f"unknown route {route!r}: the known routes are {sorted(known)}; fix the row or add the route"))
            ok = False
        images: dict[str, Path | None] = {}
        sizes: dict[str, tuple[int, int]] = {}
        for col in IMAGE_COLUMNS:
            value = getattr(rec, col)
            if value is None:
                images[col] = None
                continue
            name = value if os.path.isabs(value) else os.path.join(folder_text, value)  # str joins: a million rows in seconds
            images[col] = Path(name)
            if not read_headers:
                continue
            size = index.size(name)
            if isinstance(size, str):
                hint = "" if os.path.isabs(value) else f" (paths are relative to {shown_folder})"
                (skipped if large else problems).append(_problem(path, number, uid, col, f"file {value} {size}{hint}"))
                ok = False
            elif buckets is None and image_size is not None and tuple(size) != tuple(image_size):
                problems.append(_problem(path, number, uid, col,
                                         f"file {value} is {size[0]}x{size[1]} (width x height) but the run expects "
                                         f"{image_size[0]}x{image_size[1]}: resize the image, change the image size, or "
                                         f"train on aspect-ratio buckets (data.buckets: auto)"))
                ok = False
            else:
                sizes[col] = size
        if ok:
            shape_from = sizes.get("source_image") or sizes.get("target_image")
            bucket = None
            if buckets and shape_from:
                if shape_from not in bucket_of:
                    bucket_of[shape_from] = nearest_bucket(*shape_from, buckets)
                bucket = bucket_of[shape_from]
            rows.append(ManifestRow(rec.uid, route, rec.prompt, images["source_image"], images["target_image"], bucket))
            row_numbers[rec.uid] = number
    index.save()

    if not records and not problems:
        problems.append(_problem(path, None, None, None, "the manifest has no rows: add at least one"))
    by_route: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_route.setdefault(r.route, []).append(r)
    for route, members in by_route.items():
        with_source = [r for r in members if r.source_image is not None]
        if with_source and len(with_source) < len(members):
            missing = next(r for r in members if r.source_image is None)
            problems.append(_problem(path, row_numbers[missing.uid], missing.uid, "source_image",
                                     f"route {route!r} mixes rows with and without a source image (row "
                                     f"{row_numbers[with_source[0].uid]} has one): give every row of an edit route a "
                                     f"source image, or move this row to another route"))
    if problems:
        problems.sort(key=lambda p: (p.row is None, p.row or 0))
        raise _combine(path, problems)
    manifest = Manifest(path, rows, {route: ManifestBucket(route, members) for route, members in by_route.items()}, buckets)
    manifest.skipped = skipped
    return manifest


class HeaderIndex:
    """Image sizes read from their headers once, kept in a Parquet file (path, bytes, mtime_ns, width, height, error)
    that later starts and the workers reuse: an entry holds while its file's byte size and mtime are unchanged, so a
    million-image dataset is indexed once (headers only, no pixel decode) and later starts only stat its files.
    file None: in memory only."""

    def __init__(self, file: str | os.PathLike | None):
        self.file = None if file is None else Path(file)
        self.entries: dict[str, tuple[int, int, tuple[int, int] | str]] = {}
        self.read = self.reused = 0  # headers read this time; entries taken from the file
        self._changed, self._loaded = False, False

    def _load(self) -> None:
        """Read the file on first use: a start whose rows come validated (danceopd.data.sources) never needs it."""
        self._loaded = True
        if self.file is not None and self.file.exists():
            try:
                import pyarrow.parquet as pq

                t = pq.read_table(self.file).to_pydict()
                for p, b, m, w, h, err in zip(t["path"], t["bytes"], t["mtime_ns"], t["width"], t["height"], t["error"]):
                    self.entries[p] = (b, m, err if err is not None else (w, h))
            except Exception:  # a torn or foreign file: index again and overwrite it
                self.entries = {}

    def size(self, file: str | Path) -> tuple[int, int] | str:
        """(width, height) of an image, or why it cannot be used."""
        if not self._loaded:
            self._load()
        key = str(file)
        try:
            st = os.stat(key)
        except FileNotFoundError:
            return "does not exist"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        entry = self.entries.get(key)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            self.reused += 1
            return entry[2]
        value = _image_header(Path(file), st)
        self.read += 1
        self.entries[key] = (st.st_size, st.st_mtime_ns, value)
        self._changed = True
        return value

    def save(self) -> None:
        """Write the index (when anything was read), atomically: workers that share it never read half a file."""
        if self.file is None or not self._changed:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = list(self.entries)
        vals = [self.entries[k] for k in keys]
        table = pa.table({"path": keys, "bytes": [v[0] for v in vals], "mtime_ns": [v[1] for v in vals],
                          "width": [None if isinstance(v[2], str) else v[2][0] for v in vals],
                          "height": [None if isinstance(v[2], str) else v[2][1] for v in vals],
                          "error": [v[2] if isinstance(v[2], str) else None for v in vals]})
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=f".{self.file.name}.", suffix=".tmp")
        except OSError as e:  # a cache, not a result: where output_dir cannot be written (a laptop planning a cluster's
            import logging  # recipe, /shared/...), the sizes are simply read again next time

            logging.getLogger("danceopd.data").info(f"image-size index not kept: {self.file.parent}: {e.strerror}")
            return
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._changed = False


def _image_header(file: Path, st: os.stat_result) -> tuple[int, int] | str:
    """The image's (width, height) from its header only (no pixel decode), or why it cannot be read; `st`: its stat."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a file"
    try:
        with Image.open(file) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        return f"is not a readable image ({type(e).__name__}: {e})"


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image as `[3, H, W]` float32 in [-1, 1], RGB (the range diffusers VAEs take).

    size: (width, height); an image of another size is resized (bicubic) to cover it and centre-cropped to it
    (danceopd.data.buckets.cover_crop; an image of the same aspect ratio is only resized).
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != tuple(size):
            resized, box = cover_crop(im.size[0], im.size[1], tuple(size))
            im = im.resize(resized, Image.Resampling.BICUBIC).crop(box)
        array = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class LatentCache:
    """Per-image latents, so each image is encoded once by the VAE however often its row is drawn.

    encode: `images[B, 3, H, W]` (CPU float32 in [-1, 1]) -> `latents[B, ...]`; moving to its device is its job.
    size: (width, height) images are loaded at (see `load_image`).
    directory: when given, every latent is also saved there as `<sha1 of the file bytes>.pt` and read back by a
    later cache, so a restarted worker does not re-encode. Use one directory per encoder and size: the file
    records the size (a mismatch is re-encoded) but cannot tell two encoders apart.
    In memory, latents are keyed by the file's resolved path, byte size and mtime: an edited file is re-encoded.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], size: tuple[int, int] | None = None,
                 directory: str | os.PathLike | None = None, max_entries: int = 4096):
        self.encode, self.size = encode, None if size is None else tuple(size)
        self.max_entries = max_entries  # bounded: a large dataset's latents never all sit in memory
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()  # least recently used first
        self.encoded = 0  # images actually passed to `encode`
        self.loaded = 0  # latents read back from `directory`

    def get(self, items: Iterable[ManifestRow | str | os.PathLike], column: str = "source_image") -> torch.Tensor:
        """Stacked latents of `items` (rows, whose `column` image is used, or image paths), in order. A row with an
        aspect-ratio bucket is loaded at its bucket's size, anything else at `size`.

        Images not cached yet are encoded in one batched call (one per distinct image shape).
        """
        items = list(items)
        files = [self._file(item, column) for item in items]
        if not files:
            raise ValueError("LatentCache.get needs at least one row or path")
        sizes = [item.bucket if isinstance(item, ManifestRow) and item.bucket is not None else self.size for item in items]
        keys = [(*self._key(f), size) for f, size in zip(files, sizes)]
        todo: dict[tuple, tuple[Path, str | None]] = {}
        for f, key in zip(files, keys):
            if key in self._memory or key in todo:
                continue
            digest = None
            if self.directory is not None:
                digest = hashlib.sha1(f.read_bytes()).hexdigest()
                latent = self._load(digest, key[-1])
                if latent is not None:
                    self._memory[key] = latent
                    self.loaded += 1
                    continue
            todo[key] = (f, digest)
        if todo:
            self._encode(todo)
        out = torch.stack([self._memory[k] for k in keys])
        for k in keys:
            self._memory.move_to_end(k)
        while len(self._memory) > self.max_entries:  # only after this call's latents are stacked
            self._memory.popitem(last=False)
        return out

    def _file(self, item: ManifestRow | str | os.PathLike, column: str) -> Path:
        if isinstance(item, ManifestRow):
            if column not in IMAGE_COLUMNS:
                raise ValueError(f"column must be one of {list(IMAGE_COLUMNS)}, got {column!r}")
            file = getattr(item, column)
            if file is None:
                raise ValueError(f"row {item.uid!r} (route {item.route!r}) has no {column}")
            return Path(file)
        return Path(item)

    @staticmethod
    def _key(file: Path) -> tuple[str, int, int]:
        resolved = file.resolve()
        st = resolved.stat()
        return str(resolved), st.st_size, st.st_mtime_ns

    def _encode(self, todo: dict[tuple, tuple[Path, str | None]]) -> None:
        images = {key: load_image(f, key[-1]) for key, (f, _) in todo.items()}
        groups: dict[tuple[int, ...], list[tuple]] = {}
        for key, image in images.items():
            groups.setdefault(tuple(image.shape), []).append(key)
        for group in groups.values():
            with torch.no_grad():
                latents = self.encode(torch.stack([images[k] for k in group]))
            if latents.shape[0] != len(group):
                raise ValueError(f"encode returned a batch of {latents.shape[0]} latents for {len(group)} images")
            self.encoded += len(group)
            for key, latent in zip(group, latents):
                latent = latent.detach().cpu().clone()  # clone: do not keep (or save) the whole batch's storage
                self._memory[key] = latent
                digest = todo[key][1]
                if digest is not None:
                    self._save(digest, latent, key[-1])

    def _path(self, digest: str, size: tuple[int, int] | None) -> Path:
        suffix = "" if size == self.size or size is None else f"-{size[0]}x{size[1]}"  # a bucket's latents beside the others
        return self.directory / f"{digest}{suffix}.pt"

    def _load(self, digest: str, size: tuple[int, int] | None) -> torch.Tensor | None:
        file = self._path(digest, size)
        if not file.exists():
            return None
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file: re-encode and overwrite it
            return None
        if not isinstance(saved, dict) or "latent" not in saved:
            return None
        if saved.get("size") != (None if size is None else list(size)):
            return None
        return saved["latent"]

    def _save(self, digest: str, latent: torch.Tensor, size: tuple[int, int] | None) -> None:
        # write-then-rename: workers sharing the directory never read a half-written file
        target = self._path(digest, size)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{digest}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"latent": latent, "size": None if size is None else list(size)}, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
