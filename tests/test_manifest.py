"""Dataset manifests: every bad row fails at load with file, row, uid and column named; sampling is pure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from danceopd.data import LatentCache, ManifestError, ManifestRow, load_image, load_manifest

ROUTES = ("t2i", "local_edit")


def _png(path: Path, size=(16, 16), colour=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _records(n_t2i: int = 6, n_edit: int = 4) -> list[dict]:
    rows = [{"uid": f"t{i}", "route": "t2i", "prompt": f"prompt {i}"} for i in range(n_t2i)]
    rows += [{"uid": f"e{i}", "task": "local_edit", "prompt": f"edit {i}", "source_image": f"images/e{i}.png",
              "target_image": f"images/e{i}_out.png"} for i in range(n_edit)]
    return rows


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    for i in range(4):
        _png(d / "images" / f"e{i}.png", colour=(i * 60, 10, 200))
        _png(d / "images" / f"e{i}_out.png", colour=(10, i * 60, 20))
    return d


def _error(path: Path, **kwargs) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    return info.value


def test_loads_routes_buckets_and_paths(data_dir: Path):
    m = load_manifest(_write(data_dir / "m.jsonl", _records()), routes=ROUTES, image_size=(16, 16))
    assert m.routes() == ["local_edit", "t2i"] and len(m.rows) == 10
    edit, t2i = m.bucket("local_edit"), m.bucket("t2i")
    assert edit.takes_source and not t2i.takes_source
    row = edit.rows[0]
    assert isinstance(row, ManifestRow) and row.route == "local_edit"  # the `task` alias becomes the route
    assert row.source_image == (data_dir / "images" / "e0.png").absolute() and row.source_image.is_absolute()
    assert t2i.rows[0].source_image is None and t2i.rows[0].target_image is None
    with pytest.raises(ManifestError, match="realism"):
        m.bucket("realism")


def test_unconditional_prompt_and_absolute_paths(data_dir: Path, tmp_path: Path):
    outside = _png(tmp_path / "elsewhere" / "x.png")
    m = load_manifest(_write(data_dir / "m.jsonl", [{"uid": "u", "route": "uncond", "prompt": ""},
                                                    {"uid": "a", "route": "edit", "prompt": "p", "source_image": str(outside)}]))
    assert m.bucket("uncond").rows[0].prompt == ""
    assert m.bucket("edit").rows[0].source_image == outside


def test_sampling_is_deterministic_and_reaches_every_row(data_dir: Path):
    bucket = load_manifest(_write(data_dir / "m.jsonl", _records()), routes=ROUTES).bucket("t2i")
    assert bucket.sample(32, seed=7) == bucket.sample(32, seed=7)
    assert bucket.sample(32, seed=7) != bucket.sample(32, seed=8)
    drawn = bucket.sample(600, seed=1)
    counts = {r.uid: sum(d.uid == r.uid for d in drawn) for r in bucket.rows}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # 100 expected each
    # a reloaded manifest draws the same rows: sampling depends on (bucket, n, seed) only
    again = load_manifest(data_dir / "m.jsonl", routes=ROUTES).bucket("t2i")
    assert [r.uid for r in again.sample(32, seed=7)] == [r.uid for r in bucket.sample(32, seed=7)]


def test_evaluation_set_takes_distinct_rows_first(data_dir: Path):
    bucket = load_manifest(_write(data_dir / "m.jsonl", _records()), routes=ROUTES).bucket("t2i")
    first = bucket.evaluation_set(6, seed=3)
    assert len({r.uid for r in first}) == 6
    assert bucket.evaluation_set(6, seed=3) == first
    assert bucket.evaluation_set(13, seed=3) == first + first + first[:1]
    assert [r.uid for r in bucket.evaluation_set(6, seed=4)] != [r.uid for r in first]


def _check(err: ManifestError, row: int, uid: str | None, column: str | None, *words: str) -> None:
    msg = str(err)
    assert f"row {row}" in msg, msg
    assert err.row == row
    if uid is not None:
        assert f"uid {uid!r}" in msg and err.uid == uid, msg
    if column is not None:
        assert f"{column}:" in msg and err.column == column, msg
    for w in words:
        assert w in msg, msg


def test_missing_image_names_row_uid_column_and_folder(data_dir: Path):
    records = _records()
    records[7]["source_image"] = "images/missing.png"
    err = _error(_write(data_dir / "edits.jsonl", records))
    _check(err, 8, "e1", "source_image", "images/missing.png does not exist", "relative to", "data/")


def test_unreadable_image(data_dir: Path):
    (data_dir / "images" / "broken.png").write_bytes(b"not a png")
    records = _records()
    records[6]["target_image"] = "images/broken.png"
    _check(_error(_write(data_dir / "m.jsonl", records)), 7, "e0", "target_image", "not a readable image")


def test_wrong_image_size_says_expected_and_actual(data_dir: Path):
    _png(data_dir / "images" / "big.png", size=(32, 24))
    records = _records()
    records[8]["source_image"] = "images/big.png"
    err = _error(_write(data_dir / "m.jsonl", records), image_size=(16, 16))
    _check(err, 9, "e2", "source_image", "32x24", "16x16")


def test_unknown_route_lists_the_known_routes(data_dir: Path):
    records = _records()
    records[2]["route"] = "t2j"
    _check(_error(_write(data_dir / "m.jsonl", records), routes=ROUTES), 3, "t2", "route", "'t2j'", "local_edit", "t2i")
    records = _records()
    records[6]["task"] = "edit"
    _check(_error(_write(data_dir / "m.jsonl", records), routes=ROUTES), 7, "e0", "task", "'edit'")


def test_duplicate_uid(data_dir: Path):
    records = _records()
    records[4]["uid"] = "t1"
    _check(_error(_write(data_dir / "m.jsonl", records)), 5, "t1", "uid", "duplicate", "row 2")


def test_unknown_column(data_dir: Path):
    records = _records()
    records[3]["negative_prompt"] = "blurry"
    _check(_error(_write(data_dir / "m.jsonl", records)), 4, "t3", "negative_prompt", "unknown column")


def test_missing_prompt(data_dir: Path):
    records = _records()
    del records[5]["prompt"]
    _check(_error(_write(data_dir / "m.jsonl", records)), 6, "t5", "prompt", "missing")


def test_wrongly_typed_value(data_dir: Path):
    records = _records()
    records[1]["prompt"] = None
    _check(_error(_write(data_dir / "m.jsonl", records)), 2, "t1", "prompt", "string")


def test_bad_json_line(data_dir: Path):
    records: list = _records()
    records[2] = '{"uid": "t2", "route": "t2i", "prompt": "x"'
    _check(_error(_write(data_dir / "m.jsonl", records)), 3, None, None, "invalid JSON")
    records[2] = '["a list"]'
    _check(_error(_write(data_dir / "m.jsonl", records)), 3, None, None, "JSON object")


def test_mixed_source_presence_in_one_route(data_dir: Path):
    records = _records()
    del records[8]["source_image"]
    err = _error(_write(data_dir / "m.jsonl", records))
    _check(err, 9, "e2", "source_image", "'local_edit'", "row 7")


def test_route_and_task_exactly_one(data_dir: Path):
    records = _records()
    records[0]["task"] = "t2i"
    _check(_error(_write(data_dir / "m.jsonl", records)), 1, "t0", "route", "both route and task")
    records = _records()
    del records[0]["route"]
    _check(_error(_write(data_dir / "m.jsonl", records)), 1, "t0", "route", "neither")


def test_every_problem_is_reported_at_once(data_dir: Path):
    records = _records()
    records[1]["route"] = "nope"
    records[7]["source_image"] = "images/missing.png"
    err = _error(_write(data_dir / "m.jsonl", records), routes=ROUTES)
    assert len(err.problems) == 2 and "2 problems" in str(err)
    assert [p.row for p in err.problems] == [2, 8] and err.row == 2
    assert "'nope'" in str(err) and "missing.png" in str(err)


def test_empty_and_absent_manifests(tmp_path: Path):
    with pytest.raises(ManifestError, match="no rows"):
        load_manifest(_write(tmp_path / "empty.jsonl", []))
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "absent.jsonl")
    (tmp_path / "m.csv").write_text("uid,route,prompt\n")
    with pytest.raises(ManifestError, match="jsonl"):
        load_manifest(tmp_path / "m.csv")


def test_image_checks_read_headers_only(data_dir: Path, monkeypatch):
    """Validation of a large dataset must not decode every image."""
    def no_decode(self, *args, **kwargs):
        raise AssertionError("load_manifest decoded pixels")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    load_manifest(_write(data_dir / "m.jsonl", _records()), image_size=(16, 16))


def test_parquet_round_trip(data_dir: Path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed: Parquet manifests are optional")
    import pyarrow as pa

    records = _records()
    cols = ["uid", "route", "task", "prompt", "source_image", "target_image"]
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in records])
    pq.write_table(table, data_dir / "m.parquet")
    from_parquet = load_manifest(data_dir / "m.parquet", routes=ROUTES, image_size=(16, 16))
    from_jsonl = load_manifest(_write(data_dir / "m.jsonl", records), routes=ROUTES, image_size=(16, 16))
    assert from_parquet.rows == from_jsonl.rows
    assert from_parquet.bucket("t2i").sample(8, seed=2) == from_jsonl.bucket("t2i").sample(8, seed=2)

    records[3]["source_image"] = "images/missing.png"  # only some t2i rows: also a mixed bucket, reported after
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in records]), data_dir / "bad.parquet")
    err = _error(data_dir / "bad.parquet")
    assert err.problems[0].row == 4 and err.problems[0].uid == "t3" and err.problems[0].column == "source_image"


def test_load_image_range_and_layout(tmp_path: Path):
    path = _png(tmp_path / "a.png", size=(20, 10), colour=(255, 0, 127))
    x = load_image(path)
    assert x.shape == (3, 10, 20) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 127 / 127.5 - 1]))
    Image.new("L", (8, 8), 0).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png", size=(4, 6)).shape == (3, 6, 4)


class _Encoder:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.shape[0])
        return images[:, :, ::4, ::4] * 2  # a stand-in VAE: [B, 3, H/4, W/4]


def test_latent_cache_encodes_each_image_once(data_dir: Path):
    bucket = load_manifest(_write(data_dir / "m.jsonl", _records()), routes=ROUTES).bucket("local_edit")
    encoder = _Encoder()
    cache = LatentCache(encoder)
    first = cache.get(bucket.rows[:3] + bucket.rows[:1])
    assert first.shape == (4, 3, 4, 4) and cache.encoded == 3 and encoder.calls == [3]
    assert torch.equal(first[0], first[3])
    second = cache.get(bucket.rows)
    assert cache.encoded == 4 and encoder.calls == [3, 1]  # only the new image
    assert torch.equal(second[:3], first[:3])
    assert torch.equal(second[0], load_image(bucket.rows[0].source_image)[:, ::4, ::4] * 2)
    targets = cache.get(bucket.rows[:2], column="target_image")
    assert cache.encoded == 6 and not torch.equal(targets[0], second[0])
    # a plain path is the same image as the row's
    cache.get([str(bucket.rows[0].source_image)])
    assert cache.encoded == 6


def test_latent_cache_is_bounded_and_keeps_the_recently_used(data_dir: Path, tmp_path: Path):
    """data.latent_cache_entries: at most that many latents in memory, least recently used out first; with a folder
    an evicted latent comes back from disk, not from the VAE."""
    bucket = load_manifest(_write(data_dir / "m.jsonl", _records()), routes=ROUTES).bucket("local_edit")
    rows = bucket.rows[:4]
    cache = LatentCache(_Encoder(), max_entries=2)
    whole = cache.get(rows)  # one call may need more than the bound: all its latents are returned
    assert whole.shape[0] == 4 and len(cache._memory) == 2 and cache.encoded == 4
    cache.get(rows[2:3])  # rows 2 and 3 are the ones kept; 2 is now the most recent
    assert cache.encoded == 4
    cache.get(rows[:1])  # row 0 was evicted: encoded again, and row 3 (least recent) goes
    assert cache.encoded == 5 and len(cache._memory) == 2
    cache.get(rows[2:3])
    assert cache.encoded == 5
    on_disk = LatentCache(_Encoder(), directory=tmp_path / "latents", max_entries=1)
    first = on_disk.get(rows)
    assert torch.equal(on_disk.get(rows[:1])[0], first[0]) and on_disk.encoded == 4 and on_disk.loaded == 1


def test_latent_cache_reencodes_an_edited_file(tmp_path: Path):
    path = _png(tmp_path / "a.png", colour=(0, 0, 0))
    cache = LatentCache(_Encoder())
    before = cache.get([path])
    _png(path, size=(16, 16), colour=(255, 255, 255))
    os.utime(path, ns=(1, 10**18))  # a new mtime even on coarse-clock file systems
    after = cache.get([path])
    assert cache.encoded == 2 and not torch.equal(before, after)


def test_latent_cache_reloads_from_its_directory(data_dir: Path, tmp_path: Path):
    bucket = load_manifest(_write(data_dir / "m.jsonl", _records()), routes=ROUTES).bucket("local_edit")
    directory = tmp_path / "latents"
    cache = LatentCache(_Encoder(), size=(16, 16), directory=directory)
    latents = cache.get(bucket.rows)
    assert cache.encoded == 4 and len(list(directory.glob("*.pt"))) == 4
    restarted = LatentCache(_Encoder(), size=(16, 16), directory=directory)  # a restarted worker
    assert torch.equal(restarted.get(bucket.rows), latents)
    assert restarted.encoded == 0 and restarted.loaded == 4
    other_size = LatentCache(_Encoder(), size=(8, 8), directory=directory)  # a stale size is not reused
    assert other_size.get(bucket.rows[:1]).shape == (1, 3, 2, 2) and other_size.encoded == 1
