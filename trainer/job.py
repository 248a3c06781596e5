"""The distributed training job's configuration: a run config (TrainConfig) plus where it runs (`cluster`) and
which services it talks to (`services`). Validated in full before Ray starts or any model loads.

The teachers are derived from the routes (one source of truth): route `t2i` with `teacher: suite` is the
Serve application `<app_prefix>t2i` serving the suite's exact t2i field; a diffusers path is served as a
model field; `cfg_alpha` wraps it in CFG. `services.teacher_defaults` and `services.teachers.<route>` only
add deployment options (replicas, autoscaling, resources, batching, device).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from danceopd.auth import AuthOptions, resolve_token
from danceopd.config import ConfigError, ConfigPaths, TrainConfig, load_config
from danceopd.student import is_student_folder
from services.teachers.config import (ActorOptions, AutoscalingConfig, BatchingConfig, GatewayConfig, RouterServiceConfig,
                                      TeachersConfig)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClusterConfig(_Strict):
    address: str | None = Field(None, description="Ray address to attach to; None = the job's cluster if there is one "
                                                    "(RAY_ADDRESS, `ray job submit`), else a local Ray started here")
    local_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray started by the job "
                                                                "(default: enough for the workers and the services)")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each Ray Train worker reserves")
    gpus_per_worker: float = Field(1.0, ge=0, description="used when device is cuda")
    max_failures: int = Field(2, ge=0, description="worker-group restarts (from the latest checkpoint) before the run fails")
    storage_path: Path | None = Field(None, description="Ray Train storage (checkpoints); default <output_dir>/<run_name>/ray. "
                                                        "Must be shared storage on a multi-node cluster")
    timeout_s: float = Field(60.0, gt=0, description="timeout of every teacher / router call from a worker")
    step_retries: int = Field(2, ge=0, description="a teacher query that failed after its own retries is sent again this many "
                                                  "times (once the teacher's circuit lets calls through) before the worker gives "
                                                  "up and Ray Train restarts the group")
    teacher_failures_to_open: int = Field(3, ge=1, description="failed attempts in a row that open a worker's circuit to a teacher: "
                                                              "calls then pause, and the console and metrics name the teacher")
    teacher_pause_s: float = Field(10.0, gt=0, description="how long an open circuit holds calls to the teacher back")
    dashboard: bool = Field(True, description="Ray dashboard (and state API) of a local Ray started by the job, on :8265")
    metrics_export_port: int | None = Field(None, ge=1, le=65535, description="Prometheus port of a local Ray started by the job")
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory of one GPU of the cluster: the memory plan (danceopd plan) "
                                                                "refuses a job whose worker or teacher cannot fit it; default: this "
                                                                "machine's GPU when it has one, else nothing is refused")
    text_embeddings_timeout_s: float = Field(3600.0, gt=0, description="student.text_embeddings: precompute: the most the "
                                             "encoding task may take before training (FLUX.1/SD3 T5-XXL: a few minutes per 10k prompts)")
    memory_check: Literal["strict", "warn", "off"] = Field("strict", description="a role over its GPU share: strict stops the job "
                                                                             "before anything loads (exit 2), warn prints and goes on")


class TeacherDeployOptions(_Strict):
    """Deployment options of one teacher application (its field comes from the route)."""

    device: str | None = Field(None, description="the replica's device (auto: cuda when it holds a GPU); default the "
                                                 "teacher's own (auto)")
    dtype: str | None = Field(None, description="the teacher's weights dtype (auto: bf16 on a GPU that has it); default "
                                                "auto")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (or autoscaling_config)")
    autoscaling_config: AutoscalingConfig | None = Field(None, description="Serve autoscaling of this teacher's replicas "
                                                                           "(instead of num_replicas)")
    ray_actor_options: ActorOptions | None = Field(None, description="resources of each replica ({num_cpus, num_gpus})")
    batching: BatchingConfig | None = Field(None, description="merge concurrent queries into model calls ({enabled, "
                                                              "max_batch_size, batch_wait_timeout_s})")
    torch_threads: int | None = Field(None, ge=1, description="torch threads in each replica; default the teacher's (1)")
    access_log: bool | None = Field(None, description="one log line per query; default off")
    simulated_call_s: float | None = Field(None, ge=0.0, le=60.0, description="benchmarks only: see TeacherConfig.simulated_call_s")


class ServicesConfig(_Strict):
    deploy: Literal["auto", "attach"] = Field("auto", description="auto: deploy the teacher/router applications that "
                                                                   "are not running and attach to those that are; attach: require them running")
    app_prefix: str = Field("teacher-", description="each route's teacher is the Serve application <app_prefix><route>")
    teacher_defaults: TeacherDeployOptions = Field(TeacherDeployOptions(num_replicas=1, ray_actor_options=ActorOptions(num_cpus=0.25)),
            description="deployment options of every teacher application (services.teachers overrides per route)")
    teachers: dict[str, TeacherDeployOptions] = Field(default_factory=dict, description="per-route overrides of teacher_defaults")
    router_app: str = Field("router", description="the router's Serve application name")
    router_redis_url: str | None = Field(None, description="router state in Redis; default $DANCEOPD_REDIS_URL, else the Ray "
                                         "cluster's own key-value store (survives a router restart; not a head-node restart)")
    router_keep_finished_days: float = Field(7.0, gt=0, description="a finished or failed run's routing log and statistics "
                                                                      "expire from the router's store after this long")
    gateway: bool = Field(True, description="also deploy the REST gateway (velocity queries for debugging)")
    shared_base: bool = Field(False, description="serve the model teachers that share a base (same base, family and checkpoint, "
                                                 "CFG routes included) from one deployment holding the base once, with each route's LoRAs "
                                                 "as adapters switched per query: less GPU memory, a per-call adapter cost")
    gateway_route_prefix: str = Field("/", description="HTTP route prefix of the REST gateway")
    http_host: str = Field("127.0.0.1", description="Serve's HTTP proxy, when the job starts Serve (REST gateway, router API); "
                                                  "beyond loopback, api_auth requires a bearer token (auth: auto)")
    api_auth: AuthOptions = Field(AuthOptions(), description="the REST gateway's and router API's bearer-token authentication")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve's HTTP port, when the job starts Serve")


class JobConfig(TrainConfig):
    cluster: ClusterConfig = Field(ClusterConfig(), description="the Ray cluster and the Ray Train worker group")
    services: ServicesConfig = Field(ServicesConfig(), description="the teacher, router and gateway Serve applications the "
                                                                   "job deploys or attaches to")

    @model_validator(mode="after")
    def _job_consistent(self) -> "JobConfig":
        unknown = sorted(set(self.services.teachers) - set(self.routes))
        if unknown:
            raise ValueError(f"services.teachers names {unknown}, which are not routes ({sorted(self.routes)})")
        self._check_gpus()
        return self

    def _check_gpus(self) -> None:
        """A role that must run on CUDA asks Ray for a GPU: otherwise Ray places it anywhere, and on a GPU node it finds no
        device (CUDA_VISIBLE_DEVICES is empty for a process that reserved none) only once its model loads."""
        if str(self.device).startswith("cuda") and self.cluster.gpus_per_worker <= 0:
            raise ValueError(f"cluster.gpus_per_worker is {self.cluster.gpus_per_worker:g} but device is {self.device!r}: a train worker "
                             "that reserves no GPU gets none; set cluster.gpus_per_worker (e.g. 1), or device: cpu")
        for route in self.routes:
            if self.routes[route].model_teacher is None:
                continue
            opts = self._deploy_options(route)
            device = opts.get("device") or "auto"
            if device.startswith("cuda") and opts["ray_actor_options"]["num_gpus"] <= 0:
                own = self.services.teachers.get(route)
                key = f"services.teachers.{route}" if own is not None and (own.device or own.ray_actor_options) else "services.teacher_defaults"
                raise ValueError(f"{key}.ray_actor_options.num_gpus: the teacher of route {route!r} runs on {device!r} but its "
                                 "replicas reserve no GPU, so Ray gives them none; set ray_actor_options.num_gpus (e.g. 1, or 0.5 "
                                 "to share a card), or device: cpu")

    @property
    def worker_batch_size(self) -> int:
        return self.optim.batch_size // self.cluster.num_workers

    @property
    def storage_path(self) -> Path:
        return (self.cluster.storage_path or self.run_dir / "ray").expanduser().resolve()

    def banks(self) -> dict[str, list[str]]:
        """services.shared_base: groups of routes whose model teachers share base, family and checkpoint (a CFG
        route included: the bank applies its guidance), each served as one adapter bank named after its first route."""
        if not self.services.shared_base:
            return {}
        groups: dict[tuple, list[str]] = {}
        for name, route in self.routes.items():
            spec = route.model_teacher
            if spec is not None:
                groups.setdefault((spec.base or self.student.base, self.teacher_family(name).name, spec.checkpoint), []).append(name)
        return {f"shared-{names[0]}": names for names in groups.values() if len(names) > 1}

    def teacher_name(self, route: str) -> str:
        """The teacher (in teachers_config) that answers a route: its own, or its adapter bank."""
        return next((bank for bank, routes in self.banks().items() if route in routes), route)

    def teacher_app(self, route: str) -> str:
        return f"{self.services.app_prefix}{self.teacher_name(route)}"

    def teacher_adapter(self, route: str) -> str | None:
        """The adapter a route's queries name on its bank; None for a teacher of its own."""
        return route if self.teacher_name(route) != route else None

    def teacher_dtypes(self) -> dict[str, str]:
        """Each route's teacher dtype as its replicas resolve it (auto: bfloat16 on a GPU replica, float32 on the CPU)."""
        from danceopd.memory_plan import dtype_for

        tc = self.teachers_config()
        out = {}
        for route in self.routes:
            t = tc.teacher(self.teacher_name(route))
            on_gpu = t.device.startswith("cuda") or (t.device == "auto" and t.ray_actor_options.num_gpus > 0)
            out[route] = dtype_for(t.dtype, on_gpu)
        return out

    def teacher_client(self, route: str, breaker=None):
        from services.teachers.client import TeacherClient

        return TeacherClient(self.teacher_app(route), app_prefix="", timeout_s=self.cluster.timeout_s, adapter=self.teacher_adapter(route),
                             breaker=breaker)

    def _deploy_options(self, route: str) -> dict:
        default = self.services.teacher_defaults.model_dump(exclude_none=True)
        own = self.services.teachers.get(route, TeacherDeployOptions()).model_dump(exclude_none=True)
        if "autoscaling_config" in own:  # the route's own scaling replaces the default one
            default.pop("num_replicas", None)
        if "num_replicas" in own:
            default.pop("autoscaling_config", None)
        return {**default, **own}

    def _bucket_field(self) -> dict:
        """The run's aspect-ratio buckets for a model teacher's spec: the shapes its replicas answer besides the square."""
        return {"buckets": [list(b) for b in self.bucket_sizes()]} if self.bucket_sizes() else {}

    def teachers_config(self) -> TeachersConfig:
        """The teachers (one per route) as a validated TeachersConfig: what `deploy_teachers` deploys."""
        teachers = []
        banks = self.banks()
        text = self.text_embeddings()
        store = {"text_embeddings": text.store} if text.mode == "precompute" else {}  # replicas read it instead of loading encoders
        banked = {r for routes in banks.values() for r in routes}
        for bank, routes in banks.items():
            spec = self.routes[routes[0]].model_teacher
            field = {"kind": "adapter_bank", "path": spec.base or self.student.base, "family": self.teacher_family(routes[0]).name,
                     "checkpoint": spec.checkpoint,
                     "resolution": self.student.resolution, **self._bucket_field(),
                     "adapters": {r: {**self.routes[r].model_teacher.model_dump(include={"loras", "guidance"}),
                                      **({"cfg_alpha": self.routes[r].cfg_alpha} if self.routes[r].cfg_alpha is not None else {})}
                                  for r in routes}, **store}
            teachers.append({"name": bank, "field": field, **self._deploy_options(routes[0])})
        for name, route in self.routes.items():
            if name in banked:
                continue
            spec = route.model_teacher
            if spec is None:
                field = {"kind": "suite", "capability": route.capability, "tier": self.suite.tier, "tau": self.suite.tau, "seed": self.suite.seed}
            else:  # a model teacher in the student's latent space, at the student's resolution, its family resolved here
                field = {"kind": "diffusers", "path": spec.base or self.student.base, "resolution": self.student.resolution,
                         **self._bucket_field(), **spec.model_dump(exclude={"base"}, exclude_none=True, exclude_defaults=True),
                         "family": self.teacher_family(name).name}
                if not is_student_folder(field["path"]):  # a served student folder keeps its own encoders
                    field.update(store)
            opts = self._deploy_options(name)
            if route.cfg_alpha is not None:  # the base field is built in the same replica (see services.teachers.fields)
                teachers.append({"name": f"{name}-base", "field": field, **opts, "deploy": False})
                field = {"kind": "cfg", "base": f"{name}-base", "alpha": route.cfg_alpha}
            teachers.append({"name": name, "field": field, **opts})
        redis_url = self.services.router_redis_url or os.environ.get("DANCEOPD_REDIS_URL")
        try:
            return TeachersConfig.model_validate({
                "app_prefix": self.services.app_prefix, "teachers": teachers,
                "gateway": GatewayConfig(route_prefix=self.services.gateway_route_prefix, **self.services.api_auth.model_dump()).model_dump(),
                "router": RouterServiceConfig(redis_url=redis_url, **self.services.api_auth.model_dump()).model_dump()})
        except Exception as e:  # pydantic ValidationError: name the job keys it came from
            raise ConfigError(f"services: the teachers derived from routes are invalid: {e}") from None


def load_job_config(path: ConfigPaths, overrides: dict | None = None) -> JobConfig:
    job = load_config(path, overrides, model=JobConfig)
    n = job.cluster.num_workers
    if job.optim.batch_size % n:  # (the reference trainer reads job files too; it has no workers to divide among)
        raise ConfigError(f"optim.batch_size ({job.optim.batch_size}) is the global micro-batch and must divide by "
                          f"cluster.num_workers ({n}): each worker draws batch_size / num_workers samples")
    if job.method.routing == "soft":
        raise ConfigError("method.routing: the distributed trainer routes 'hard' or 'adaptive' (soft mixing runs in trainer.reference)")
    if job.method.target != "teacher":
        raise ConfigError("method.target: the distributed trainer distils teachers ('teacher'); plain flow matching runs in trainer.reference")
    job.teachers_config()  # the derived teachers validate now, before Ray starts
    s = job.services
    if not (job.cluster.address or os.environ.get("RAY_ADDRESS")):  # a local Ray: its services inherit this environment
        try:
            resolve_token(s.api_auth, s.http_host, "REST gateway and router API", "services.api_auth")
        except ValueError as e:
            raise ConfigError(f"services.http_host is {s.http_host!r}: {e}") from None
    return job


def gpu_memory_of(job: JobConfig, given: float | None = None) -> float | None:
    """The GPU size a plan is checked against: the one given, cluster.gpu_memory_gib, else this machine's GPU."""
    from danceopd.memory_plan import device_memory_gib

    return given or job.cluster.gpu_memory_gib or device_memory_gib()


def check_memory(job: JobConfig, gpu_memory_gib: float | None = None, warn=print):
    """The job's memory plan against its GPU size (the argument, cluster.gpu_memory_gib, else this machine's GPU):
    under memory_check strict a role that cannot fit its GPU share is a ConfigError, before any model loads. Returns
    the plan, or None when the check is off or there is no GPU size to check against."""
    from danceopd.memory_plan import PlanError, plan_job

    gib = gpu_memory_of(job, gpu_memory_gib)
    if job.cluster.memory_check == "off" or gib is None:
        return None
    try:
        plan = plan_job(job, gib)
    except PlanError as e:
        raise ConfigError(f"cluster.memory_check: {e}") from None
    if plan.over_budget():
        fewer = (f"predict fewer states per backward (optim.states_per_backward, e.g. {job.worker_batch_size}: the same gradient) or "
                 f"query fewer than {job.method.queried_states} states per sample (method.k; query_position: dense queries all N), "
                 if job.method.queried_states > 1 else "")
        msg = (f"the job does not fit {gib:g} GiB GPUs: {plan.refusal()}. See `danceopd plan --config ...`; lower the batch, "
               f"{fewer}enable student.gradient_checkpointing, train a LoRA, or set cluster.memory_check: warn if you know better")
        if job.cluster.memory_check == "strict":
            raise ConfigError(msg)
        warn(f"warning: {msg}")
    return plan
