"""Aspect-ratio buckets (data.buckets): images of three shapes train a tiny SD3 and a tiny FLUX student, every
micro-batch drawn from one bucket at its own latent shape (and sigma grid), and the velocity error falls on each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from danceopd.config import ConfigError, load_config
from danceopd.contracts import QueryError, VelocityQuery
from danceopd.data.buckets import cover_crop, nearest_bucket, standard_buckets
from danceopd.data.manifest import HeaderIndex, ManifestBucket, ManifestRow, load_image
from danceopd.fields.base import Conditions, FieldInfo
from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline
from trainer.reference import ReferenceTrainer

BUCKETS = [(32, 32), (48, 32), (32, 48)]  # tiny pipelines: sides in multiples of 4 (VAE factor 2 x patch 2)
SHAPES = [(3, 32, 32), (3, 32, 48), (3, 48, 32)]  # images of every ratio, a little off the buckets


def test_standard_buckets_and_the_nearest_bucket_rule():
    flux = standard_buckets(1024, 16)
    assert flux[:3] == [(1024, 1024), (1152, 912), (912, 1152)] and (1360, 768) in flux and len(flux) == 9
    assert all(w % 16 == 0 and h % 16 == 0 and 0.85 < w * h / 1024 ** 2 < 1.07 for w, h in flux)
    assert nearest_bucket(1920, 1080, flux) == (1360, 768)  # 16:9
    assert nearest_bucket(1000, 1010, flux) == (1024, 1024)
    assert nearest_bucket(600, 900, flux) == (832, 1248)  # 2:3
    assert cover_crop(96, 32, (32, 32)) == ((96, 32), (32, 0, 64, 32))  # the middle third
    assert cover_crop(50, 30, (48, 32)) == ((53, 32), (2, 0, 50, 32))


def test_an_image_is_resized_to_cover_its_bucket_and_centre_cropped(tmp_path):
    bands = np.zeros((32, 96, 3), dtype=np.uint8)
    bands[:, :32, 0] = 255  # red | green | blue, left to right
    bands[:, 32:64, 1] = 255
    bands[:, 64:, 2] = 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    x = load_image(tmp_path / "bands.png", (32, 32))
    assert x.shape == (3, 32, 32)
    assert torch.all(x[1] == 1) and torch.all(x[0] == -1) and torch.all(x[2] == -1)  # only the green middle is kept


def test_every_draw_is_one_bucket_and_buckets_are_drawn_by_their_share():
    rows = [ManifestRow(f"r{i}", "t2i", "p", target_image=None, bucket=BUCKETS[0 if i < 6 else 1 if i < 9 else 2]) for i in range(12)]
    bucket = ManifestBucket("t2i", rows)
    seen = {b: 0 for b in BUCKETS}
    for seed in range(3000):
        drawn, size = bucket.sample_sized(4, seed)
        assert {r.bucket for r in drawn} == {size}
        seen[size] += 1
        assert bucket.sample_sized(4, seed) == (drawn, size)  # a pure function of the seed
    assert abs(seen[(32, 32)] / 3000 - 0.5) < 0.03 and abs(seen[(48, 32)] / 3000 - 0.25) < 0.03
    # a route with images and prompt-only rows: buckets by the images' shares, prompt-only rows join any bucket's draw
    mixed = ManifestBucket("t2i", rows[:6] + [ManifestRow("free", "t2i", "q")] + rows[9:])
    assert mixed.size_shares() == {(32, 32): 2 / 3, (32, 48): 1 / 3}
    drawn = [mixed.sample_sized(6, seed) for seed in range(200)]
    assert all({r.bucket for r in d} <= {size, None} for d, size in drawn) and any(r.uid == "free" for d, _ in drawn for r in d)
    # prompt-only rows (no image): the run's shares, set by the manifest
    prompts = ManifestBucket("uncond", [ManifestRow(f"u{i}", "uncond", "") for i in range(4)], shares={(48, 32): 0.25, (32, 48): 0.75})
    sizes = [prompts.sample_sized(2, seed)[1] for seed in range(2000)]
    assert abs(sizes.count((32, 48)) / 2000 - 0.75) < 0.03


def test_a_teacher_answers_the_shapes_of_its_bucket_list_and_names_the_rest():
    info = FieldInfo("t2i", "diffusers", (4, 16, 16), bucket_shapes=((4, 16, 24), (4, 24, 16)))
    sigma, prompts = torch.full((1,), 0.5), ["a cat"]
    for shape in info.shapes:
        VelocityQuery.from_torch(torch.zeros(1, *shape), sigma, Conditions(prompts)).validate(info)
    with pytest.raises(QueryError, match=r"one of its buckets \[\[4, 16, 16\], \[4, 16, 24\], \[4, 24, 16\]\].*got \[1, 4, 16, 20\]"):
        VelocityQuery.from_torch(torch.zeros(1, 4, 16, 20), sigma, Conditions(prompts)).validate(info)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """18 captioned images in three aspect ratios (sizes near, not at, the buckets') and 3 held-out rows, one per ratio."""
    root = tmp_path_factory.mktemp("bucket-data")
    sizes = [(32, 32), (48, 32), (32, 48), (50, 30), (30, 50), (33, 31)]
    (root / "captions").mkdir()
    for i in range(18):
        w, h = sizes[i % 6]
        Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8")).save(root / "captions" / f"i{i:02d}.png")
        (root / "captions" / f"i{i:02d}.txt").write_text(["a red circle", "a blue square", "two green dots"][i % 3])
    held = []
    for j, (w, h) in enumerate([(32, 32), (48, 32), (32, 48)]):
        Image.fromarray((np.random.RandomState(100 + j).rand(h, w, 3) * 255).astype("uint8")).save(root / f"held{j}.png")
        held.append({"uid": f"held{j}", "route": "t2i", "prompt": "a yellow star", "target_image": f"held{j}.png"})
    (root / "held.jsonl").write_text("\n".join(json.dumps(r) for r in held) + "\n")
    return root


def _config(images, base, lora, out, **over):
    return load_config(None, {"student.base": str(base), "student.lora": {"rank": 4, "alpha": 4}, "output_dir": str(out),
                              "device": "cpu", "dtype": "float32", "steps": 40, "optim.batch_size": 2, "optim.grad_accum": 2,
                              "optim.lr": 2e-3, "method.rollout_steps": 4, "method.schedule": "family", "eval.velocity_error_samples": 2,
                              "routes": {"t2i": {"teacher": {"loras": [{"path": str(lora)}]}}},
                              "data.sources": [{"path": str(images / "captions"), "route": "t2i"}],
                              "data.eval_manifest": str(images / "held.jsonl"), "data.buckets": [list(b) for b in BUCKETS], **over})


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_three_aspect_ratios_train_a_tiny_student_one_bucket_per_micro_batch(family, images, tmp_path):
    base = build_tiny_pipeline(family, tmp_path / "base", seed=0)
    lora = build_random_lora(base, tmp_path / "lora", rank=4, std=0.3, seed=1)
    cfg = _config(images, base, lora, tmp_path / "out")
    assert {r.bucket for r in cfg.manifest.rows} == set(BUCKETS)
    trainer = ReferenceTrainer(cfg, log=lambda m: None)
    grids = trainer.sigmas
    if family == "flux":  # FLUX's shift follows the token count: a 48x32 bucket's grid is not the square's
        assert not torch.equal(grids((16, 8, 12)), grids((16, 8, 8)))
    calls = []
    velocity = trainer.student.field.velocity
    trainer.student.field.velocity = lambda x, s, c: (calls.append((tuple(x.shape[1:]), c.shape)), velocity(x, s, c))[1]
    before = trainer.evaluate()["routes"]["t2i"]["velocity_error_by_bucket"]
    calls.clear()
    for _ in range(cfg.steps):
        trainer.train_step()
    after = trainer.evaluate()["routes"]["t2i"]["velocity_error_by_bucket"]
    latent = {trainer.student.family.latent_shape(trainer.student.pipe, b) for b in BUCKETS}
    assert {shape for shape, _ in calls} == latent  # all three buckets trained, at their own latent shapes
    assert all(shape == c for shape, c in calls)  # every call's batch is one bucket's (its conditions carry that shape)
    assert set(before) == set(after) == {"32x32", "48x32", "32x48"}
    print(family, "velocity error before", before, "after", after)
    assert all(after[b] < 0.8 * before[b] for b in before), (before, after)


def test_bad_bucket_settings_are_named_before_any_model_loads(images, tmp_path):
    base = tmp_path / "no-model"  # never read: the checks come first
    with pytest.raises(ConfigError, match=r"data\.buckets: \[\[30, 32\]\]: a sd3 model .* multiples of 16"):
        load_config(None, {"student.family": "sd3", "student.base": "org/sd3-like", "output_dir": str(tmp_path), "routes": {"t2i": {"teacher": {}}},
                           "data.sources": [{"path": str(images / "captions"), "route": "t2i"}], "data.buckets": [[32, 32], [30, 32]]})
    with pytest.raises(ConfigError, match=r"data\.buckets: the suite's pixel model has one image size"):
        load_config(None, {"output_dir": str(tmp_path), "data.buckets": "auto", "routes": {"t2i": {"capability": "t2i"}}})
    del base


def test_the_header_index_is_reused_by_a_later_start(images, tmp_path):
    files = sorted((images / "captions").glob("*.png"))
    first = HeaderIndex(tmp_path / "index.parquet")
    sizes = [first.size(f) for f in files]
    first.save()
    again = HeaderIndex(tmp_path / "index.parquet")
    assert [again.size(f) for f in files] == sizes and (again.read, again.reused) == (0, len(files))
    files[0].touch()  # a changed file is read again
    assert again.size(files[0]) == sizes[0] and again.read == 1


def test_buckets_on_the_distributed_job_with_a_served_teacher(ray_cluster, images, tmp_path):
    """Two Ray Train workers x 2 micro-batches, the teacher on Ray Serve with the run's bucket list (its info names
    every bucket's shape; a query of another shape is refused naming them), the error falling on every bucket."""
    import uuid

    from ray import serve

    from danceopd.remote import RequestError
    from trainer.distributed import run_distributed
    from trainer.job import load_job_config
    from trainer.main import ensure_services

    base = build_tiny_pipeline("flux", tmp_path / "base", seed=0)
    lora = build_random_lora(base, tmp_path / "lora", rank=4, std=0.3, seed=1)
    prefix = f"bk{uuid.uuid4().hex[:4]}-"
    job = load_job_config(None, {
        "student.base": str(base), "student.lora.rank": 4, "student.lora.alpha": 4, "student.text_embeddings": "on_device",
        "routes": {"t2i": {"teacher": {"loras": [{"path": str(lora)}]}}},
        "data.sources": [{"path": str(images / "captions"), "route": "t2i"}], "data.eval_manifest": str(images / "held.jsonl"),
        "data.buckets": [list(b) for b in BUCKETS], "method.rollout_steps": 4, "method.schedule": "family", "optim.batch_size": 4,
        "optim.grad_accum": 2, "optim.lr": 5e-3, "optim.warmup_steps": 0, "optim.ema_decay": 0.0, "steps": 30, "log_every": 10,
        "checkpoint_every": 30, "torch_threads": 1, "eval.velocity_error_samples": 2, "cluster.num_workers": 2,
        "cluster.cpus_per_worker": 0.5, "output_dir": str(tmp_path), "services.app_prefix": prefix,
        "services.router_app": prefix + "router", "services.gateway": False})
    ensure_services(job, log=lambda m: None)
    try:
        client = job.teacher_client("t2i")
        assert set(client.info.shapes) == {(4, 16, 16), (4, 16, 24), (4, 24, 16)}
        with pytest.raises(RequestError, match=r"x: must have shape .*one of its buckets"):
            client.velocity(torch.zeros(1, 4, 16, 20), torch.tensor([0.5]), Conditions(["a cat"]))
        result = run_distributed(job, f"{prefix}run", evaluate=True)
        assert result.error is None and result.metrics["step"] == 30
    finally:
        for app in (prefix + "t2i", prefix + "router"):
            serve.delete(app)
    report = json.loads((job.run_dir / "report.json").read_text())
    before, after = report["before"]["routes"]["t2i"]["velocity_error_by_bucket"], report["routes"]["t2i"]["velocity_error_by_bucket"]
    assert set(before) == set(after) == {"32x32", "48x32", "32x48"}
    assert all(after[b] < 0.8 * before[b] for b in before), (before, after)
