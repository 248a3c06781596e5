"""The experiment runner, smoke-sized: arms x seeds train and are judged, the report states each claim's
verdict with its interval, plots are written, and a killed experiment continues where it stopped."""

import json
import os

import pytest
import yaml

from danceopd_cli.main import main


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "base": "configs/demo.yaml", "budget": {"torch_threads": 1}, "seeds": [0, 1],
        "arms": {"low": {"method.query_position": "low"}, "high": {"method.query_position": "high"}},
        "claim": {"metric": "mean_score", "better": "low", "worse": "high", "paper": "low beats high"}}))
    return path


def test_smoke_experiment_report_and_resume(spec, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "results.md"
    assert main(["experiment", str(spec), "--smoke", "--out", str(out), "--report", str(report)]) == 0
    data = json.loads((tmp_path / "results" / "tiny.json").read_text())  # beside the report: docs/results/<name>.*
    runs = data["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [("high", 0), ("high", 1), ("low", 0), ("low", 1)]
    assert all(r["steps"] == 4 and set(r["routes"]) == {"t2i", "local_edit", "global_edit"} for r in runs)
    assert all(0 <= r["routes"]["t2i"]["score"] <= 1 and "coverage" in r["routes"]["t2i"] for r in runs)
    claim = data["summary"]["claim"]
    assert claim["verdict"] in ("holds", "reversed", "inconclusive") and claim["ci95"] >= 0
    low = [sum(v["score"] for v in r["routes"].values()) / 3 for r in runs if r["arm"] == "low"]
    high = [sum(v["score"] for v in r["routes"].values()) / 3 for r in runs if r["arm"] == "high"]
    assert claim["difference"] == pytest.approx(sum(low) / 2 - sum(high) / 2)
    text = report.read_text()
    assert "SMOKE" in text and "low beats high" in text and claim["verdict"] in text and "](results/tiny-scores.png)" in text
    assert (tmp_path / "results" / "tiny-scores.png").stat().st_size > 1000 and (tmp_path / "results" / "tiny-loss.png").exists()

    # A killed experiment: one run lost its result (and was mid-way). Rerunning redoes that run only.
    lost = out / "tiny" / "high" / "seed1" / "result.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "tiny").glob("*/seed*/result.json")}
    capsys.readouterr()
    assert main(["experiment", str(spec), "--smoke", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "high seed 1" in log and "low seed 0" not in log and lost.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())

    # A changed spec never reuses a stale result: the changed arm runs again, the old run is kept aside.
    changed = yaml.safe_load(spec.read_text())
    changed["arms"]["high"]["optim.lr"] = 0.002
    spec.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    assert main(["experiment", str(spec), "--smoke", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("config changed") == 2 and "high seed 0:" in log and "low seed 0:" not in log
    assert len(list((out / "tiny" / "high").glob("seed0.stale-*"))) == 1

    # The same run in another experiment (here: an identical arm under a new name) is reused, not retrained.
    twin = yaml.safe_load(spec.read_text())
    twin["name"], twin["arms"] = "twin", {"low": twin["arms"]["low"]}
    twin.pop("claim")
    spec.write_text(yaml.safe_dump(twin))
    capsys.readouterr()
    assert main(["experiment", str(spec), "--smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(", reused") == 2
    again = json.loads((out / "twin" / "low" / "seed1" / "result.json").read_text())
    first = json.loads((out / "tiny" / "low" / "seed1" / "result.json").read_text())
    assert again["routes"] == first["routes"] and again["reused_from"].endswith("tiny/low/seed1")


def test_bad_spec_exits_2_naming_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "base": "configs/demo.yaml", "arms": {"a": {"method.k": 0}},
                                   "claim": {"metric": "mean_score", "better": "a", "worse": "a"}}))
    assert main(["experiment", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "arm 'a'" in err and "method.k" in err
    os.remove(bad)


def test_cfg_probe_recovers_the_guidance_scale_of_a_known_field(basic_suite):
    """A 'student' that is exactly CFG(alpha) over the T2I field (and the unconditional field for the empty
    prompt) acts like CFG at alpha * beta when sampled at beta: the probe must measure w = alpha * beta."""
    from danceopd.fields.operators import CFGField
    from experiments.probes import effective_guidance

    t2i = basic_suite.field("t2i")
    absorbed = effective_guidance(CFGField(t2i, 2.0), basic_suite, alpha=2.0, betas=[1.0, 1.5], n=32)
    assert absorbed["w_b1"] == pytest.approx(2.0, rel=1e-4) and absorbed["w_b1.5"] == pytest.approx(3.0, rel=1e-4)
    assert absorbed["ratio_b1.5"] == pytest.approx(1.0, rel=1e-4)
    plain = effective_guidance(t2i, basic_suite, alpha=2.0, betas=[1.0], n=32)  # nothing absorbed: w = beta
    assert plain["w_b1"] == pytest.approx(1.0, rel=1e-4) and plain["ratio_b1"] == pytest.approx(0.5, rel=1e-4)


def test_prepare_makes_the_initial_student_once(tmp_path, capsys):
    """`prepare` pre-trains the initial student (plain flow matching) into the experiments folder once; the
    runs start from it (init_from with {out})."""
    spec = tmp_path / "compose.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "compose", "base": "configs/demo.yaml", "seeds": [0],
        "prepare": [{"creates": "{out}/pretrain-t2i/student",
                     "run": ["python", "-m", "trainer.reference", "--config", "configs/pretrain-t2i.yaml", "output_dir={out}"]}],
        "budget": {"torch_threads": 1, "init_from": "{out}/pretrain-t2i/student"},
        "arms": {"danceopd": {}}}))
    out = tmp_path / "out"
    assert main(["experiment", str(spec), "--smoke", "--out", str(out)]) == 0
    assert "preparing" in capsys.readouterr().out
    student = out / "pretrain-t2i" / "student"
    assert (student / "danceopd_student.json").exists()
    cfg = json.loads((out / "compose" / "danceopd" / "seed0" / "checkpoints").joinpath(
        sorted(p.name for p in (out / "compose" / "danceopd" / "seed0" / "checkpoints").iterdir())[-1], "state.json").read_text())["config"]
    assert cfg["init_from"] == str(student)
    assert main(["experiment", str(spec), "--smoke", "--out", str(out)]) == 0
    assert "preparing" not in capsys.readouterr().out  # made once, reused
