"""An experiment spec (YAML): arms x seeds of one base config at an equal budget, and the claim it tests.

    name: query-position
    base: experiments/base.yaml        # a run or job config
    budget: {steps: 300}               # applied to every run: the arms differ only in their own overrides
    seeds: [0, 1, 2]
    trainer: reference                 # reference (in-process) or distributed (python -m trainer.main per run)
    trainers: {high: distributed}      # optional: per-arm trainer
    arms:
      low:  {method.query_position: low}
      high: {method.query_position: high}
    claim: {metric: t2i.score, better: low, worse: high, paper: "low-noise query beats high by 19.5%"}
    # or several: claims: [{...}, {kind: at_least, metric: change.t2i.score, value: -0.1, arms: [low]}]
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from danceopd.config import ConfigError, read_yaml_mapping, validate_config


class Claim(BaseModel):
    """compare: arm `better` beats arm `worse` on `metric` by more than `margin` (Welch 95% interval of the
    difference; a negative margin tests "not worse by more than |margin|").
    target: on every arm (or those in `arms`), `metric` is `value` within +-`tolerance` (the arm's 95% interval
    inside the band).
    at_least: on every arm (or those in `arms`), `metric` is above `value` (the arm's 95% interval above it).
    gap_closed: the share of the teacher-minus-`worse` gap on a reward `metric` (<route>.reward) that arm `better`
    closes, paired by seed: (better - worse) / (teacher - worse); above `value` (95% interval over seeds)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["compare", "target", "at_least", "gap_closed"] = "compare"
    metric: str = Field(description="<route>.<score|psnr_db|modes_hit|coverage|reward>, change.<route>.<key> (after minus "
                                    "before, needs eval_before), gap_closed.<route>, probe.<key>, or mean_score")
    better: str | None = None
    worse: str | None = None
    margin: float = 0.0
    value: float | None = None
    tolerance: float | None = Field(None, gt=0)
    arms: list[str] | None = None
    paper: str = ""

    @model_validator(mode="after")
    def _complete(self):
        if self.kind in ("compare", "gap_closed") and (self.better is None or self.worse is None):
            raise ValueError(f"a {self.kind} claim names the arms `better` and `worse`")
        if self.kind == "gap_closed" and (self.value is None or not self.metric.endswith(".reward")):
            raise ValueError("a gap_closed claim gives `value` and a `<route>.reward` metric")
        if self.kind == "target" and (self.value is None or self.tolerance is None):
            raise ValueError("a target claim gives `value` and `tolerance`")
        if self.kind == "at_least" and self.value is None:
            raise ValueError("an at_least claim gives `value`")
        return self

    def arms_named(self) -> list[str]:
        return [a for a in (self.better, self.worse) if a is not None] + list(self.arms or [])


class Probe(BaseModel):
    """cfg: fit the effective guidance scale w of the student sampled at each student scale beta, against the
    exact conditional / unconditional T2I fields: v = v_u + w (v_c - v_u). Stored as probe.w_b<beta> and
    probe.ratio_b<beta> = w / (alpha beta), alpha = the t2i route's cfg_alpha (1 when unset)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["cfg"]
    betas: list[float] = Field(default_factory=lambda: [1.0, 2.0], min_length=1)
    samples: int = Field(64, ge=4)


class Prepare(BaseModel):
    """A step that makes an input the runs need (e.g. a pre-trained initial student), run once if `creates`
    is missing. `{out}` in `creates`, `run` and in the spec's overrides stands for the experiments folder."""

    model_config = ConfigDict(extra="forbid")
    creates: str
    run: list[str] = Field(min_length=1, description="argv; 'python' is this interpreter; smoke runs append the smoke overrides")


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    about: str = Field("", description="what the experiment measures, and how its settings stand to the paper's and the "
                       "official toolkit's: printed under its section of the report")
    base: Path
    budget: dict = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    trainer: Literal["reference", "distributed"] = "reference"
    trainers: dict[str, Literal["reference", "distributed"]] = Field(default_factory=dict, description="per-arm trainer, "
                                                                     "overriding `trainer` (e.g. one arm on the distributed stack)")
    arms: dict[str, dict] = Field(min_length=1)
    claim: Claim | None = Field(None, description="one claim (shorthand for a one-item `claims`)")
    claims: list[Claim] = Field(default_factory=list)
    probe: Probe | None = None
    prepare: list[Prepare] = Field(default_factory=list)
    eval_before: bool = Field(False, description="also score the initial student (e.g. the reward gap a run closes)")

    @model_validator(mode="after")
    def _claim_arms(self):
        if self.claim is not None:
            self.claims, self.claim = [self.claim, *self.claims], None
        if set(self.trainers) - set(self.arms):
            raise ValueError(f"trainers names {sorted(set(self.trainers) - set(self.arms))}, not in arms ({sorted(self.arms)})")
        for claim in self.claims:
            for arm in claim.arms_named():
                if arm not in self.arms:
                    raise ValueError(f"claim names arm {arm!r}, which is not in arms ({sorted(self.arms)})")
            if claim.metric.startswith("change.") and not self.eval_before:
                raise ValueError(f"claim metric {claim.metric!r} compares with the initial student: set eval_before: true")
        if not self.base.exists():
            raise ValueError(f"base config {self.base} does not exist")
        return self


    def trainer_for(self, arm: str) -> str:
        return self.trainers.get(arm, self.trainer)


def load_spec(path: str | Path) -> ExperimentSpec:
    spec = validate_config(ExperimentSpec, read_yaml_mapping(path), str(path))
    from trainer.job import JobConfig
    from danceopd.config import load_config

    for arm, over in spec.arms.items():  # every run's config validates now, before anything trains
        values = {**spec.budget, **over, "seed": spec.seeds[0]}
        # a path under {out} is made by the spec's prepare steps: it is checked when the runs start
        values = {k: None if isinstance(v, str) and "{out}" in v else v for k, v in values.items()}
        try:
            load_config(spec.base, values, model=JobConfig)
        except ConfigError as e:
            raise ConfigError(f"{path}: arm {arm!r}: {e}") from None
    return spec
