"""RouterClient: trainers ask the router deployment for assignments and report losses (timeout + retry)."""

from __future__ import annotations

from danceopd.remote import call_with_retry

ROUTER_APP = "router"


class RouterClient:
    def __init__(self, app_name: str = ROUTER_APP, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5):
        from ray import serve

        self.handle = serve.get_deployment_handle("RouterServer", app_name=app_name)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    def _call(self, method: str, *args):
        # Every router call is idempotent (assignments are logged first-writer-wins), so retrying is safe.
        return call_with_retry(lambda: getattr(self.handle, method).remote(*args).result(timeout_s=self.timeout_s),
                               f"router {method}", self.retries, self.backoff_s)

    def register_run(self, run_id: str, config: dict) -> dict:
        return self._call("register_run", run_id, config)

    def assign(self, run_id: str, step: int, rank: int = 0, micro: int = 0) -> dict:
        return self._call("assign", run_id, step, rank, micro)

    def report_loss(self, run_id: str, step: int, route: str, loss: float) -> dict:
        return self._call("report_loss", run_id, step, route, loss)

    def summary(self, run_id: str, recent: int = 20) -> dict:
        return self._call("summary", run_id, recent)
