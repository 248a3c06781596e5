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
        "name": "tiny", "base": "experiments/base.yaml", "budget": {"torch_threads": 1}, "seeds": [0, 1],
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
    [claim] = data["summary"]["claims"]
    assert claim["verdict"] in ("holds", "reversed", "inconclusive") and claim["ci95"] >= 0
    low = [sum(v["score"] for v in r["routes"].values()) / 3 for r in runs if r["arm"] == "low"]
    high = [sum(v["score"] for v in r["routes"].values()) / 3 for r in runs if r["arm"] == "high"]
    assert claim["difference"] == pytest.approx(sum(low) / 2 - sum(high) / 2)
    text = report.read_text()
    assert "| tiny | low |" in text.split("## Diversity beside accuracy")[1]
    glance = text.split("## Claims at a glance")[1].split("## tiny")[0]
    assert f"| tiny | low beats high: `mean_score` low − high | {claim['difference']:+.3f} ± {claim['ci95']:.3f} | **{claim['verdict']}** |" in glance
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
    bad.write_text(yaml.safe_dump({"name": "bad", "base": "experiments/base.yaml", "arms": {"a": {"method.k": 0}},
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
        "name": "compose", "base": "experiments/base.yaml", "seeds": [0],
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


def test_several_claims_with_margins_thresholds_and_change_from_the_initial_student():
    """The verdicts follow the 95% intervals: a non-inferiority margin, an at_least threshold on the change
    from the initial student, and arms that train different routes (their missing metrics are left out)."""
    from experiments.report import markdown, summarize
    from experiments.spec import ExperimentSpec

    def run(arm, seed, local, glob=None, before=0.2):
        routes = {"t2i": {"score": 0.9 + 0.01 * seed}, "local_edit": {"score": local}}
        if glob is not None:
            routes["global_edit"] = {"score": glob}
        return {"arm": arm, "seed": seed, "steps": 1, "routes": routes, "history": [], "probes": {},
                "before": {"t2i": {"score": 0.9}, "local_edit": {"score": before}, "global_edit": {"score": 0.0}}}

    spec = ExperimentSpec(name="x", base="experiments/base.yaml", eval_before=True, arms={"both": {}, "solo": {}}, claims=[
        {"metric": "local_edit.score", "better": "both", "worse": "solo", "margin": -0.1},
        {"metric": "local_edit.score", "better": "both", "worse": "solo"},
        {"kind": "at_least", "metric": "change.local_edit.score", "value": 0.0},
        {"kind": "at_least", "metric": "change.t2i.score", "value": 0.05, "arms": ["solo"]}])
    results = [run("both", s, 0.80 + 0.01 * s, glob=0.7) for s in range(3)] + [run("solo", s, 0.82 + 0.01 * s) for s in range(3)]
    s = summarize(spec, results)
    noninferior, better, gained, t2i = s["claims"]
    assert noninferior["difference"] == pytest.approx(-0.02) and noninferior["verdict"] == "holds"
    assert better["verdict"] == "inconclusive" and better["ci95"] == pytest.approx(0.0227, abs=1e-3)  # Welch, df 4
    assert gained["verdict"] == "holds" and gained["per_arm"]["both"]["mean"] == pytest.approx(0.61)
    assert t2i["verdict"] == "does not hold" and list(t2i["per_arm"]) == ["solo"]  # 0.01 +- 0.025: all below 0.05
    assert s["arms"]["solo"]["metrics"]["global_edit.score"] is None and s["arms"]["both"]["metrics"]["global_edit.score"]["mean"] == pytest.approx(0.7)
    text = markdown(s, [])
    assert "by more than -0.1 → **holds**" in text and "| solo | 3 |" in text and "—" in text


def test_a_report_keeps_the_experiments_of_earlier_invocations(spec, tmp_path):
    """Running one more experiment into an existing report adds its section and keeps the others (their summaries
    and runs beside the report), in the report's order; re-running one replaces its section in place."""
    out, report = tmp_path / "out", tmp_path / "results.md"
    assert main(["experiment", str(spec), "--smoke", "--out", str(out), "--report", str(report)]) == 0
    other = tmp_path / "tiny2.yaml"
    other.write_text(spec.read_text().replace("name: tiny", "name: tiny2"))
    assert main(["experiment", str(other), "--smoke", "--out", str(out), "--report", str(report)]) == 0  # runs reused
    text = report.read_text()
    assert text.index("## tiny\n") < text.index("## tiny2\n") and text.count("| tiny | low beats high") == 1
    assert text.count("| tiny2 | low beats high") == 1
    assert main(["experiment", str(spec), "--smoke", "--out", str(out), "--report", str(report)]) == 0
    again = report.read_text()
    assert again.index("## tiny\n") < again.index("## tiny2\n") and again.count("## tiny\n") == 1


def test_shipped_specs_validate_and_make_results_runs_them_all():
    """Every spec (and every run config in it) validates, and `make results` regenerates the report from all."""
    import re
    from pathlib import Path

    from experiments.spec import load_spec

    specs = sorted(p.stem for p in Path("experiments/specs").glob("*.yaml"))
    for name in specs:
        spec = load_spec(f"experiments/specs/{name}.yaml")
        assert spec.name == name and len(spec.seeds) >= 3 and spec.claims, name
    listed = re.search(r"^EXPERIMENTS = (.*?)\n(?=\S)", Path("Makefile").read_text(), re.S | re.M).group(1)
    assert sorted(listed.replace("\\", " ").split()) == specs


def test_gap_closed_is_paired_by_seed_against_the_arm_without_the_field():
    from experiments.report import summarize
    from experiments.spec import ExperimentSpec

    def run(arm, seed, reward):
        return {"arm": arm, "seed": seed, "steps": 1, "history": [], "probes": {}, "before": None,
                "routes": {"realism": {"score": reward, "reward": reward, "teacher_reward": 1.0}}}

    spec = ExperimentSpec(name="r", base="experiments/base.yaml", arms={"with": {}, "without": {}}, claims=[
        {"kind": "gap_closed", "metric": "realism.reward", "better": "with", "worse": "without", "value": 0.5}])
    # seed s: without = 0.1 s, with = 0.1 s + 0.6 (1 - 0.1 s): every seed closes exactly 60% of its own gap
    results = [run("without", s, 0.1 * s) for s in range(3)] + [run("with", s, 0.1 * s + 0.6 * (1 - 0.1 * s)) for s in range(3)]
    [c] = summarize(spec, results)["claims"]
    assert c["share"] == pytest.approx(0.6) and c["ci95"] == pytest.approx(0.0, abs=1e-9) and c["verdict"] == "holds"
