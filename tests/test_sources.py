"""Data sources (danceopd.data.sources): a caption folder and a Hugging Face dataset train exactly as the equivalent
manifest does; bad data is one error naming the file, row or column, before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from danceopd.config import ConfigError, load_config
from danceopd.testing.tiny import build_tiny_pipeline
from trainer.reference import ReferenceTrainer

CAPTIONS = ["a red circle", "a blue square", "two green dots", "a yellow star", "a small black ring", "a white cube"]
EDITS = ["make it red", "add snow", "make it a sketch", "turn it blue", "remove the dot", "flip it"]


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same rows three ways: a caption folder (t2i) + a `save_to_disk` dataset with embedded images (edit), and
    one JSONL manifest of plain files."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    kontext = build_tiny_pipeline("flux-kontext", root / "kontext", seed=0)
    (root / "captions" / "sub").mkdir(parents=True)
    (root / "files").mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS):
        name = f"sub/img{i}" if i % 2 else f"img{i}"  # subfolders count; uids are the paths without suffix
        _image(i).save(root / "captions" / f"{name}.png")
        (root / "captions" / f"{name}.txt").write_text(caption + "\n")
        rows.append({"uid": name, "route": "t2i", "prompt": caption, "target_image": f"../captions/{name}.png"})
    rows.sort(key=lambda r: r["uid"])  # a caption folder's rows are in path order
    for i, edit in enumerate(EDITS):
        _image(100 + i).save(root / "files" / f"e{i}.png")
        rows.append({"uid": f"e{i}", "route": "edit", "prompt": edit, "source_image": f"e{i}.png"})
    (root / "files" / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = datasets.Dataset.from_dict({"id": [f"e{i}" for i in range(6)], "instruction": EDITS,
                                     "input_image": [_image(100 + i) for i in range(6)]}).cast_column("input_image", datasets.Image())
    ds.save_to_disk(str(root / "edits-ds"))
    return {"root": root, "kontext": kontext}


def _config(data, tmp_path, **over):
    base = {"student.base": str(data["kontext"]), "student.lora": {"rank": 4, "alpha": 4}, "output_dir": str(tmp_path),
            "device": "cpu", "dtype": "float32", "steps": 8, "optim.batch_size": 2, "optim.grad_accum": 2,
            "method.rollout_steps": 4, "routes": {"t2i": {"teacher": {}}, "edit": {"teacher": {}}}}
    return load_config(None, {**base, **over})


def test_a_caption_folder_and_a_dataset_train_exactly_as_the_equivalent_manifest(data, tmp_path):
    sources = [{"path": str(data["root"] / "captions"), "route": "t2i"},
               {"path": str(data["root"] / "edits-ds"), "route": "edit", "columns": {"uid": "id", "prompt": "instruction",
                                                                                   "source_image": "input_image"}}]
    a = _config(data, tmp_path / "a", **{"data.sources": sources})
    b = _config(data, tmp_path / "b", **{"data.manifest": str(data["root"] / "files" / "manifest.jsonl")})
    for route in ("t2i", "edit"):  # the same rows, held-out split (by uid) and draws; images with the same pixels
        for x, y in ((a.manifest, b.manifest), (a.eval_manifest, b.eval_manifest)):
            rx, ry = x.bucket(route).rows, y.bucket(route).rows
            assert [(r.uid, r.prompt) for r in rx] == [(r.uid, r.prompt) for r in ry] and len(rx) > 0
            for r, s in zip(rx, ry):
                for col in ("source_image", "target_image"):
                    f, g = getattr(r, col), getattr(s, col)
                    assert (f is None) == (g is None) and (f is None or np.array_equal(np.asarray(Image.open(f)), np.asarray(Image.open(g))))
        assert [r.uid for r in a.manifest.bucket(route).sample(8, seed=3)] == [r.uid for r in b.manifest.bucket(route).sample(8, seed=3)]
    edit_files = {r.source_image for r in a.manifest.bucket("edit").rows}
    assert all(f.parent == (tmp_path / "a" / "data-images").resolve() for f in edit_files)  # embedded images, written once
    # what the Ray workers get: the validated rows as two manifests, which validate again to the same rows
    from danceopd.config import TrainConfig

    again = TrainConfig.model_validate(json.loads(a.with_rows_written(tmp_path / "rows").model_dump_json()))
    assert not again.data.sources and again.data.manifest == (tmp_path / "rows" / "train.jsonl").resolve()
    for x, y in ((again.manifest, a.manifest), (again.eval_manifest, a.eval_manifest)):
        assert x.rows == y.rows
    losses = []
    for cfg in (a, b):
        trainer = ReferenceTrainer(cfg, log=lambda m: None)
        losses.append([(out["route"], out["loss"]) for out in (trainer.train_step() for _ in range(8))])
    assert losses[0] == losses[1] and {r for r, _ in losses[0]} == {"t2i", "edit"}


def test_bad_data_is_one_error_naming_the_file_row_or_column_before_any_model_loads(data, tmp_path):
    root = tmp_path / "bad-captions"
    root.mkdir()
    _image(0).save(root / "a.png")
    (root / "a.txt").write_text("a cat")
    _image(1).save(root / "b.png")  # no b.txt
    with pytest.raises(ConfigError, match=r"data\.sources\.0: .*row 2.*image b\.png has no caption file b\.txt beside it"):
        _config(data, tmp_path, **{"data.sources": [{"path": str(root), "route": "t2i"}],
                                   "routes": {"t2i": {"teacher": {}}}})
    (root / "b.txt").write_text("a dog")
    (root / "c.png").write_bytes(b"not a png")
    (root / "c.txt").write_text("broken")
    with pytest.raises(ConfigError, match=r"data\.sources\.0: .*row 3 \(uid 'c'\): target_image: file .*c\.png is not a readable image"):
        _config(data, tmp_path, **{"data.sources": [{"path": str(root), "route": "t2i"}], "routes": {"t2i": {"teacher": {}}}})
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.columns\.prompt: column 'caption' is not in the dataset"):
        _config(data, tmp_path, **{"data.sources": [{"path": str(data["root"] / "edits-ds"), "route": "edit",
                                                     "columns": {"prompt": "caption"}}], "routes": {"edit": {"teacher": {}}}})
    with pytest.raises(ConfigError, match=r"data\.sources: give data\.manifest .* or data\.sources"):
        _config(data, tmp_path, **{"data.sources": [{"path": str(root), "route": "t2i"}],
                                   "data.manifest": str(data["root"] / "files" / "manifest.jsonl")})


def test_the_reference_trainer_samples_every_n_steps_at_the_training_resolution(data, tmp_path):
    """eval.every on the reference trainer: grids at 0, 2 and 4 (and the last step), tiles of the 32 px training
    resolution, on disk and in TensorBoard's `samples` run; the losses are those of a run without them."""
    from tensorboard_files import read_images

    over = {"data.manifest": str(data["root"] / "files" / "manifest.jsonl"), "steps": 5}
    sampled = ReferenceTrainer(_config(data, tmp_path / "a", **over, **{"eval.every": 2}), log=lambda m: None)
    sampled.fit()
    plain = ReferenceTrainer(_config(data, tmp_path / "b", **over), log=lambda m: None)
    plain.fit()
    assert [h["loss"] for h in sampled.history] == [h["loss"] for h in plain.history]
    run = sampled.cfg.run_dir
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [f"step-{s:06d}.png" for s in (0, 2, 4, 5)]
    assert read_images(run / "tensorboard" / "samples") == {"samples": [0, 2, 4, 5]}
    grid, n = Image.open(run / "samples" / "step-000005.png"), sampled.cfg.eval.samples_per_condition_in_grid
    assert grid.width == 150 + 32 + 4 + 2 * n * (32 + 4) + 4 * 3  # save_grid's layout with 32 px tiles (the default: 64)


def test_a_large_source_skips_unreadable_images_counted_and_said(data, tmp_path, caplog):
    """Above data.validate_images_below rows the images are not all read at start: a corrupt source image is skipped when
    drawn (another row of its bucket instead), counted and logged; with buckets (whose sizes need every header) it is set
    aside at start with one warning. Never silently, never a crash."""
    rows = [json.loads(line) for line in (data["root"] / "files" / "manifest.jsonl").read_text().splitlines()]
    for r in rows:  # absolute paths: this manifest lives elsewhere
        r.update({c: str((data["root"] / "files" / r[c]).resolve()) for c in ("source_image", "target_image") if c in r})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    edits = [r for r in rows if r["route"] == "edit"]
    for r in edits:
        r["source_image"] = str(tmp_path / "broken.png") if r["uid"] in ("e0", "e1", "e2") else r["source_image"]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in edits) + "\n")
    over = {"data.manifest": str(tmp_path / "m.jsonl"), "data.validate_images_below": 3, "data.eval_fraction": 0.2,
            "routes": {"edit": {"teacher": {}}}}
    cfg = _config(data, tmp_path / "a", **over)
    said = []
    trainer = ReferenceTrainer(cfg, log=said.append)
    for _ in range(4):
        trainer.train_step()
    skipped = trainer.data["edit"].skipped
    assert skipped > 0 and len([s for s in said if "cannot be read; skipped" in s]) == skipped
    assert all("broken.png" in s for s in said if "skipped" in s)
    with caplog.at_level("WARNING", logger="danceopd.data"):
        bucketed = _config(data, tmp_path / "b", **over, **{"data.buckets": [[32, 32]]})
    assert {r.uid for r in bucketed.manifest.rows} | {r.uid for r in bucketed.eval_manifest.rows} == {"e3", "e4", "e5"}
    assert any("3 rows skipped, their image cannot be read" in m and "broken.png" in m for m in caplog.messages)
    # a large source's validated rows are kept: the workers' copy of them (with_rows_written) is read, not re-checked
    from danceopd.config import TrainConfig

    src = _config(data, tmp_path / "c", **{**over, "data.manifest": None, "data.sources": [{"path": str(tmp_path / "m.jsonl")}]})
    kept = sorted((tmp_path / "c" / "data-rows").glob("*.parquet"))
    again = TrainConfig.model_validate(json.loads(src.with_rows_written(tmp_path / "rows").model_dump_json()))
    assert again.manifest.rows == src.manifest.rows and len(kept) == 1
    assert len(sorted((tmp_path / "c" / "data-rows").glob("*.parquet"))) == 3  # the source's rows and the workers' two files
