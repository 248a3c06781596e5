"""The teacher replica: one Ray Serve deployment per capability teacher, answering batched velocity queries.

Queries arrive as `VelocityQuery` (numpy). With batching on, concurrent queries from many callers are
merged into one model call (sizes counted in samples, not requests) and the result is split back in order.
The model runs in a single worker thread (batching on or off) so that the replica's event loop keeps accepting
(and batching) queries, and answering health checks, while a batch computes.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from danceopd.contracts import QueryError, VelocityQuery, concat_queries, info_to_dict, merge_key, split_rows
from danceopd.models.base import resolve_device, text_encoder_parameters
from services.teachers.config import TeacherConfig, TeachersConfig
from services.teachers.fields import build_field
from services.teachers.metrics import TeacherMetrics


@serve.deployment(name="TeacherServer")
class TeacherServer:
    def __init__(self, teachers: dict, teacher: str):
        all_cfg = TeachersConfig.model_validate(teachers)  # this teacher and its CFG bases (see replica_args)
        self.cfg: TeacherConfig = all_cfg.teacher(teacher)
        torch.set_num_threads(self.cfg.torch_threads)
        self.device = resolve_device(self.cfg.device)
        built = build_field(self.cfg, all_cfg)
        # an adapter bank serves several teachers on one base: one field per adapter, one FieldInfo for the replica
        self.fields = getattr(built, "fields", None) or {None: built}
        self.info = built.info
        model = built
        while not hasattr(model, "pipe") and hasattr(model, "base"):  # CFG over a model field
            model = model.base
        # what /describe reports: 0 when the replica reads an embedding store (suite fields hold no pipeline)
        self.text_encoder_parameters = text_encoder_parameters(model.pipe) if hasattr(model, "pipe") else 0
        self.spec = all_cfg.teacher_spec(teacher)  # what a job checks before it attaches
        self.store = getattr(all_cfg.base_chain(teacher)[-1].field, "text_embeddings", None)  # the prompt-embedding store it reads
        self.metrics = TeacherMetrics(self.cfg.name)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"teacher-{teacher}")
        b = self.cfg.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        self.waiting = 0
        self.model_calls: list[int] = []  # samples per model call, newest last (bounded)

    # --------------------------------------------------------------------------------- public methods
    async def describe(self) -> dict:
        ctx = serve.get_replica_context()
        return {**info_to_dict(self.info), "teacher": self.cfg.name, "device": str(self.device),
                "replica_id": ctx.replica_id.unique_id, "pid": os.getpid(), "cpu_s": time.process_time(),
                "batching": self.cfg.batching.model_dump(), "recent_model_calls": self.model_calls[-64:], "spec": self.spec,
                "text_encoder_parameters": self.text_encoder_parameters,
                "text_embeddings": self.store}

    async def velocity(self, query: VelocityQuery) -> np.ndarray:
        """float32 [B, C, H, W] velocity for the query; raises QueryError (a 4xx for the gateway) on bad input."""
        start = time.perf_counter()
        try:
            query.validate(self.info)
        except QueryError as e:
            self.metrics.error(f"bad_{e.field}")
            raise
        self.waiting += 1
        self.metrics.queue.set(self.waiting)
        try:
            b = self.cfg.batching
            if query.num_samples > b.max_batch_size:  # one model call would exceed what the device is sized for
                out = np.concatenate([(await self._compute([part]))[0] for part in query.chunks(b.max_batch_size)])
            elif not b.enabled or self.waiting == 1:
                out = (await self._compute([query]))[0]  # alone: on its own
            else:
                out = await self._batched(query)  # others are queued or computing: merge
        except Exception as e:
            self.metrics.error(type(e).__name__)
            raise
        finally:
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)
        self.metrics.answered(query.num_samples, time.perf_counter() - start)
        return out

    # --------------------------------------------------------------------------------- internals
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, batch_size_fn=lambda qs: sum(q.num_samples for q in qs))
    async def _batched(self, queries: list[VelocityQuery]) -> list[np.ndarray]:
        return await self._compute(queries)

    async def _compute(self, queries: list[VelocityQuery]) -> list[np.ndarray]:
        # The model runs in the replica's single worker thread: the event loop stays free to take in
        # (and batch) the queries that arrive meanwhile.
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._forward, queries)

    def _forward(self, queries: list[VelocityQuery]) -> list[np.ndarray]:
        """One model call per group of queries that can share one (same adapter, same source presence)."""
        start = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(queries)
        groups: dict[tuple, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(merge_key(q), []).append(i)
        for idx in groups.values():
            group = [queries[i] for i in idx]
            merged = group[0] if len(group) == 1 else concat_queries(group)
            self.metrics.model_call(merged.num_samples)
            self.model_calls = (self.model_calls + [merged.num_samples])[-256:]
            x = torch.from_numpy(merged.x).to(self.device)
            sigma = torch.from_numpy(np.asarray(merged.sigma, dtype=np.float32)).to(self.device)
            with torch.inference_mode():
                v = self.fields[merged.adapter].velocity(x, sigma, merged.conditions(self.device))
            for i, rows in zip(idx, split_rows(v.to("cpu", torch.float32).numpy(), group)):
                out[i] = rows
        if self.cfg.simulated_call_s:  # a device-bound teacher: calls queue on the model thread; the wait uses no core
            time.sleep(max(0.0, self.cfg.simulated_call_s - (time.perf_counter() - start)))
        return out


SCALING_KEYS = ("num_replicas", "autoscaling_config", "max_ongoing_requests", "access_log")


def replica_args(cfg: TeachersConfig, name: str) -> dict:
    """What a teacher's replicas are built from: that teacher (and its CFG base chain), without scaling.

    Scaling settings live in the deployment options only, so that changing a replica count is a
    lightweight update of that one application: no replica restarts, here or in any other teacher.
    """
    chain = [t.model_dump(mode="json", exclude=set(SCALING_KEYS), exclude_defaults=True) for t in cfg.base_chain(name)]
    return {"teachers": chain, "app_prefix": cfg.app_prefix}


def deployment_options(cfg: TeachersConfig, name: str) -> dict:
    t = cfg.teacher(name)
    options = {"max_ongoing_requests": max(t.max_ongoing_requests, t.batching.max_batch_size),
               "logging_config": {"enable_access_log": t.access_log}}
    if t.autoscaling_config is not None:
        options["autoscaling_config"] = t.autoscaling_config.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = t.num_replicas or 1
    return options


def teacher_deployment(cfg: TeachersConfig, name: str):
    """The bound Serve application of one teacher, with its replicas, resources and autoscaling."""
    t = cfg.teacher(name)
    return TeacherServer.options(ray_actor_options=t.ray_actor_options.model_dump(), **deployment_options(cfg, name)).bind(
        replica_args(cfg, name), name)
