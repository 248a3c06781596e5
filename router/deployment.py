"""The router as a Ray Serve deployment (handle methods for trainers, REST for people, metrics).

    GET /v1/runs                   registered runs with status and policy
    GET /v1/runs/{run_id}/routing  per-route counts, current weights, loss statistics, recent assignments
No `from __future__ import annotations`: FastAPI must see real annotations on the ingress methods.
"""

import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

import danceopd.telemetry as T
from danceopd.telemetry import make
from danceopd.auth import AuthOptions, authorized, resolve_token
from danceopd.remote import RequestError, error_responses
from router.core import Router, RouterError
from router.store import MemoryStore, RayKVStore, RedisStore

app = FastAPI(title="DanceOPD router", version="1")


def redis_location(url: str) -> str:
    """A Redis URL without its credentials (host, port, database): the store's identity, safe to show. (Defined
    before the deployment class: Serve serializes the class with the names it uses when it is decorated.)"""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path or '/0'}"


# No access log: trainers call the router every step or few; the metrics count the assignments.
# The methods that touch the store are plain `def`s: Serve runs them on its thread pool, so a slow or restarting
# Redis never blocks the replica's event loop (health checks, other callers, the store's identity).
@serve.deployment(name="RouterServer", num_replicas=1, ray_actor_options={"num_cpus": 0.1}, logging_config={"enable_access_log": False})
@serve.ingress(app)
class RouterServer:
    """One replica: the store (Redis, when configured) is the source of truth, so a restarted replica
    continues with identical assignments."""

    def __init__(self, redis_url: str | None = None, auth: dict | None = None, listen_host: str | None = None, store: str = "ray"):
        self.token = resolve_token(AuthOptions(**(auth or {})), listen_host, "router API", "router")  # never open beyond loopback
        url = redis_url or os.environ.get("DANCEOPD_REDIS_URL")
        if store not in ("ray", "memory"):
            raise ValueError(f"router.store must be 'ray' or 'memory', got {store!r}")
        self.backend = "redis" if url else store
        self.router = Router(RedisStore(url) if url else RayKVStore() if store == "ray" else MemoryStore())
        self.store_spec = {"kind": self.backend, **({"url": redis_location(url)} if url else {})}
        self.m_assign = make(T.ROUTER_ASSIGNMENTS)
        self.m_weight = make(T.ROUTER_WEIGHT)
        self.m_loss = make(T.ROUTER_LOSS)

    def _tags(self, run_id: str, route: str) -> dict:
        return {"run": run_id, "route": route, "capability": self.router.config(run_id).routes[route].bucket}

    # ------------------------------------------------------------------ handle API (trainers)
    def register_run(self, run_id: str, config: dict) -> dict:
        return self.router.register_run(run_id, config)

    def assign(self, run_id: str, step: int, rank: int = 0, micro: int = 0) -> dict:
        out = self.router.assign(run_id, step, rank, micro)
        self._count(run_id, out)
        return out

    def _count(self, run_id: str, a: dict) -> None:
        for route, n in a["route_samples"].items():
            self.m_assign.inc(n, tags=self._tags(run_id, route))
        for route, w in a["weights"].items():
            self.m_weight.set(w, tags=self._tags(run_id, route))

    def assign_steps(self, run_id: str, first_step: int, count: int, rank: int = 0) -> list[list[dict]]:
        steps = self.router.assign_steps(run_id, first_step, count, rank)
        for micro_batches in steps:
            for a in micro_batches:
                self._count(run_id, a)
        return steps

    def report_loss(self, run_id: str, step: int, route: str, loss: float) -> dict:
        return self.report_losses(run_id, [(step, route, loss)])

    def report_losses(self, run_id: str, reports: list) -> dict:
        stats = self.router.report_losses(run_id, reports)
        for _, route, loss in reports[-1:]:
            self.m_loss.set(loss, tags=self._tags(run_id, route))
        return stats

    def set_status(self, run_id: str, status: str) -> None:
        self.router.set_status(run_id, status)

    def finish_run(self, run_id: str, status: str, keep_s: float) -> dict:
        return self.router.finish_run(run_id, status, keep_s)

    async def backend_name(self) -> str:
        return self.backend

    async def store(self) -> dict:
        """Where the router keeps runs ({'kind': 'memory'} or {'kind': 'redis', 'url': without the password}): what a job
        checks before it attaches."""
        return self.store_spec

    def summary(self, run_id: str, recent: int = 20) -> dict:
        return self.router.summary(run_id, recent=recent)

    # ------------------------------------------------------------------ REST (people)
    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if authorized(self.token, request.headers.get("authorization")):
            return None
        return JSONResponse(status_code=401, content=RequestError(
            "authorization", "missing or wrong bearer token: send 'Authorization: Bearer <token>'").body())

    @app.get("/v1/runs", responses=error_responses(s401="missing or wrong bearer token"))
    def runs(self, request: Request):
        """Every run the router knows: id, status (running, finished, failed), routing policy and routes."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        out = []
        for run_id in self.router.store.list_runs():
            rec = self.router.store.get_run(run_id)
            out.append({"run": run_id, "status": rec["status"], "policy": rec["config"]["policy"],
                        "routes": sorted(rec["config"]["routes"])})
        return {"runs": out, "backend": self.backend}

    @app.get("/v1/runs/{run_id}/routing", responses=error_responses(s401="missing or wrong bearer token",
                                                                    s404="no run with this id is registered"))
    def routing(self, run_id: str, request: Request, recent: int = 20):
        """One run's routing: assignments per route, the current weights, loss statistics, and its `recent` (at most 1000)
        last assignments."""
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            return self.router.summary(run_id, recent=max(0, min(recent, 1000)))
        except RouterError as e:
            return JSONResponse(status_code=e.status, content=e.body())


def router_app(args: dict | None = None):
    """Serve application builder: args {'redis_url': ... (default $DANCEOPD_REDIS_URL), 'store' (without Redis: 'ray',
    the cluster's key-value store, by default, or 'memory'), 'auth', 'auth_token_env', 'auth_token_file' (the REST
    API's), 'listen_host' (Serve's HTTP host)}, all optional."""
    args = args or {}
    auth = {k: args[k] for k in ("auth", "auth_token_env", "auth_token_file") if args.get(k) is not None}
    return RouterServer.bind(args.get("redis_url"), auth, args.get("listen_host"), args.get("store") or "ray")
