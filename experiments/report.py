"""Aggregate experiment results: mean and 95% confidence interval per arm, the claim's verdict, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.spec import Claim, ExperimentSpec

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: float) -> float:
    return T95[max(1, min(30, round(df))) - 1] if df <= 30 else 1.96


def metric(result: dict, name: str) -> float:
    """'<route>.<key>', 'change.<route>.<key>' (after minus before), 'probe.<key>', 'gap_closed.<route>' (share of the teacher-minus-initial reward gap the
    run closed) or 'mean_score' (the mean of the routes' scores)."""
    if name == "mean_score":
        return sum(r["score"] for r in result["routes"].values()) / len(result["routes"])
    head, key = name.split(".", 1)
    if head == "probe":
        return float(result["probes"][key])
    if head == "change":  # after minus before (the initial student)
        route, key = key.split(".", 1)
        return float(result["routes"][route][key]) - float(result["before"][route][key])
    if head == "gap_closed":
        r, b = result["routes"][key], result["before"][key]
        return (r["reward"] - b["reward"]) / (r["teacher_reward"] - b["reward"])
    return float(result["routes"][head][key])


def mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, t95(n - 1) * math.sqrt(var / n)


def difference_ci(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch: mean(a) - mean(b) with a 95% half-width."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, float("nan")
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1)) + (vb ** 2 / (len(b) - 1))) if va + vb > 0 else 1
    return ma - mb, t95(df) * se


def verdict(diff: float, half: float) -> str:
    if math.isnan(half):
        return "inconclusive (one seed)"
    if diff - half > 0:
        return "holds"
    if diff + half < 0:
        return "reversed"
    return "inconclusive"


def metric_names(results: list[dict]) -> list[str]:
    """Every metric any run has (arms may train different routes), in a stable order."""
    names = []
    for r in results:
        for route, v in r["routes"].items():
            names += [f"{route}.{k}" for k in ("score", "psnr_db", "modes_hit", "coverage", "reward") if k in v]
            if "reward" in v and r.get("before"):
                names.append(f"gap_closed.{route}")
        names += [f"probe.{k}" for k in r.get("probes") or {}]
    return list(dict.fromkeys(names + ["mean_score"]))


def arm_metric(rs: list[dict], name: str) -> dict | None:
    """Mean and 95% half-width over the arm's seeds; None where the arm does not have the metric."""
    try:
        values = [metric(r, name) for r in rs]
    except KeyError:
        return None
    return dict(zip(("mean", "ci95"), mean_ci(values))) if values else None


def summarize(spec: ExperimentSpec, results: list[dict]) -> dict:
    names = metric_names(results)
    names += [c.metric for c in spec.claims if c.metric not in names]
    arms = {}
    for arm in spec.arms:
        rs = [r for r in results if r["arm"] == arm]
        arms[arm] = {"seeds": [r["seed"] for r in rs], "steps": [r["steps"] for r in rs],
                     "metrics": {m: arm_metric(rs, m) for m in names}}
    out = {"name": spec.name, "about": spec.about, "base": str(spec.base), "budget": spec.budget, "trainer": spec.trainer,
           "trainers": {arm: spec.trainer_for(arm) for arm in spec.arms}, "arms": arms}
    out["claims"] = [judge_claim(c, results, arms) for c in spec.claims]
    return out


def judge_claim(c: Claim, results: list[dict], arms: dict) -> dict:
    if c.kind == "compare":
        a = [metric(r, c.metric) for r in results if r["arm"] == c.better]
        b = [metric(r, c.metric) for r in results if r["arm"] == c.worse]
        diff, half = difference_ci(a, b)
        v = verdict(diff - c.margin, half)
        return {**c.model_dump(), "difference": diff, "ci95": half, "verdict": "does not hold" if c.margin and v == "reversed" else v}
    if c.kind == "gap_closed":  # paired by seed: the same seed's run without the field is the baseline
        route = c.metric.split(".")[0]
        base = {r["seed"]: r["routes"][route] for r in results if r["arm"] == c.worse}
        shares = [(r["routes"][route]["reward"] - base[r["seed"]]["reward"]) / (r["routes"][route]["teacher_reward"] - base[r["seed"]]["reward"])
                  for r in results if r["arm"] == c.better and r["seed"] in base]
        m, half = mean_ci(shares)
        return {**c.model_dump(), "share": m, "ci95": half, "verdict": verdict(m - c.value, half).replace("reversed", "does not hold")}
    per_arm = {}
    for arm in c.arms or list(arms):
        m, half = arms[arm]["metrics"][c.metric]["mean"], arms[arm]["metrics"][c.metric]["ci95"]
        lo, hi = m - (0 if math.isnan(half) else half), m + (0 if math.isnan(half) else half)
        if c.kind == "target":  # the arm's interval inside value +- tolerance
            inside = c.value - c.tolerance <= lo and hi <= c.value + c.tolerance
            outside = hi < c.value - c.tolerance or lo > c.value + c.tolerance
        else:  # at_least: the arm's interval above value
            inside, outside = lo > c.value, hi < c.value
        per_arm[arm] = {"mean": m, "ci95": half, "verdict": "holds" if inside else "does not hold" if outside else "inconclusive"}
    verdicts = {v["verdict"] for v in per_arm.values()}
    return {**c.model_dump(), "per_arm": per_arm, "verdict": verdicts.pop() if len(verdicts) == 1 else "mixed"}


def claim_line(c: dict) -> str:
    """One line: what was claimed, the measured effect with its 95% interval, and the verdict."""
    if c["kind"] == "compare":
        than = f" by more than {c['margin']:+g}" if c["margin"] else ""
        return (f"Claim ({c['paper'] or 'paper direction'}): `{c['metric']}` of **{c['better']}** minus **{c['worse']}** = "
                f"{c['difference']:+.3f} ± {c['ci95']:.3f} (95% CI){than} → **{c['verdict']}**.")
    if c["kind"] == "gap_closed":
        return (f"Claim ({c['paper'] or 'gap closed'}): **{c['better']}** closes {c['share']:.3f} ± {c['ci95']:.3f} (95% CI, paired by "
                f"seed) of the gap in `{c['metric']}` between **{c['worse']}** and the teacher; above {c['value']:g} → **{c['verdict']}**.")
    per = "; ".join(f"{a}: {v['mean']:.3f} ± {v['ci95']:.3f} ({v['verdict']})" for a, v in c["per_arm"].items())
    where = "on every arm" if not c["arms"] else "on " + ", ".join(c["arms"])
    band = f"= {c['value']:g} ± {c['tolerance']:g}" if c["kind"] == "target" else f"> {c['value']:g}"
    return f"Claim ({c['paper'] or c['kind']}): `{c['metric']}` {band} {where} → **{c['verdict']}** ({per})."


def plot(spec: ExperimentSpec, results: list[dict], summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    score_metrics = [m for m in metric_names(results) if m.endswith(".score")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(score_metrics), 3.2))
    width = 0.8 / len(spec.arms)
    for i, arm in enumerate(spec.arms):
        ms = summary["arms"][arm]["metrics"]
        xs = [j + i * width for j in range(len(score_metrics))]
        ax.bar(xs, [ms[m]["mean"] if ms[m] else math.nan for m in score_metrics], width,
               yerr=[0 if not ms[m] or math.isnan(ms[m]["ci95"]) else ms[m]["ci95"] for m in score_metrics],
               capsize=3, label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(score_metrics))], [m.split(".")[0] for m in score_metrics])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("student score (95% CI over seeds)")
    ax.set_title(spec.name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / f"{spec.name}-scores.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for arm in spec.arms:
        curves = [r["history"] for r in results if r["arm"] == arm and r["history"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # at equal wall time the seeds reach different steps: their common windows
        steps = [h["step"] for h in curves[0][:n]]
        mean_loss = [sum(sum(c[i]["loss"].values()) / len(c[i]["loss"]) for c in curves) / len(curves) for i in range(n)]
        ax.plot(steps, mean_loss, label=arm)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over routes, seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / f"{spec.name}-loss.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def markdown(summary: dict, plots: list[Path]) -> str:
    trainers = summary.get("trainers") or {}
    used = set(trainers.values()) or {summary["trainer"]}
    trainer = used.pop() if len(used) == 1 else ", ".join(f"{a}: {t}" for a, t in trainers.items())
    lines = [f"## {summary['name']}", ""] + ([" ".join(summary["about"].split()), ""] if summary.get("about") else [])
    lines += [f"Base `{summary['base']}`, budget `{json.dumps(summary['budget'])}`, trainer {trainer}.", ""]
    names = list(next(iter(summary["arms"].values()))["metrics"])
    lines.append("| arm | seeds | steps | " + " | ".join(names) + " |")
    lines.append("| --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
    for arm, a in summary["arms"].items():
        cells = [f"{a['metrics'][m]['mean']:.3f} ± {a['metrics'][m]['ci95']:.3f}" if a["metrics"][m] else "—" for m in names]
        steps = a["steps"]  # differ between seeds under a wall-time budget
        steps = f"{steps[0]}" if len(set(steps)) == 1 else f"{sum(steps) / len(steps):.0f} ({min(steps)}-{max(steps)})"
        lines.append(f"| {arm} | {len(a['seeds'])} | {steps} | " + " | ".join(cells) + " |")
    for c in summary["claims"]:
        lines += ["", claim_line(c)]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def claims_table(summaries: list[dict]) -> str:
    """Every claim of every experiment on one line: the measured effect, its 95% interval and the verdict."""
    lines = ["## Claims at a glance", "", "| experiment | claim | measured (95% CI) | verdict |", "| --- | --- | --- | --- |"]
    for summary in summaries:
        for c in summary["claims"]:
            if c["kind"] == "compare":
                what = f"`{c['metric']}` {c['better']} − {c['worse']}" + (f" > {c['margin']:g}" if c["margin"] else "")
                measured = f"{c['difference']:+.3f} ± {c['ci95']:.3f}"
            elif c["kind"] == "gap_closed":
                what = f"share of the `{c['metric']}` gap ({c['worse']} → teacher) that {c['better']} closes > {c['value']:g}"
                measured = f"{c['share']:.3f} ± {c['ci95']:.3f}"
            else:
                band = f"= {c['value']:g} ± {c['tolerance']:g}" if c["kind"] == "target" else f"> {c['value']:g}"
                what = f"`{c['metric']}` {band}"
                measured = "; ".join(f"{a} {v['mean']:.3f} ± {v['ci95']:.3f}" for a, v in c["per_arm"].items())
            lines.append(f"| {summary['name']} | {c['paper'] or ''}: {what} | {measured} | **{c['verdict']}** |")
    return "\n".join(lines + [""])


def diversity_table(summaries: list[dict]) -> str:
    """Every arm of every experiment that judges T2I: accuracy beside coverage of the teacher's modes."""
    keys = ("t2i.score", "t2i.modes_hit", "t2i.coverage")
    lines = ["## Diversity beside accuracy, every method", "",
             "T2I accuracy and coverage (student modes hit / teacher modes hit) for every arm above, 95% CI over seeds.", "",
             "| experiment | arm | " + " | ".join(keys) + " |", "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for summary in summaries:
        for arm, a in summary["arms"].items():
            if all(a["metrics"].get(k) for k in keys):
                lines.append(f"| {summary['name']} | {arm} | " + " | ".join(
                    f"{a['metrics'][k]['mean']:.3f} ± {a['metrics'][k]['ci95']:.3f}" for k in keys) + " |")
    return "\n".join(lines + [""])


def write_report(spec: ExperimentSpec, results: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(spec, results)
    plots = plot(spec, results, summary, out)
    (out / f"{spec.name}.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    (out / f"{spec.name}.md").write_text(markdown(summary, plots))
    return summary
