"""Typed run configuration (pydantic), validated before anything loads. One source of truth per setting."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from danceopd import offline
from danceopd.flow.query import POSITIONS
from danceopd.data.sources import DataSource
from danceopd.models import FAMILIES, ModelFamily, compatible, latent_space_difference
from danceopd.models.hub import check_model_name, looks_local, where
from danceopd.student import STUDENT_MARKER, StudentConfig, is_student_folder
from danceopd.teacher_model import TeacherModelSpec
from danceopd.text_embeddings import EncoderKey, TextEmbeddings
from danceopd.suite.buckets import check_capability
from danceopd.suite.world import TIERS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteConfig(_Strict):
    tier: Literal["basic", "hard"] = Field("basic", description="basic: 16x16 images with one object; hard: 32x32 with two "
                                                                "objects and a relation")
    tau: float = Field(0.0, ge=0.0, le=0.5, description="Gaussian smoothing of the exact teachers' references")
    seed: int = Field(0, description="seed of the suite's reference sets (its exact teachers and judges)")


class RouteConfig(_Strict):
    capability: str | None = Field(None, description="suite capability: its data bucket, judge and (by default) exact teacher; "
                                                     "optional when data.manifest feeds the route")
    weight: float = Field(1.0, ge=0.0, description="the route's share of updates (hard and adaptive routing), or its "
                                                   "weight in the soft mix")
    teacher: Literal["suite"] | TeacherModelSpec = Field("suite", description="'suite' (the exact field), a model folder / hub id, "
                                                         "or {base, checkpoint, loras, guidance}")
    cfg_alpha: float | None = Field(None, gt=0.0, description="wrap the teacher in CFG(alpha): absorbed guidance")

    @field_validator("capability")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        return v if v is None else check_capability(v)

    @field_validator("teacher", mode="before")
    @classmethod
    def _teacher_spec(cls, v):
        # A plain folder / hub id is a base model teacher; a local path must exist now, before anything loads.
        if isinstance(v, str) and v != "suite":
            check_model_name(v, "teacher folder")  # a missing path or an impossible hub id: say which, or 'suite'
            return {"base": v}
        return v

    @property
    def model_teacher(self) -> TeacherModelSpec | None:
        return None if self.teacher == "suite" else self.teacher


class DataConfig(_Strict):
    manifest: Path | None = Field(None, description="JSONL / Parquet rows (uid, route, prompt, source_image, target_image) "
                                                    "feeding each route's bucket; default: the capability suite")
    latent_cache: Path | None = Field(None, description="folder for VAE latents of manifest images (default: none, in memory)")
    latent_cache_entries: int = Field(4096, ge=1, description="latents each worker keeps in host memory (least recently used "
                                      "go; the latent_cache folder keeps every one): 1024 px SD3/FLUX latents are 1 MiB each")
    sources: list[DataSource] = Field(default_factory=list, description="caption folders, edit folders, Hugging Face datasets and "
                                      "manifests, each feeding the route it names (danceopd.data.sources); data.manifest is "
                                      "the shorthand for one manifest")
    image_dir: Path | None = Field(None, description="where images held inside datasets are written, once, content-addressed "
                                   "(default: <output_dir>/data-images)")
    eval_manifest: Path | None = Field(None, description="held-out rows to evaluate on (same columns; no uid of data.manifest); "
                                                         "default: data.eval_fraction of data.manifest's rows, never trained on")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="without data.eval_manifest: this share of each route's "
                                 "manifest rows (at least one) is held out of training for evaluation, chosen by uid")
    buckets: Literal["auto"] | list[tuple[int, int]] | None = Field(None, description="aspect-ratio buckets: auto (the standard "
                                 "ratios 1:1 to 16:9 at about student.resolution^2 pixels) or a list of [width, height]; each "
                                 "image goes to the bucket nearest its aspect ratio (resized to cover it, centre-cropped), "
                                 "every micro-batch is one bucket's. None: every image must be student.resolution square")
    validate_images_below: int = Field(100_000, ge=0, description="a source with fewer rows has every image header checked "
                                       "at start (a bad image fails the run before any model loads); a larger one is checked "
                                       "where buckets need image sizes, and rows whose image cannot be read are skipped, "
                                       "counted and reported (at start, or when drawn)")
    index: Path | None = Field(None, description="the image-size index (headers read once, reused by later starts and the "
                               "workers; default: <output_dir>/data-index.parquet)")

    @field_validator("buckets")
    @classmethod
    def _sizes(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one [width, height], or auto")
            bad = [list(b) for b in v if b[0] <= 0 or b[1] <= 0]
            if bad:
                raise ValueError(f"bucket sizes must be positive [width, height] pixels, got {bad}")
            v = list(dict.fromkeys(tuple(b) for b in v))
        return v

    @field_validator("manifest", "latent_cache", "eval_manifest", "image_dir", "index")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()  # Ray workers run in other working directories

    @model_validator(mode="after")
    def _one_way(self) -> "DataConfig":
        if self.manifest is not None and self.sources:
            raise ValueError("data.sources: give data.manifest (one manifest) or data.sources (a list, which may hold that "
                             "manifest), not both")
        for i, src in enumerate(self.sources):  # relative folders and files: from where the config is read
            p = Path(src.path).expanduser()
            if p.exists():
                src.path = str(p.resolve())
        return self

    @property
    def given(self) -> bool:
        """Whether the run's conditions come from data (a manifest or sources) rather than the capability suite."""
        return self.manifest is not None or bool(self.sources)


class MethodConfig(_Strict):
    routing: Literal["hard", "soft", "adaptive", "groups"] = Field("hard", description="hard: one field per update, drawn by "
                                                       "weight; soft: the weighted mix of all fields as target; adaptive: hard, with "
                                                       "weights moved toward routes whose loss stays high; groups (the official "
                                                       "toolkit's accumulation groups): every rank runs, in one optimizer step, each "
                                                       "route of method.groups for optim.grad_accum micro-batches, the loss divided by "
                                                       "grad_accum x len(groups)")
    groups: list[str] | None = Field(None, description="routing: groups: the routes of every step, in order (default: every route)")
    states: Literal["on_policy", "off_policy", "teacher_rollout"] = Field("on_policy",
            description="on_policy: the student's own rollout (DanceOPD); off_policy: forward-noised dataset targets; "
                        "teacher_rollout: the teacher's rollout")
    off_policy_share: float = Field(0.0, ge=0.0, lt=1.0, description="on_policy only: this share of each micro-batch's samples is "
                                    "queried at forward-noised dataset targets (same sigma, teacher target) instead of the rollout")
    target: Literal["teacher", "data"] = Field("teacher", description="'data' = plain flow matching (eps - x0), off_policy only")
    query_position: str = Field("low", description="which rollout state is queried: low (Beta(5,2) over the N states, the "
                                                   "paper's low noise), mid (Beta(5,5)), high (Beta(2,5)), uniform, "
                                                   "stratified, dense (all N)")
    k: int = Field(1, ge=1, le=64, description="states queried per sample (K); dense queries all N")
    query_sampling: Literal["distinct", "iid"] = Field("distinct", description="K > 1: distinct = K different states per "
                                                       "sample, sorted (the official toolkit: draws repeated until K are "
                                                       "distinct); iid = K independent draws (may repeat). Identical at K = 1")
    loss: Literal["mse", "dense", "dense_dt2"] = Field("mse", description="mse: the velocity MSE at the queried states; dense "
                                                        "(DiffusionOPD-style, query_position: dense): sum over the N states of "
                                                        "w_i x MSE_i, w_i by method.dense_weight; dense_dt2 = dense with dt2")
    dense_weight: Literal["uniform", "dt2"] = Field("uniform", description="dense loss weights: uniform = 0.5 / N^2 per state "
                                                     "(the official toolkit's; exact for a uniform grid), dt2 = dt_i^2 / 2 with "
                                                     "the grid's real step sizes dt_i = sigma_i - sigma_(i+1)")
    student_cfg_scale: float = Field(1.0, gt=0.0, description="the student's rollout and its prediction use CFG with this scale "
                                     "(an unconditional pass of the student, as the official toolkit's student_cfg_scale); 1.0 = "
                                     "none. The evaluation samples a trained student unguided; with guidance at inference, "
                                     "give the diffusers pipeline its guidance_scale")
    rollout_steps: int = Field(8, ge=1, le=100, description="N: Euler steps of the student's rollout (states visited from "
                                                            "sigma = 1)")
    schedule: Literal["uniform", "sd3", "family"] = Field("uniform", description="family: the student family's own grid "
                                                          "(SD3: static shift; FLUX: shift by the image's token count)")
    shift: float = Field(1.0, gt=0.0, description="the time shift of the sd3 schedule (sigma' = shift sigma / (1 + (shift "
                                                  "- 1) sigma))")
    staleness: int = Field(0, ge=0, le=1, description="1: the one-step-stale schedule: a step trains on states rolled out "
                           "(and sent to the teacher) before the previous update, so the teacher works while the student "
                           "trains; the pipeline refills at every checkpoint, which keeps resume exact")

    @field_validator("query_position")
    @classmethod
    def _position(cls, v: str) -> str:
        if v not in POSITIONS:
            raise ValueError(f"unknown query_position {v!r}: choose from {list(POSITIONS)}")
        return v

    @property
    def queried_states(self) -> int:
        """States each sample's student prediction and teacher query carry: N under dense, else K (distinct sampling
        queries each of the N states at most once)."""
        if self.query_position == "dense":
            return self.rollout_steps
        return min(self.k, self.rollout_steps) if self.query_sampling == "distinct" else self.k

    @model_validator(mode="after")
    def _consistent(self) -> "MethodConfig":
        if self.loss == "dense_dt2":  # the older spelling: dense with the dt^2 / 2 weights
            self.loss, self.dense_weight = "dense", "dt2"
        if self.loss == "dense" and self.query_position != "dense":
            raise ValueError("loss 'dense' weights every rollout state: set query_position: dense")
        if self.groups is not None and self.routing != "groups":
            raise ValueError(f"method.groups is used by routing: groups, not {self.routing!r}")
        if self.groups is not None and not self.groups:
            raise ValueError("method.groups: name at least one route (or leave it out for every route)")
        if self.target == "data" and self.states != "off_policy":
            raise ValueError("target 'data' (plain flow matching) needs states: off_policy")
        if self.off_policy_share > 0 and self.states != "on_policy":
            raise ValueError("off_policy_share mixes dataset states into on-policy rollouts: set states: on_policy (or the share to 0)")
        return self


class ExecutionConfig(_Strict):
    """How a run executes, never what it computes: with any of these on or off the losses and weights are the
    same bit for bit (tested). Each exists so that its speed-up can be measured alone (benchmarks/step.py)."""

    truncate_rollout: bool = Field(True, description="each sample's rollout stops at its deepest queried state "
                                   "(both trainers; dense K = N still skips only the last, unqueried step)")
    rollout_chunk: int | Literal["auto"] | None = Field(None, description="rows per student call in a truncated "
                                                         "rollout (a multiple of 4, at least 16); None: the whole batch; auto: on "
                                                         "CPU 8 per torch thread, at least 16 (a chunk's activations stay in a core's L2 cache: the "
                                                         "rollout alone runs 10-15% faster, but the distributed job ran 7% "
                                                         "slower with it, benchmarks/step.py), on GPU the whole batch")
    overlap_teacher: bool = Field(True, description="distributed: send each micro-batch's teacher query as soon as its "
                                  "states exist (every micro-batch of a step before any is awaited) and wait only when "
                                  "its loss needs the target; the student's forward runs meanwhile")
    prefetch_routing: bool = Field(True, description="distributed: ask the router for the next step's assignment ahead and "
                                   "send loss reports without waiting (hard routing; adaptive weights follow the reports, "
                                   "so there each report is delivered before the next assignment is asked)")
    find_unused_parameters: bool | None = Field(None, description="distributed: DDP's unused-parameter search (an extra graph "
                                                "walk per step); None = probe every route once at start-up and search "
                                                "only if some trainable parameter gets no gradient")

    @field_validator("rollout_chunk")
    @classmethod
    def _quantum(cls, v):
        if isinstance(v, int) and (v < 16 or v % 4):
            raise ValueError(f"must be a multiple of 4 rows and at least 16 (what keeps truncated rollouts bit-identical on "
                             f"every processor measured, danceopd.flow.solver.MIN_ROWS), got {v}")
        return v


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0.0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas (the suite's default; the official toolkit and the "
                                       "paper recipes: torch's 0.9, 0.999)")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon (torch's and the official toolkit's 1e-8)")
    grad_clip: float = Field(1.0, gt=0.0, description="gradient norm clipping")
    warmup_steps: int = Field(20, ge=0, description="linear learning-rate warm-up steps")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decay to min_lr_ratio x lr at `steps`")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine schedule: the final learning rate as a share of "
                                                                 "lr")
    batch_size: int = Field(32, ge=1, description="samples per micro-batch")
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0, description="EMA of the weights that is evaluated and saved; 0 = off")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer update (the loss is averaged over them)")
    states_per_backward: int | None = Field(None, ge=1, description="at most this many queried states (rows of a micro-batch x "
                                            "its queried states) per forward + backward of the student, the micro-batch's loss "
                                            "summed over the chunks: the same gradient up to rounding, activations for this many "
                                            "states only. For the dense loss (N states per sample) on a large model; null: all "
                                            "at once")
    max_nonfinite_steps: int = Field(10, ge=1, description="updates in a row whose loss or gradient is not finite (each one "
                                                          "skipped: weights, optimizer and EMA unchanged) before the run stops")


class EvalConfig(_Strict):
    samples_per_capability: int = Field(96, ge=1, description="suite judges: samples scored per route")
    sampling_steps: int = Field(16, ge=1, description="Euler steps when the evaluation samples (teachers and student "
                                                      "alike)")
    schedule: Literal["uniform", "sd3", "family"] = Field("uniform", description="sigma grid of evaluation sampling: "
                                                                                 "uniform, sd3 (shifted) or the family's "
                                                                                 "own")
    shift: float = Field(1.0, gt=0.0, description="the sd3 schedule's shift for evaluation sampling")
    samples_per_condition_in_grid: int = Field(4, ge=1, description="samples per condition in grid.png (several, so that "
                                                                    "mode collapse shows)")
    seed: int = Field(12345, description="seed of the evaluation's conditions and noise (the same for every run and "
                                         "checkpoint)")
    velocity_error_samples: int = Field(16, ge=1, description="held-out conditions per route for the velocity error")
    every: int = Field(0, ge=0, description="during training (with or without --eval): every this many steps, and at step 0, "
                       "render each route's held-out conditions with fixed noise (teacher | student) into "
                       "<run_dir>/samples/step-XXXXXX.png and TensorBoard (tag samples), with the velocity error per route as a "
                       "curve; 0 = off")
    sample_size: int = Field(512, ge=16, description="tile side of those sample grids: the training resolution, at most this")
    clip_model: str | None = Field(None, description="a CLIP checkpoint (folder or hub id): also report the CLIP score of "
                                                    "teacher and student samples on prompted routes")

    @field_validator("clip_model")
    @classmethod
    def _clip_exists(cls, v: str | None) -> str | None:
        if v is not None and looks_local(check_model_name(v, "CLIP folder")):
            return str(Path(v).expanduser().resolve())
        return v


def _installed(module: str, key: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"the {module} package is not installed: pip install {module} (or pip install 'danceopd-serve[tracking]'), "
                         f"or remove {key}")


class WandbOptions(_Strict):
    project: str = Field("danceopd", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (team or user); default: the account's")
    mode: Literal["offline", "online"] = Field("offline", description="offline: written under <run_dir>/wandb, no network "
                                                                      "(`wandb sync` uploads it later)")

    @model_validator(mode="after")
    def _available(self) -> "WandbOptions":
        _installed("wandb", "tracking.wandb")
        return self


class MlflowOptions(_Strict):
    tracking_uri: str | None = Field(None, description="default: a local file store, <run_dir>/mlruns")
    experiment: str = Field("danceopd", description="MLflow experiment name")

    @model_validator(mode="after")
    def _available(self) -> "MlflowOptions":
        _installed("mlflow", "tracking.mlflow")
        return self


class TrackingConfig(_Strict):
    """Where a run's curves and sample grids go (rank 0 writes). TensorBoard always unless turned off; W&B and MLflow
    are added through their own libraries."""

    tensorboard: bool = Field(True, description="event files under <run_dir>/tensorboard (train/ and eval/)")
    wandb: WandbOptions | None = Field(None, description="Weights & Biases (true, or its options); off by default")
    mlflow: MlflowOptions | None = Field(None, description="MLflow (true, or its options); off by default")

    @field_validator("wandb", "mlflow", mode="before")
    @classmethod
    def _on(cls, v):  # `tracking.wandb=true` on the command line: the defaults
        return {} if v is True else (None if v is False else v)


class TrainConfig(_Strict):
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$", description="the run's name: its outputs go to "
                                                                           "<output_dir>/<run_name>; a re-run of the same "
                                                                           "name resumes it")
    output_dir: Path = Field(Path("runs"), description="where runs write (relative to the working directory; shared "
                                                       "storage on a multi-node cluster)")
    seed: int = Field(0, description="the run seed: every random draw is a function of (seed, purpose, step, rank, "
                                     "micro-batch)")
    steps: int = Field(600, ge=1, description="optimizer updates the run plans (the learning-rate schedule ends here)")
    max_minutes: float | None = Field(None, gt=0, description="stop early (after a checkpoint) past this wall time")
    device: str = Field("auto", description="auto (cuda when this process or worker has a GPU, else cpu), cpu, cuda or "
                                            "cuda:N")
    dtype: str = Field("float32", description="the frozen base's dtype and the autocast dtype: bfloat16 (GPUs), float32, or "
                                             "auto; trainable weights, optimizer and EMA are float32 whatever it is")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per trainer process; default torch's "
                                                              "own choice")
    suite: SuiteConfig = Field(SuiteConfig(), description="the capability suite (exact teachers, pixel judges): the "
                                                          "dataset when no data is given")
    data: DataConfig = Field(DataConfig(), description="training data: manifests, caption or edit folders, datasets; "
                                                       "buckets and held-out rows")
    student: StudentConfig = Field(StudentConfig(), description="the student: a diffusers base (LoRA or full) or the "
                                                                "suite's pixel model")
    init_from: Path | None = Field(None, description="start from a saved student folder instead of random init")
    routes: dict[str, RouteConfig] = Field(default_factory=lambda: {
        "t2i": RouteConfig(capability="t2i"),
        "local_edit": RouteConfig(capability="local_edit"),
        "global_edit": RouteConfig(capability="global_edit"),
    }, description="route name -> its capability, weight and frozen teacher (each update is routed to one)")
    method: MethodConfig = Field(MethodConfig(), description="the distillation method: states, query positions, loss, "
                                                             "routing, rollout and schedule")
    execution: ExecutionConfig = Field(ExecutionConfig(), description="how the step executes (never what it computes)")
    optim: OptimConfig = Field(OptimConfig(), description="AdamW, learning-rate schedule, micro-batches and EMA")
    eval: EvalConfig = Field(EvalConfig(), description="evaluation with --eval, and sample grids during training")
    tracking: TrackingConfig = Field(TrackingConfig(), description="experiment tracking: TensorBoard, Weights & Biases, "
                                                                   "MLflow")
    log_every: int = Field(10, ge=1, description="steps per log window (a progress line, metrics and tracked curves)")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (and the one-step-stale schedule's "
                                                         "refills)")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk")
    _manifest = PrivateAttr(None)  # the validated data.manifest's training rows (loaded once, at validation)
    _eval_manifest = PrivateAttr(None)  # its held-out rows, or data.eval_manifest
    _bucket_sizes = PrivateAttr(None)  # data.buckets resolved to (width, height) pairs (auto: the family's standard set)
    _data_absent = PrivateAttr(False)  # validated without its data (offline.models_only: danceopd plan on a head node)

    @field_validator("init_from")
    @classmethod
    def _student_folder(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        v = v.expanduser()
        if not is_student_folder(v):
            raise ValueError(f"{v} is not a saved student folder (no {STUDENT_MARKER}): give a run's student/ folder "
                             "(e.g. runs/pretrain-t2i/student), or run `make pixel-base` for assets/pixel-t2i-base")
        return v.resolve()  # Ray workers run in other working directories

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        size = TIERS[self.suite.tier].size
        pixel = self.student.model_family.name == "pixel"
        if pixel and self.student.sample_size != size:
            raise ValueError(f"student.sample_size is {self.student.sample_size} but suite tier {self.suite.tier!r} has {size}x{size} images: set student.sample_size: {size}")
        if not self.routes:
            raise ValueError("routes is empty: name at least one capability route")
        if sum(r.weight for r in self.routes.values()) <= 0:
            raise ValueError("routes: at least one route needs weight > 0")
        if self.dtype in ("float16", "fp16"):
            raise ValueError(f"dtype {self.dtype!r}: training in float16 needs loss scaling, which the trainers do not do (small "
                             "gradients underflow to zero, and FLUX's activations overflow float16); use bfloat16 (NVIDIA Ampere "
                             "or newer: A100, H100, L40, RTX 30xx) or float32. Teachers may still serve in float16 "
                             "(services.teacher_defaults.dtype): they compute no gradients")
        if self.dtype not in ("float32", "fp32", "bfloat16", "bf16", "auto"):
            raise ValueError(f"dtype {self.dtype!r}: use bfloat16, float32 or auto (bfloat16 on a GPU that has it, else float32)")
        unknown = [g for g in self.method.groups or [] if g not in self.routes]
        if unknown:
            raise ValueError(f"method.groups: unknown routes {unknown}; the routes are {list(self.routes)}")
        for name, route in self.routes.items():
            if route.capability is None and not self.data.given:
                raise ValueError(f"routes.{name}.capability: required without data.manifest (the suite is the dataset)")
        self._check_buckets(pixel)
        if self.data.given:
            self._check_manifest()
        elif self.student.text_embeddings == "precompute":
            raise ValueError("student.text_embeddings 'precompute' needs the run's prompts listed (data.manifest): the suite "
                             "draws its prompts; use auto or on_device")
        m = self.method
        if (m.states == "off_policy" or m.off_policy_share > 0) and (not pixel or self.data.given):
            raise ValueError("method.states: off-policy states forward-noise dataset targets, which only the suite's pixel model "
                             "has for now: use states: on_policy (or teacher_rollout) with off_policy_share: 0")
        self._check_teachers(pixel)
        if self.student.text_embeddings == "precompute" and self.text_sees_source():
            raise ValueError("student.text_embeddings 'precompute': a Qwen-Image-Edit text encoder reads the source image, so its "
                             "embeddings are per (prompt, image) and a prompt-keyed store cannot hold them; use auto or on_device "
                             "(encoded where needed, cached per (prompt, source))")
        return self

    def _check_buckets(self, pixel: bool) -> None:
        from danceopd.data.buckets import standard_buckets

        b = self.data.buckets
        if b is None:
            return
        if pixel:
            raise ValueError("data.buckets: the suite's pixel model has one image size; aspect-ratio buckets are for model "
                             "families (sd3, flux, ...): remove data.buckets")
        if not self.data.given:
            raise ValueError("data.buckets: buckets come from the data's images; give data.sources or data.manifest (the suite's "
                             "prompts have no images)")
        family = self.student.model_family
        m = family.size_multiple(self.student.base)
        sizes = standard_buckets(self.student.resolution, m) if b == "auto" else list(b)
        bad = [list(x) for x in sizes if x[0] % m or x[1] % m]
        if bad:
            raise ValueError(f"data.buckets: {bad}: a {family.name} model ({self.student.base}) takes image sides that are "
                             f"multiples of {m} (its VAE's factor x its patch); round them, or use auto")
        self._bucket_sizes = sizes

    def group_routes(self) -> list[str] | None:
        """routing: groups: the routes every optimizer step runs, in order (method.groups, default every route); else None."""
        if self.method.routing != "groups":
            return None
        return list(self.method.groups or self.routes)

    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The run's aspect-ratio buckets as (width, height) (data.buckets resolved), or None (one square size)."""
        return self._bucket_sizes

    def data_index(self) -> Path:
        """Where image sizes are indexed (data.index, or <output_dir>/data-index.parquet)."""
        return self.data.index or Path(self.output_dir).expanduser().resolve() / "data-index.parquet"

    def _check_manifest(self) -> None:
        if offline.active() and self._data_missing():
            self._data_absent = True  # danceopd plan without the data: planned from the routes, teachers and buckets
            return
        if self.data.sources:
            return self._check_sources()
        manifest = self._load_manifest("manifest")
        if self.data.eval_manifest is None:
            try:
                self._manifest, self._eval_manifest = manifest.held_out(self.data.eval_fraction)
            except ValueError as e:
                raise ValueError(f"data.eval_fraction: {e}") from None
            return
        held = self._load_manifest("eval_manifest")
        shared = sorted({r.uid for r in manifest.rows} & {r.uid for r in held.rows})
        if shared:
            raise ValueError(f"data.eval_manifest: uids {shared[:5]} are also in data.manifest: held-out rows must never be "
                             "trained on; remove them from one of the files")
        self._manifest, self._eval_manifest = manifest, held

    def _data_missing(self) -> bool:
        """Inside offline.models_only(): whether some data file or folder is not on this machine (each one noted)."""
        d = self.data
        local = [(f"data.{k}", getattr(d, k)) for k in ("manifest", "eval_manifest") if getattr(d, k) is not None]
        local += [(f"data.sources.{i}", Path(s.path)) for i, s in enumerate(d.sources)]
        missing = [offline.skipped(f"{key} {path}: not on this machine (the plan assumes its prompts listed, its edit routes "
                                   "those whose teacher reads source images)") for key, path in local if not Path(path).expanduser().exists()]
        return any(missing)

    def _check_sources(self) -> None:
        """Every source validated once, here; each source's held-out share split apart before they are merged."""
        from danceopd.data.manifest import HeaderIndex, ManifestError
        from danceopd.data.sources import load_source, merge

        res, routes = self.student.resolution, list(self.routes)
        image_dir = self.data.image_dir or Path(self.output_dir).expanduser().resolve() / "data-images"
        index = HeaderIndex(self.data_index())
        train, held = [], []
        for i, src in enumerate(self.data.sources):
            try:
                manifest = load_source(src, f"data.sources.{i}", routes, (res, res), image_dir, self.bucket_sizes(), index,
                                       self.data.validate_images_below)
            except ManifestError as e:
                raise ValueError(f"data.sources.{i}: {e}") from None
            self._report_skipped(f"data.sources.{i}", manifest)
            if self.data.eval_manifest is None:
                try:
                    t, h = manifest.held_out(self.data.eval_fraction)
                except ValueError as e:
                    raise ValueError(f"data.sources.{i}: data.eval_fraction: {e}") from None
                train.append(t)
                held.append(h)
            else:
                train.append(manifest)
        self._manifest = merge(train, "data.sources", self.bucket_sizes())
        empty = sorted(set(self.routes) - set(self._manifest.routes()))
        if empty:
            raise ValueError(f"data.sources: no rows for routes {empty}: add a source that feeds them")
        if self.data.eval_manifest is None:
            self._eval_manifest = merge(held, "data.sources (held out)", self.bucket_sizes())
            return
        held_rows = self._load_manifest("eval_manifest")
        shared = sorted({r.uid for r in self._manifest.rows} & {r.uid for r in held_rows.rows})
        if shared:
            raise ValueError(f"data.eval_manifest: uids {shared[:5]} are also in data.sources: held-out rows must never be trained on")
        self._eval_manifest = held_rows

    def _load_manifest(self, key: str):
        from danceopd.data.manifest import HeaderIndex, ManifestError
        from danceopd.data.sources import DataSource, load_source

        res = self.student.resolution
        file = getattr(self.data, key)
        if not file.is_file():
            raise ValueError(f"data.{key}: {file}: manifest file does not exist")
        try:  # as a manifest source: a large one's validated rows are kept for later starts and the workers
            manifest = load_source(DataSource(path=str(file), kind="manifest"), f"data.{key}", list(self.routes), (res, res),
                                   Path(), self.bucket_sizes(), HeaderIndex(self.data_index()), self.data.validate_images_below)
        except ManifestError as e:
            raise ValueError(f"data.{key}: {e}") from None
        self._report_skipped(f"data.{key}", manifest)
        empty = sorted(set(self.routes) - set(manifest.routes()))
        if empty:
            raise ValueError(f"data.{key}: no rows for routes {empty} (rows name their route in the 'route' column)")
        return manifest

    @staticmethod
    def _report_skipped(key: str, manifest) -> None:
        """Rows of a large source set aside because their image cannot be read: said once, never silently."""
        if manifest.skipped:
            import logging

            first = "; ".join(str(p) for p in manifest.skipped[:3])
            logging.getLogger("danceopd.data").warning(f"{key}: {len(manifest.skipped)} rows skipped, their image cannot be read "
                                                       f"(first: {first})")

    def _check_teachers(self, pixel: bool) -> None:
        student = self.student.model_family
        for name, route in self.routes.items():
            spec = route.model_teacher
            if spec is None:
                if not pixel:
                    raise ValueError(f"routes.{name}.teacher: the suite's exact teachers work in the pixel model's space; "
                                     f"a {student.name} student needs model teachers ({{base, loras, ...}})")
                continue
            base = spec.base or self.student.base
            if base is None:
                raise ValueError(f"routes.{name}.teacher.base: required when the student has no base")
            family = self.teacher_family(name)
            if family is None:
                raise ValueError(f"routes.{name}.teacher.family: the base {where(base)} is not on this machine, so its "
                                 f"model_index.json cannot say its family: run `danceopd prefetch --config <this config>` first, "
                                 f"or set routes.{name}.teacher.family ({sorted(n for n in FAMILIES if n != 'pixel')})")
            if not compatible(student, family):
                raise ValueError(f"routes.{name}.teacher: a {family.name} teacher ({base}) cannot teach a {student.name} "
                                 f"student: they work in different latent spaces; use a {student.name}-family teacher or student")
            if self.student.base is not None and (why := latent_space_difference(self.student.base, base)):
                raise ValueError(f"routes.{name}.teacher.base: {base} is not in the student's latent space ({self.student.base}): "
                                 f"{why}; a teacher must share the student's VAE")
            try:
                spec.check_files(base)
            except ValueError as e:
                raise ValueError(f"routes.{name}.teacher.{e}") from None
        if not pixel:
            edits = [name for name in self.routes if self.route_takes_source(name)]
            if edits and not student.native_source:
                if student.name != "sd3":
                    raise ValueError(f"routes.{edits[0]}: an edit route needs a student that reads source images; "
                                     f"{student.name} has no image input (use a flux-kontext base for FLUX edits)")
                self.student.edit_input = True  # SD3: source latents on grown, zero-initialised input channels
            for name in edits:
                spec = self.routes[name].model_teacher
                if spec.reads_source(spec.base or self.student.base) is False:
                    raise ValueError(f"routes.{name}.teacher: an edit route needs a teacher that reads source images "
                                     "(a Kontext model, or a DanceOPD student folder trained for edits)")

    @property
    def manifest(self):
        """The rows training draws from (danceopd.data.Manifest): data.manifest less its held-out rows; None when the
        suite is the dataset."""
        return self._manifest

    @property
    def eval_manifest(self):
        """The held-out rows evaluation draws from: data.eval_manifest, or data.manifest's held-out share."""
        return self._eval_manifest

    def with_rows_written(self, folder: Path) -> "TrainConfig":
        """This config with data.sources replaced by the rows they validated to, written to `folder` as a training and a
        held-out manifest (absolute image paths): the Ray workers, which validate their config again, read two files
        and never reopen folders, datasets or the hub."""
        if not self.data.sources:
            return self
        import json

        from danceopd.data.manifest import HeaderIndex
        from danceopd.data.sources import remember_rows

        folder = Path(folder).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, manifest in (("train", self._manifest), ("held-out", self._eval_manifest)):
            lines = [json.dumps({"uid": r.uid, "route": r.route, "prompt": r.prompt,
                                 **{c: str(getattr(r, c)) for c in ("source_image", "target_image") if getattr(r, c) is not None}})
                     for r in manifest.rows]
            files[name] = folder / f"{name}.jsonl"
            tmp = files[name].with_suffix(".tmp")
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            tmp.replace(files[name])
            res = self.student.resolution  # the workers validate these files again: a large one finds its rows kept
            remember_rows(files[name], manifest, list(self.routes), (res, res), self.bucket_sizes(), self.data.validate_images_below,
                          HeaderIndex(self.data_index()))
        data = self.data.model_copy(update={"sources": [], "manifest": files["train"], "eval_manifest": files["held-out"]})
        return self.model_copy(update={"data": data})

    def run_prompts(self) -> list[str] | None:
        """Every prompt the run encodes: its data rows, its held-out rows and "" (CFG's unconditional half); None when
        the suite draws them."""
        if self._manifest is None:
            return None
        rows = [*self._manifest.rows, *self._eval_manifest.rows]
        return list(dict.fromkeys(["", *(r.prompt for r in rows)]))

    def text_embeddings(self) -> TextEmbeddings:
        """student.text_embeddings resolved (auto: precompute for a listed prompt set within the bound) with its store."""
        st = self.student
        mode = st.text_embeddings
        if mode == "auto":
            from danceopd.student import read_student_config

            prompts = self.run_prompts()
            model = read_student_config(self.init_from) if self.init_from else st  # the model the student loads
            listed = model.base is not None and (self._data_absent or prompts is not None and len(prompts) <= st.precompute_max_prompts)
            mode = "precompute" if listed and not self.text_sees_source() else "on_device"
        store = (st.text_embeddings_store or Path(self.output_dir) / "text-embeddings").expanduser().resolve()
        return TextEmbeddings(mode, str(store) if mode == "precompute" else None)

    def text_sees_source(self) -> bool:
        """Whether the student's or a teacher's text encoder reads source images (Qwen-Image-Edit): its embeddings are per
        (prompt, image), which a prompt-keyed store cannot hold."""
        families = [self.student.model_family] + [self.teacher_family(name) for name in self.routes]
        return any(getattr(f, "text_sees_source", False) for f in families if f is not None)

    def teacher_family(self, route: str) -> ModelFamily | None:
        """The family of a route's model teacher, by the one rule the student, validation, the plan, the job's teachers and
        their replicas share: the teacher's `family` key; else its base's model_index.json (a local folder, a DanceOPD
        student folder, or a hub id in the Hugging Face cache); else the student's family when the base is the student's.
        None for a suite teacher, and for a hub id that is none of these (validation refuses it, naming the key)."""
        spec = self.routes[route].model_teacher
        if spec is None:
            return None
        base = spec.base or self.student.base
        found = spec.model_family(base)
        if found is None and base == self.student.base:
            return self.student.model_family
        return found

    def text_encoder_keys(self, student_dtype: str, teacher_dtypes: dict[str, str]) -> list[EncoderKey]:
        """The encoders a precompute run stores embeddings of: the student's, and each model teacher route's with its dtype
        (`teacher_dtypes`: route -> dtype name). A teacher that is a DanceOPD student folder keeps its own encoders."""
        from danceopd.student import is_student_folder, read_student_config

        st = read_student_config(self.init_from) if self.init_from else self.student  # the encoders the student loads
        family = st.model_family
        keys = [EncoderKey(st.base, family.name, student_dtype, st.max_sequence_length or family.default_max_sequence_length)]
        for name, route in self.routes.items():
            spec = route.model_teacher
            base = spec and (spec.base or st.base)
            if spec is None or is_student_folder(base):
                continue
            f = self.teacher_family(name)
            keys.append(EncoderKey(base, f.name, teacher_dtypes[name], spec.max_sequence_length or f.default_max_sequence_length))
        return list(dict.fromkeys(keys))

    def route_takes_source(self, name: str) -> bool:
        """Whether a route's conditions carry a source image: its data rows' (an edit route), or its suite capability's.
        Validated without its data (danceopd plan on a head node), a route edits where its capability says so or where both
        its teacher and the student read source images natively (a Kontext-style teacher of a Kontext-style student)."""
        route = self.routes[name]
        if self._manifest is not None:
            return self._manifest.bucket(name).takes_source
        if self._data_absent:
            teacher = self.teacher_family(name)
            if teacher is not None and teacher.native_source and self.student.model_family.native_source:
                return True
        return route.capability in ("local_edit", "global_edit")

    def planned_image_size(self) -> tuple[tuple[int, int], str | None]:
        """((width, height) the memory plan sizes activations for, why when not the square resolution): the largest
        aspect-ratio bucket the run draws (its data's buckets; every bucket when validated without its data)."""
        res = self.student.resolution
        sizes = self.bucket_sizes()
        if not sizes:
            return (res, res), None
        if self._manifest is not None:
            drawn = {b for r in self._manifest.routes() for b in (self._manifest.bucket(r).size_shares() or {})}
            sizes = [s for s in sizes if s in drawn] or sizes
        w, h = max(sizes, key=lambda s: (s[0] * s[1], s))
        return (w, h), None if self._manifest is not None else f"data.buckets without the data: planned for the largest bucket, {w}x{h}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested settings as dotted keys ({'optim': {'lr': 1}} -> {'optim.lr': 1})."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(before: dict, now: dict) -> dict[str, tuple]:
    """The dotted keys whose values differ between two nested settings: key -> (before, now); '<unset>' if absent."""
    a, b = flatten(before), flatten(now)
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")}


# pydantic's names for the forms of a union in an error's location (a form's validator, a literal, a model class): not keys
_UNION_TAG = re.compile(r"^((function-(after|before|wrap|plain)|literal|union|tagged-union|nullable|list|dict)\[.*\]|"
                        r"[A-Z][A-Za-z0-9]*(Spec|Config|Options))$")


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, named by its dotted key. A value that may take several forms (routes.<r>.teacher: 'suite' or
    a model spec) fails in each; the form the value was written in is the one reported."""
    errors = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not _UNION_TAG.match(str(p)))
        errors.append((loc, e))
    lines = [f"invalid configuration in {source}:"]
    for loc, e in errors:
        other_form = e["type"] == "literal_error" and any(o is not e and o_loc[:len(loc)] == loc for o_loc, o in errors)
        if not other_form:
            lines.append(f"  {'.'.join(loc) or '(top level)'}: {e['msg']}")
    return "\n".join(dict.fromkeys(lines))


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; ConfigError (naming the file) otherwise."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of settings at the top level")
    return data


def validate_config(model: type[BaseModel], data: dict, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


ConfigPaths = str | Path | list[str | Path] | tuple[str | Path, ...] | None


def config_files(paths: ConfigPaths) -> list[Path]:
    """One config path, several (a recipe, then overlays such as configs/smoke.yaml), or none (the embedded defaults)."""
    if paths is None:
        return []
    return [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]


def overlay(base: dict, over: dict) -> dict:
    """`over` laid on `base` key by key: mappings merge recursively, any other value (a list, a scalar, null) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def read_config_files(paths: ConfigPaths) -> dict:
    """The settings of one or more YAML files, later files laid over earlier ones key by key."""
    data: dict = {}
    for p in config_files(paths):
        data = overlay(data, read_yaml_mapping(p))
    return data


def describe_sources(paths: ConfigPaths) -> str:
    """How a config's origin is named in messages: 'a.yaml + b.yaml', or 'embedded defaults'."""
    return " + ".join(str(p) for p in config_files(paths)) or "embedded defaults"


def load_config(path: ConfigPaths = None, overrides: dict | None = None, model: type[BaseModel] = TrainConfig):
    """Load YAML config files (later ones overriding earlier ones key by key; the embedded defaults when there are none),
    apply dotted overrides, validate."""
    return validate_config(model, apply_overrides(read_config_files(path), overrides), describe_sources(path))


def apply_overrides(data: dict, overrides: dict | None) -> dict:
    """Dotted `key.path: value` settings written into nested settings (in place; the values are copied)."""
    for key, value in copy.deepcopy(overrides or {}).items():  # never write into the caller's dicts
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def parse_override(text: str) -> tuple[str, object]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003) (values parsed as YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
