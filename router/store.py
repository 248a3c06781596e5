"""Router state: an embedded in-memory store by default, Redis when a URL is configured.

What is stored (per run): the registry entry (config, status), the assignment log (first answer to each
(step, rank, micro) request, returned again on retries), per-route counts, per-route loss statistics and
the adaptive weights snapshot per step. Redis with append-only persistence survives a Redis restart.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Protocol


class RouterStore(Protocol):
    def put_run(self, run_id: str, record: dict) -> None: ...
    def get_run(self, run_id: str) -> dict | None: ...
    def list_runs(self) -> list[str]: ...
    def get_or_set_assignment(self, run_id: str, key: str, value: dict) -> tuple[dict, bool]: ...
    def recent_assignments(self, run_id: str, n: int) -> list[dict]: ...
    def route_counts(self, run_id: str) -> dict[str, int]: ...
    def get_loss_stats(self, run_id: str) -> dict[str, dict]: ...
    def update_loss_stats(self, run_id: str, route: str, fn) -> dict: ...
    def get_or_set_weights(self, run_id: str, step: int, weights: dict[str, float]) -> dict[str, float]: ...
    def expire_run(self, run_id: str, seconds: float) -> None: ...
    def keep_run(self, run_id: str) -> None: ...


def _live(records: dict[str, dict]) -> list[str]:
    """Run ids whose record has not expired (a finished run's `expires`)."""
    now = time.time()
    return sorted(r for r, rec in records.items() if rec.get("expires", now + 1) > now)


class MemoryStore:
    def __init__(self):
        self._lock = threading.Lock()
        self.runs: dict[str, dict] = {}
        self.assign: dict[str, dict[str, dict]] = {}
        self.order: dict[str, list[str]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.loss: dict[str, dict[str, dict]] = {}
        self.weights: dict[str, dict[int, dict]] = {}

    def put_run(self, run_id, record):
        with self._lock:
            self.runs[run_id] = json.loads(json.dumps(record))

    def get_run(self, run_id):
        return self.runs.get(run_id)

    def list_runs(self):
        return _live(self.runs)

    def expire_run(self, run_id, seconds):  # the replica's memory goes with it anyway; the listing hides it
        pass

    def keep_run(self, run_id):
        pass

    def get_or_set_assignment(self, run_id, key, value):
        with self._lock:
            log = self.assign.setdefault(run_id, {})
            if key in log:
                return log[key], False
            log[key] = value
            self.order.setdefault(run_id, []).append(key)
            counts = self.counts.setdefault(run_id, {})
            for route, n in value["route_samples"].items():
                counts[route] = counts.get(route, 0) + n
            return value, True

    def recent_assignments(self, run_id, n):
        if n <= 0:  # [-0:] would be the whole log
            return []
        keys = self.order.get(run_id, [])[-n:]
        return [self.assign[run_id][k] for k in keys]

    def route_counts(self, run_id):
        return dict(self.counts.get(run_id, {}))

    def get_loss_stats(self, run_id):
        return json.loads(json.dumps(self.loss.get(run_id, {})))

    def update_loss_stats(self, run_id, route, fn):
        with self._lock:
            stats = self.loss.setdefault(run_id, {})
            stats[route] = fn(stats.get(route))
            return stats[route]

    def get_or_set_weights(self, run_id, step, weights):
        with self._lock:
            return self.weights.setdefault(run_id, {}).setdefault(step, weights)


class RedisStore:
    """The same state in Redis; first-writer-wins writes (HSETNX) make retries and restarts idempotent."""

    def __init__(self, url: str, prefix: str = "danceopd:router", timeout_s: float = 5.0):
        import redis

        self.r = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True,
                                      retry_on_timeout=True)
        self.p = prefix

    def _k(self, run_id: str, what: str) -> str:
        return f"{self.p}:run:{run_id}:{what}"

    def put_run(self, run_id, record):
        self.r.hset(f"{self.p}:runs", run_id, json.dumps(record))

    def get_run(self, run_id):
        raw = self.r.hget(f"{self.p}:runs", run_id)
        return None if raw is None else json.loads(raw)

    def list_runs(self):
        records = {k: json.loads(v) for k, v in self.r.hgetall(f"{self.p}:runs").items()}
        live = _live(records)
        gone = [r for r in records if r not in live]
        if gone:  # expired runs' keys are gone already (TTL); drop their registry entries too
            self.r.hdel(f"{self.p}:runs", *gone)
        return live

    RUN_KEYS = ("assign", "order", "counts", "loss", "weights")

    def expire_run(self, run_id, seconds):
        pipe = self.r.pipeline()
        for what in self.RUN_KEYS:
            pipe.expire(self._k(run_id, what), max(1, int(seconds)))
        pipe.execute()

    def keep_run(self, run_id):
        pipe = self.r.pipeline()
        for what in self.RUN_KEYS:
            pipe.persist(self._k(run_id, what))
        pipe.execute()

    def get_or_set_assignment(self, run_id, key, value):
        if self.r.hsetnx(self._k(run_id, "assign"), key, json.dumps(value)):
            pipe = self.r.pipeline()
            pipe.rpush(self._k(run_id, "order"), key)
            for route, n in value["route_samples"].items():
                pipe.hincrby(self._k(run_id, "counts"), route, n)
            pipe.execute()
            return value, True
        return json.loads(self.r.hget(self._k(run_id, "assign"), key)), False

    def recent_assignments(self, run_id, n):
        if n <= 0:  # lrange(-0, -1) would be the whole log
            return []
        keys = self.r.lrange(self._k(run_id, "order"), -n, -1)
        if not keys:
            return []
        return [json.loads(v) for v in self.r.hmget(self._k(run_id, "assign"), keys)]

    def route_counts(self, run_id):
        return {k: int(v) for k, v in self.r.hgetall(self._k(run_id, "counts")).items()}

    def get_loss_stats(self, run_id):
        return {k: json.loads(v) for k, v in self.r.hgetall(self._k(run_id, "loss")).items()}

    def update_loss_stats(self, run_id, route, fn):
        key = self._k(run_id, "loss")
        with self.r.pipeline() as pipe:
            while True:  # optimistic transaction: concurrent reporters never lose an update
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, route)
                    new = fn(None if raw is None else json.loads(raw))
                    pipe.multi()
                    pipe.hset(key, route, json.dumps(new))
                    pipe.execute()
                    return new
                except Exception as e:  # redis.WatchError: someone else wrote; retry
                    if type(e).__name__ != "WatchError":
                        raise

    def get_or_set_weights(self, run_id, step, weights):
        key = self._k(run_id, "weights")
        self.r.hsetnx(key, str(step), json.dumps(weights))
        return json.loads(self.r.hget(key, str(step)))


class RayKVStore(MemoryStore):
    """The default: the router's state in the Ray cluster's own key-value store (the GCS), behind the in-memory one.

    Needs no setup, and survives the router replica: a restarted replica finds each run (registration, assignment log,
    loss statistics, adaptive weights) as it left it, loading it once on first use. Every write goes to the GCS
    first; assignments and frozen weights are first-writer-wins (put without overwrite). The GCS survives a head
    restart only with GCS fault tolerance (Redis, as in the compose and KubeRay files); Redis as the router's store
    outlives the cluster itself."""

    NAMESPACE = "danceopd-router"

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix
        self.loaded: set[str] = set()
        self._load_lock = threading.Lock()  # Serve calls the store from several threads

    # GCS key-value calls (Ray's internal KV: what Serve's controller keeps its own state in)
    def _put(self, key: str, value, overwrite: bool = True) -> bool:
        from ray.experimental.internal_kv import _internal_kv_put

        return _internal_kv_put(self.prefix + key, json.dumps(value), overwrite, namespace=self.NAMESPACE)  # True: existed

    def _get(self, key: str):
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self.prefix + key, namespace=self.NAMESPACE)
        return None if raw is None else json.loads(raw)

    def _keys(self, prefix: str) -> list[str]:
        from ray.experimental.internal_kv import _internal_kv_list

        n = len(self.prefix)
        return [k.decode()[n:] for k in _internal_kv_list(self.prefix + prefix, namespace=self.NAMESPACE)]

    def _load(self, run_id: str) -> None:
        """A run this replica has not seen yet: its state from the GCS (once)."""
        if run_id in self.loaded:
            return
        with self._load_lock:
            if run_id not in self.loaded:
                self._load_from_gcs(run_id)
                self.loaded.add(run_id)

    def _load_from_gcs(self, run_id: str) -> None:
        record = self._get(f"runs/{run_id}")
        if record is None:
            return
        super().put_run(run_id, record)
        keys = self._keys(f"assign/{run_id}/")
        for k in sorted(keys, key=lambda k: tuple(int(p) for p in k.rsplit("/", 1)[1].split(":"))):  # step, rank, micro
            super().get_or_set_assignment(run_id, k.rsplit("/", 1)[1], self._get(k))
        for k in self._keys(f"loss/{run_id}/"):
            self.loss.setdefault(run_id, {})[k.rsplit("/", 1)[1]] = self._get(k)
        for k in self._keys(f"weights/{run_id}/"):
            self.weights.setdefault(run_id, {})[int(k.rsplit("/", 1)[1])] = self._get(k)

    def put_run(self, run_id, record):
        self._put(f"runs/{run_id}", record)
        self.loaded.add(run_id)
        super().put_run(run_id, record)

    def get_run(self, run_id):
        self._load(run_id)
        return super().get_run(run_id)

    def list_runs(self):
        for key in self._keys("runs/"):
            self._load(key.split("/", 1)[1])
        live = super().list_runs()
        for run_id in [r for r in self.runs if r not in live]:  # expired: drop its keys from the GCS
            from ray.experimental.internal_kv import _internal_kv_del

            for what in ("runs", "assign", "loss", "weights"):
                _internal_kv_del(f"{self.prefix}{what}/{run_id}" + ("" if what == "runs" else "/"), del_by_prefix=what != "runs",
                                 namespace=self.NAMESPACE)
            for table in (self.runs, self.assign, self.order, self.counts, self.loss, self.weights):
                table.pop(run_id, None)
        return live

    def get_or_set_assignment(self, run_id, key, value):
        self._load(run_id)
        if key not in self.assign.get(run_id, {}):
            if self._put(f"assign/{run_id}/{key}", value, overwrite=False):  # another replica's answer came first
                value = self._get(f"assign/{run_id}/{key}")
        return super().get_or_set_assignment(run_id, key, value)

    def update_loss_stats(self, run_id, route, fn):
        self._load(run_id)
        with self._lock:
            stats = self.loss.setdefault(run_id, {})
            new = fn(stats.get(route))
            self._put(f"loss/{run_id}/{route}", new)
            stats[route] = new
            return new

    def get_or_set_weights(self, run_id, step, weights):
        self._load(run_id)
        if step not in self.weights.get(run_id, {}):
            if self._put(f"weights/{run_id}/{step}", weights, overwrite=False):
                weights = self._get(f"weights/{run_id}/{step}")
        return super().get_or_set_weights(run_id, step, weights)

    def recent_assignments(self, run_id, n):
        self._load(run_id)
        return super().recent_assignments(run_id, n)

    def route_counts(self, run_id):
        self._load(run_id)
        return super().route_counts(run_id)

    def get_loss_stats(self, run_id):
        self._load(run_id)
        return super().get_loss_stats(run_id)
