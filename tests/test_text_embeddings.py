"""student.text_embeddings: prompts encoded once into a content-addressed store, read by hash by processes that load no
text encoder; the velocities are those of the encoders on the device, bit for bit, on tiny SD3, FLUX and Kontext."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from danceopd.config import ConfigError, load_config
from danceopd.fields.base import Conditions
from danceopd.models.base import text_encoder_parameters
from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline
from danceopd.text_embeddings import EmbeddingStore, EncoderKey, MissingEmbeddingError, precompute
from trainer.reference import ReferenceTrainer

PROMPTS = ["a red circle on a blue floor", "two cats", "a photo of an astronaut riding a horse on the moon"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-embeddings")
    paths = {f: build_tiny_pipeline(f, root / f, seed=0) for f in ("sd3", "flux", "flux-kontext", "z-image", "flux2", "flux2-klein",
                                                                    "qwen-image", "qwen-image-edit-plus")}
    return {"root": root, **paths, **{f"{f}-lora": build_random_lora(p, root / f"{f}-lora", rank=4, std=0.1, seed=1)
                                      for f, p in paths.items()}}


def _config(pipelines, family: str, tmp_path, **over):
    rows = [{"uid": f"{route}{i}", "route": route, "prompt": f"{p} #{i}"} for route in ("t2i", "t2i_cfg") for i, p in enumerate(PROMPTS * 2)]
    if family == "flux-kontext":  # an edit route, its sources encoded by the student's VAE
        from PIL import Image

        (tmp_path / "img").mkdir(exist_ok=True)
        for i in range(4):
            Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()).save(tmp_path / "img" / f"{i}.png")
        rows += [{"uid": f"e{i}", "route": "edit", "prompt": f"make it red #{i}", "source_image": f"img/{i}.png"} for i in range(4)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    lora = {"loras": [{"path": str(pipelines[f"{family}-lora"])}]}
    routes = {"t2i": {"teacher": lora}, "t2i_cfg": {"teacher": lora, "cfg_alpha": 3.0}}
    if family == "flux-kontext":
        routes["edit"] = {"teacher": lora}
    return load_config(None, {"student.base": str(pipelines[family]), "student.lora": {"rank": 4, "alpha": 4}, "data.manifest": str(tmp_path / "m.jsonl"),
                              "output_dir": str(tmp_path / "runs"), "device": "cpu", "dtype": "float32", "routes": routes, **over})


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-kontext", "z-image", "flux2", "flux2-klein", "qwen-image"])
def test_precomputed_embeddings_give_the_on_device_velocities_bit_for_bit_without_text_encoders(pipelines, family, tmp_path):
    cfg = _config(pipelines, family, tmp_path)
    text = cfg.text_embeddings()
    assert text.mode == "precompute" and text.store == str((tmp_path / "runs" / "text-embeddings").resolve())  # auto: a listed prompt set
    assert "" in cfg.run_prompts() and len(cfg.run_prompts()) == len({r["prompt"] for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())}) + 1
    stored = ReferenceTrainer(cfg, log=lambda *a: None)  # encodes the run's prompts, then loads no text encoder anywhere
    on_device = ReferenceTrainer(_config(pipelines, family, tmp_path, **{"student.text_embeddings": "on_device"}), log=lambda *a: None)
    assert text_encoder_parameters(stored.student.pipe) == 0 and stored.student.pipe.text_encoder is None
    assert text_encoder_parameters(on_device.student.pipe) > 0
    for name in stored.teachers:
        teacher = stored.teachers[name]
        assert text_encoder_parameters(getattr(teacher, "base", teacher).pipe) == 0, name

    g = torch.Generator().manual_seed(0)
    shape = stored.student.field.info.sample_shape
    x, sigma = torch.randn(3, *shape, generator=g), torch.tensor([0.9, 0.5, 0.2])
    for name, data in stored.data.items():
        cond = data.sample(3, seed=7)
        assert cond.prompts == on_device.data[name].sample(3, seed=7).prompts
        with torch.no_grad():
            for a, b in ((stored.teachers[name], on_device.teachers[name]), (stored.student.field, on_device.student.field)):
                assert torch.equal(a.velocity(x, sigma, cond), b.velocity(x, sigma, cond)), (name, a.info.name)
    # a prompt that is not in the store: one clear error naming the prompt and the store, never an encoder loaded
    with pytest.raises(MissingEmbeddingError, match=r"prompt 'never seen' .* not in the text-embedding store .*text-embeddings/[0-9a-f]{16}"):
        stored.student.field.velocity(x[:1], sigma[:1], Conditions(["never seen"]))


def test_a_qwen_edit_run_never_reads_a_prompt_keyed_store(pipelines, tmp_path):
    """Qwen-Image-Edit's text encoder reads the source image: auto encodes where needed (per (prompt, source)); an
    explicit precompute is refused at validation, naming the key and why."""
    assert _config(pipelines, "qwen-image-edit-plus", tmp_path).text_embeddings().mode == "on_device"
    with pytest.raises(ConfigError, match=r"student\.text_embeddings 'precompute': a Qwen-Image-Edit text encoder reads the source"):
        _config(pipelines, "qwen-image-edit-plus", tmp_path, **{"student.text_embeddings": "precompute"})


def test_the_store_is_content_addressed_and_shared(pipelines, tmp_path):
    """A second precompute of the same prompts encodes nothing; a copy of the pipeline in another folder finds the same
    embeddings (the fingerprint is the files' contents, not their path); changed encoder weights miss them all."""
    store = tmp_path / "store"
    key = EncoderKey(str(pipelines["flux"]), "flux", "float32", 32)
    first = precompute(store, [key], PROMPTS)
    assert [v["encoded"] for v in first.values()] == [3]
    assert [v["encoded"] for v in precompute(store, [key], PROMPTS + ["one more"]).values()] == [1]
    digests = json.loads((store / "file-digests.json").read_text())
    assert any(p.endswith("text_encoder/model.safetensors") for p in digests)  # hashed once, later only stat-ed

    moved = shutil.copytree(pipelines["flux"], tmp_path / "elsewhere")
    same = EncoderKey(str(moved), "flux", "float32", 32)
    s = EmbeddingStore(store)
    assert s.fingerprint(same) == s.fingerprint(key) and s.missing(s.fingerprint(same), PROMPTS) == []

    from safetensors.torch import load_file, save_file

    weights = load_file(moved / "text_encoder" / "model.safetensors")
    first_name = sorted(weights)[0]
    weights[first_name] = weights[first_name] + 1e-3
    save_file(weights, moved / "text_encoder" / "model.safetensors")
    assert s.fingerprint(same) != s.fingerprint(key)
    assert s.missing(s.fingerprint(same), PROMPTS) == PROMPTS
    # other settings of the same encoders are other embeddings
    assert s.fingerprint(EncoderKey(str(pipelines["flux"]), "flux", "bfloat16", 32)) != s.fingerprint(key)
    assert s.fingerprint(EncoderKey(str(pipelines["flux"]), "flux", "float32", 64)) != s.fingerprint(key)


def test_text_embedding_modes_are_validated_before_anything_loads(pipelines, tmp_path):
    cfg = _config(pipelines, "flux", tmp_path, **{"student.precompute_max_prompts": 3})
    assert cfg.text_embeddings().mode == "on_device"  # auto above the bound: each process encodes its own
    assert _config(pipelines, "flux", tmp_path, **{"student.text_embeddings": "cpu"}).text_embeddings().store is None
    with pytest.raises(ConfigError, match=r"precompute' needs the run's prompts listed \(data.manifest\)"):
        load_config(None, {"student.base": str(pipelines["flux"]), "student.text_embeddings": "precompute",
                           "routes": {"t2i": {"capability": "t2i", "teacher": {}}}})
    with pytest.raises(ConfigError, match=r"text_embeddings 'precompute': the pixel model's text encoder is part of the model"):
        load_config(None, {"student.text_embeddings": "precompute"})


def test_pipelines_load_with_text_encoders_in_host_memory_or_none(pipelines, tmp_path):
    from danceopd.models import get_family

    pipe = get_family("flux").load_pipeline(str(pipelines["flux"]), torch.device("cpu"), torch.float32, text_encoders="cpu")
    assert text_encoder_parameters(pipe) > 0 and pipe.text_encoder.device.type == "cpu"
    none = get_family("sd3").load_pipeline(str(pipelines["sd3"]), torch.device("cpu"), torch.float32, vae=False, text_encoders=None)
    assert sorted(k for k, v in none.components.items() if v is not None) == ["scheduler", "transformer"]
