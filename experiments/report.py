"""Aggregate experiment results: mean and 95% confidence interval per arm, the claim's verdict, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.spec import ExperimentSpec

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: float) -> float:
    return T95[max(1, min(30, round(df))) - 1] if df <= 30 else 1.96


def metric(result: dict, name: str) -> float:
    """'<route>.<key>', 'probe.<key>', 'gap_closed.<route>' (share of the teacher-minus-initial reward gap the
    run closed) or 'mean_score' (the mean of the routes' scores)."""
    if name == "mean_score":
        return sum(r["score"] for r in result["routes"].values()) / len(result["routes"])
    head, key = name.split(".", 1)
    if head == "probe":
        return float(result["probes"][key])
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
    names = []
    for route, v in results[0]["routes"].items():
        names += [f"{route}.{k}" for k in ("score", "psnr_db", "modes_hit", "coverage", "reward") if k in v]
        if "reward" in v and results[0].get("before"):
            names.append(f"gap_closed.{route}")
    names += [f"probe.{k}" for k in results[0].get("probes") or {}]
    return names + ["mean_score"]


def summarize(spec: ExperimentSpec, results: list[dict]) -> dict:
    arms = {}
    for arm in spec.arms:
        rs = [r for r in results if r["arm"] == arm]
        arms[arm] = {"seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"] if rs else None,
                     "metrics": {m: dict(zip(("mean", "ci95"), mean_ci([metric(r, m) for r in rs]))) for m in metric_names(results)}}
    out = {"name": spec.name, "base": str(spec.base), "budget": spec.budget, "trainer": spec.trainer, "arms": arms}
    c = spec.claim
    if c is not None and c.kind == "compare":
        a = [metric(r, c.metric) for r in results if r["arm"] == c.better]
        b = [metric(r, c.metric) for r in results if r["arm"] == c.worse]
        diff, half = difference_ci(a, b)
        out["claim"] = {**c.model_dump(), "difference": diff, "ci95": half, "verdict": verdict(diff, half)}
    elif c is not None:  # target: each arm's interval inside value +- tolerance
        per_arm = {}
        for arm in spec.arms:
            m, half = arms[arm]["metrics"][c.metric]["mean"], arms[arm]["metrics"][c.metric]["ci95"]
            lo, hi = m - (0 if math.isnan(half) else half), m + (0 if math.isnan(half) else half)
            inside = c.value - c.tolerance <= lo and hi <= c.value + c.tolerance
            outside = hi < c.value - c.tolerance or lo > c.value + c.tolerance
            per_arm[arm] = {"mean": m, "ci95": half, "verdict": "holds" if inside else "does not hold" if outside else "inconclusive"}
        verdicts = {v["verdict"] for v in per_arm.values()}
        out["claim"] = {**c.model_dump(), "arms": per_arm, "verdict": verdicts.pop() if len(verdicts) == 1 else "mixed"}
    return out


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
        ax.bar(xs, [ms[m]["mean"] for m in score_metrics], width, yerr=[0 if math.isnan(ms[m]["ci95"]) else ms[m]["ci95"] for m in score_metrics],
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
        steps = [h["step"] for h in curves[0]]
        mean_loss = [sum(sum(c[i]["loss"].values()) / len(c[i]["loss"]) for c in curves) / len(curves) for i in range(len(steps))]
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
    lines = [f"## {summary['name']}", "", f"Base `{summary['base']}`, budget `{json.dumps(summary['budget'])}`, trainer {summary['trainer']}.", ""]
    names = list(next(iter(summary["arms"].values()))["metrics"])
    lines.append("| arm | seeds | " + " | ".join(names) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for arm, a in summary["arms"].items():
        cells = [f"{a['metrics'][m]['mean']:.3f} ± {a['metrics'][m]['ci95']:.3f}" for m in names]
        lines.append(f"| {arm} | {len(a['seeds'])} | " + " | ".join(cells) + " |")
    c = summary.get("claim")
    if c is not None and c["kind"] == "compare":
        lines += ["", f"Claim ({c['paper'] or 'paper direction'}): `{c['metric']}` of **{c['better']}** minus **{c['worse']}** = "
                      f"{c['difference']:+.3f} ± {c['ci95']:.3f} (95% CI) → **{c['verdict']}**."]
    elif c is not None:
        per = "; ".join(f"{a}: {v['mean']:.3f} ± {v['ci95']:.3f} ({v['verdict']})" for a, v in c["arms"].items())
        lines += ["", f"Claim ({c['paper'] or 'target'}): `{c['metric']}` = {c['value']:g} ± {c['tolerance']:g} on every arm → "
                      f"**{c['verdict']}** ({per})."]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(spec: ExperimentSpec, results: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(spec, results)
    plots = plot(spec, results, summary, out)
    (out / f"{spec.name}.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    (out / f"{spec.name}.md").write_text(markdown(summary, plots))
    return summary
