"""Router state: an embedded in-memory store by default, Redis when a URL is configured.

What is stored (per run): the registry entry (config, status), the assignment log (first answer to each
(step, rank, micro) request, returned again on retries), per-route counts, per-route loss statistics and
the adaptive weights snapshot per step. Redis with append-only persistence survives a Redis restart.
"""

from __future__ import annotations

import json
import threading
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
        return sorted(self.runs)

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
        return sorted(self.r.hkeys(f"{self.p}:runs"))

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
