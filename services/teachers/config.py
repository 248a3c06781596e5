"""Declarative teachers configuration (YAML), validated by pydantic before anything loads.

    teachers:
      - name: t2i
        field: {kind: suite, capability: t2i, tier: basic}
        num_replicas: 1
        ray_actor_options: {num_cpus: 0.5}
        batching: {max_batch_size: 64, batch_wait_timeout_s: 0.0}
      - name: t2i_cfg
        field: {kind: cfg, base: t2i, alpha: 3.5}
      - name: sd3
        field: {kind: diffusers, path: /models/sd3-medium}
        device: cuda
        dtype: bfloat16
        ray_actor_options: {num_gpus: 1, num_cpus: 4}
        autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}
    gateway: {route_prefix: /, auth_token_env: DANCEOPD_API_TOKEN, max_payload_mb: 32}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from danceopd.auth import AuthOptions
from danceopd.config import ConfigError, read_yaml_mapping, validate_config
from danceopd.suite.buckets import check_capability
from danceopd.models.hub import check_model_name, where
from danceopd.teacher_model import LoraAdapterSpec, TeacherModelSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteFieldSpec(_Strict):
    kind: Literal["suite"] = Field(description="suite: an exact capability-suite field")
    capability: str = Field(description="the suite capability (t2i, local_edit, global_edit, realism, ...)")
    tier: Literal["basic", "hard"] = Field("basic", description="the suite tier (basic or hard), as the run's suite.tier")
    tau: float = Field(0.0, ge=0.0, le=0.5, description="Gaussian smoothing of the references, as the run's suite.tau")
    seed: int = Field(0, description="seed of the reference sets, as the run's suite.seed")

    _known = field_validator("capability")(classmethod(lambda cls, v: check_capability(v)))


class DiffusersFieldSpec(_Strict):
    """A model teacher: base pipeline (or a DanceOPD student folder) [+ fine-tuned checkpoint] [+ LoRAs], merged at load."""

    kind: Literal["diffusers"] = Field(description="diffusers: a model teacher")
    path: str = Field(description="the base: a local diffusers pipeline folder, a DanceOPD student folder, or a hub id")
    family: str | None = Field(None, description="model family; default: read from the base's model_index.json (a local folder, or "
                               "a hub id in the Hugging Face cache)")
    checkpoint: str | None = Field(None, description="a fine-tuned transformer (a transformer/ folder or a pipeline "
                                                     "holding one) in place of the base's")
    loras: list[LoraAdapterSpec] = Field(default_factory=list, description="LoRA adapters fused into the teacher once at "
                                                                           "load: [{path, scale, weight_name}]")
    guidance: float | None = Field(None, description="guidance-embedding value of the teacher's calls (FLUX.1-dev); "
                                                     "default the family's")
    resolution: int | None = Field(None, ge=8, description="image side in pixels the student trains at; default the transformer's native size")
    buckets: list[tuple[int, int]] = Field(default_factory=list, description="further (width, height) sizes it answers: the "
                                           "run's aspect-ratio buckets (data.buckets; the job sets them)")
    max_sequence_length: int | None = Field(None, ge=1, description="prompt tokens; default the pipeline's (SD3 256, FLUX 512)")
    text_embeddings: str | None = Field(None, description="a prompt-embedding store (danceopd.text_embeddings; the job sets it "
                                        "under student.text_embeddings: precompute): replicas load no text encoder and look "
                                        "prompts up by hash; a prompt not in it is an error naming the store")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        return check_model_name(v, "model folder")

    @model_validator(mode="after")
    def _files(self):
        _family_known(self.model_spec(), self.path)
        self.model_spec().check_files(self.path)
        return self

    def model_spec(self) -> TeacherModelSpec:
        return TeacherModelSpec(base=self.path, family=self.family, checkpoint=self.checkpoint, loras=self.loras,
                                guidance=self.guidance, max_sequence_length=self.max_sequence_length)


def _family_known(spec: TeacherModelSpec, path: str) -> None:
    """The teacher's family by the one rule (danceopd.config.TrainConfig.teacher_family; a teachers file has no student):
    the family key, else the base's model_index.json, on this machine or in the Hugging Face cache."""
    if spec.model_family(path) is None:
        raise ValueError(f"family: the base {where(path)} is not on this machine, so its model_index.json cannot say its family: "
                         f"run `danceopd prefetch --config <this file>` first, or set field.family")


class BankedTeacher(_Strict):
    loras: list[LoraAdapterSpec] = Field(default_factory=list, description="none = the base itself")
    guidance: float | None = Field(None, description="guidance-embedding value of this teacher's calls (FLUX.1-dev); "
                                                     "default the family's")
    cfg_alpha: float | None = Field(None, gt=0.0, description="this teacher is CFG(alpha) over its adapters (absorbed guidance): "
                                                             "conditional and unconditional halves in one model call")


class AdapterBankSpec(_Strict):
    """Several teachers that share a base, served by one deployment: the base once, each teacher's LoRAs as
    unfused adapters switched per query (`VelocityQuery.adapter` names the teacher)."""

    kind: Literal["adapter_bank"] = Field(description="adapter_bank: several teachers sharing one base")
    path: str = Field(description="the shared base: a local diffusers pipeline folder or a hub id")
    family: str | None = Field(None, description="model family; default: read from the base's model_index.json (a local folder, or "
                               "a hub id in the Hugging Face cache)")
    checkpoint: str | None = Field(None, description="a fine-tuned transformer shared by every adapter, in place of the "
                                                     "base's")
    resolution: int | None = Field(None, ge=8, description="image side in pixels the student trains at; default the "
                                                           "transformer's native size")
    buckets: list[tuple[int, int]] = Field(default_factory=list, description="further (width, height) sizes it answers "
                                           "(the run's aspect-ratio buckets)")
    max_sequence_length: int | None = Field(None, ge=1, description="prompt tokens; default the pipeline's (SD3 256, FLUX "
                                                                    "512)")
    adapters: dict[str, BankedTeacher] = Field(min_length=1, description="teacher name -> its LoRAs")
    text_embeddings: str | None = Field(None, description="a prompt-embedding store (danceopd.text_embeddings; the job sets it "
                                        "under student.text_embeddings: precompute): replicas load no text encoder and look "
                                        "prompts up by hash; a prompt not in it is an error naming the store")

    @model_validator(mode="after")
    def _files(self):
        _family_known(self.model_spec(next(iter(self.adapters))), self.path)
        for name, t in self.adapters.items():
            try:
                self.model_spec(name).check_files(self.path)
            except ValueError as e:
                raise ValueError(f"adapters.{name}.{e}") from None
        return self

    def model_spec(self, name: str) -> TeacherModelSpec:
        t = self.adapters[name]
        return TeacherModelSpec(base=self.path, family=self.family, checkpoint=self.checkpoint, loras=t.loras,
                                guidance=t.guidance, max_sequence_length=self.max_sequence_length)


class CFGFieldSpec(_Strict):
    kind: Literal["cfg"] = Field(description="cfg: classifier-free guidance over another teacher")
    base: str = Field(description="name of another teacher in this file; its field is built in this replica")
    alpha: float = Field(gt=0.0, description="the guidance scale: v_u + alpha (v_c - v_u)")


FieldSpec = Annotated[Union[SuiteFieldSpec, DiffusersFieldSpec, AdapterBankSpec, CFGFieldSpec], Field(discriminator="kind")]


class BatchingConfig(_Strict):
    enabled: bool = Field(True, description="merge concurrent queries into one model call (split back exactly); off: "
                                            "bit-reproducible calls")
    max_batch_size: int = Field(64, ge=1, description="samples (not requests) per model call; a larger query is answered in "
                                                      "consecutive calls of this size (batching on or off)")
    # 0 = opportunistic: never wait; queries that arrive while a batch computes form the next batch.
    # A positive wait only pays off when callers outnumber what one model call can absorb.
    batch_wait_timeout_s: float = Field(0.0, ge=0.0, le=1.0, description="how long a batch waits for more queries; 0: "
                                                                         "never (queries arriving during a call form the "
                                                                         "next batch)")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="fewest replicas")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy time; default min_replicas")
    max_replicas: int = Field(1, ge=1, description="most replicas")
    target_ongoing_requests: float = Field(2.0, gt=0, description="ongoing queries per replica that Serve scales toward")
    upscale_delay_s: float = Field(10.0, ge=0, description="how long the load must stay above target before a replica is "
                                                           "added")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long the load must stay below target before a replica is "
                                                             "removed")
    metrics_interval_s: float = Field(10.0, gt=0, description="how often the callers' handles report their ongoing queries")
    look_back_period_s: float = Field(30.0, gt=0, description="the window the ongoing queries are averaged over")

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ActorOptions(_Strict):
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs each replica reserves")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves (fractions share a GPU); a cuda device "
                                                   "needs it > 0")


class TeacherConfig(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="the teacher's name (lower case, digits, - and _): its "
                                                                    "application is <app_prefix><name>")
    field: FieldSpec = Field(description="the velocity field it serves: {kind: suite | diffusers | adapter_bank | cfg, "
                                         "...}")
    device: str = Field("auto", description="auto (cuda when the replica holds a GPU, else cpu), cpu or cuda")
    dtype: str = Field("auto", description="weights dtype: auto (bf16 on a GPU that has it, else float32), float32, "
                                           "bfloat16 or float16")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1), or autoscaling_config")
    autoscaling_config: AutoscalingConfig | None = Field(None, description="Serve autoscaling of the replicas (instead of "
                                                                           "num_replicas)")
    max_ongoing_requests: int = Field(16, ge=1, description="queries a replica accepts at once (Serve queues the rest)")
    ray_actor_options: ActorOptions = Field(ActorOptions(), description="resources of each replica ({num_cpus, num_gpus})")
    batching: BatchingConfig = Field(BatchingConfig(), description="merge concurrent queries into model calls")
    torch_threads: int = Field(1, ge=1, description="torch threads in the replica (1 is best on a shared CPU box)")
    access_log: bool = Field(False, description="one log line per query (a trainer sends several per step); metrics count them anyway")
    simulated_call_s: float = Field(0.0, ge=0.0, le=60.0, description="benchmarks only: every model call lasts at least this long "
                                    "(the replica's model thread sleeps, using no core), to simulate a teacher on its own device")
    deploy: bool = Field(True, description="false: only a CFG base, built inside the replicas of the teachers over it "
                                           "(no application of its own, not listed by the gateway)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        if self.device.startswith("cuda") and self.ray_actor_options.num_gpus <= 0:
            raise ValueError(f"device {self.device!r} needs a GPU: set ray_actor_options.num_gpus (e.g. 1)")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ValueError(f"dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        return self


class GatewayConfig(AuthOptions, _Strict):
    route_prefix: str = Field("/", description="HTTP route prefix of the gateway")
    max_payload_mb: float = Field(32.0, gt=0, description="largest request body; a larger one is a 413")
    request_timeout_s: float = Field(30.0, gt=0, description="how long the gateway waits for a teacher; then a 504")
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs the gateway replica reserves")


class RouterServiceConfig(AuthOptions, _Strict):
    """The router application deployed beside the teachers (`serve deploy` declares every app at once)."""

    enabled: bool = Field(True, description="deploy the router")
    route_prefix: str = Field("/router", description="HTTP route prefix of the router API")
    redis_url: str | None = Field(None, description="state in Redis; default $DANCEOPD_REDIS_URL on the cluster, else `store`")
    store: Literal["ray", "memory"] = Field("ray", description="without Redis: ray = the cluster's own key-value store (survives "
                                                               "router restarts, no setup); memory = the replica's memory (lost with it)")


class TeachersConfig(_Strict):
    app_prefix: str = Field("teacher-", description="each teacher is the Serve application <app_prefix><name>")
    teachers: list[TeacherConfig] = Field(description="the teachers, each its own Serve application")
    gateway: GatewayConfig = Field(GatewayConfig(), description="the REST gateway application (velocity queries for "
                                                                "debugging)")
    router: RouterServiceConfig = Field(RouterServiceConfig(), description="the router application deployed beside the "
                                                                           "teachers")

    @model_validator(mode="after")
    def _references(self):
        names = [t.name for t in self.teachers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"teacher names must be unique, repeated: {dupes}")
        by_name = {t.name: t for t in self.teachers}
        for t in self.teachers:
            seen, cur = [t.name], t
            while isinstance(cur.field, CFGFieldSpec):
                if cur.field.base not in by_name:
                    raise ValueError(f"teacher {cur.name!r}: field.base {cur.field.base!r} is not a teacher in this file ({names})")
                cur = by_name[cur.field.base]
                if isinstance(cur.field, AdapterBankSpec):
                    raise ValueError(f"teacher {t.name!r}: CFG over an adapter bank ({cur.name!r}) is not supported: "
                                     "give the CFG route its own diffusers teacher")
                if cur.name in seen:
                    raise ValueError(f"teacher {t.name!r}: cfg bases form a cycle {seen + [cur.name]}")
                seen.append(cur.name)
        return self

    def teacher(self, name: str) -> TeacherConfig:
        for t in self.teachers:
            if t.name == name:
                return t
        raise ConfigError(f"no teacher named {name!r}; configured: {[t.name for t in self.teachers]}")

    def app_name(self, teacher: str) -> str:
        return f"{self.app_prefix}{teacher}"

    def base_chain(self, name: str) -> list[TeacherConfig]:
        """A teacher, then the CFG base it guides, and that one's base, and so on: what its replicas build."""
        chain = [self.teacher(name)]
        while getattr(chain[-1].field, "kind", None) == "cfg":
            chain.append(self.teacher(chain[-1].field.base))
        return chain

    def teacher_spec(self, name: str) -> dict:
        """What a teacher's velocities depend on (field and dtype, its CFG bases' too), not how it is scaled or placed:
        a running application is this teacher only if its spec is equal."""
        # (where prompt embeddings come from is not what a teacher computes: a store or encoders give the same velocities)
        return {t.name: t.model_dump(mode="json", include={"field", "dtype"}, exclude={"field": {"text_embeddings"}})
                for t in self.base_chain(name)}


def load_teachers_config(source: str | Path | dict) -> TeachersConfig:
    if isinstance(source, dict):
        return validate_config(TeachersConfig, source, "inline teachers config")
    return validate_config(TeachersConfig, read_yaml_mapping(source), str(source))
