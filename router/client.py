"""RouterClient: trainers ask the router deployment for assignments and report losses (timeout + retry)."""

from __future__ import annotations

from danceopd.remote import PendingCall, RequestError

ROUTER_APP = "router"


class RouterClient:
    def __init__(self, app_name: str = ROUTER_APP, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5,
                 run: tuple[str, dict] | None = None):
        """`run` = (run id, routing config): if the router answers "unknown run" (a restarted replica of an in-memory
        router has forgotten it), the client registers it again and resends the call once."""
        from ray import serve

        self.handle = serve.get_deployment_handle("RouterServer", app_name=app_name)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.run = run

    def send(self, method: str, *args) -> PendingCall:
        """Send a call now and wait later (`.result()`). Every router call is idempotent (assignments are logged
        first-writer-wins), so retrying is safe."""
        return PendingCall(lambda: getattr(self.handle, method).remote(*args), f"router {method}", self.timeout_s,
                           self.retries, self.backoff_s, recover=self._register_again if self.run else None)

    def _register_again(self, e: RequestError) -> bool:
        if e.field != "run" or e.status != 404:
            return False
        # Registration is idempotent (the same config re-attaches), so every rank may do this at once.
        self.send("register_run", *self.run).result()
        return True

    def register_run(self, run_id: str, config: dict) -> dict:
        return self.send("register_run", run_id, config).result()

    def assign(self, run_id: str, step: int, rank: int = 0, micro: int = 0) -> dict:
        return self.send("assign", run_id, step, rank, micro).result()

    def report_loss(self, run_id: str, step: int, route: str, loss: float) -> dict:
        return self.send("report_loss", run_id, step, route, loss).result()

    def summary(self, run_id: str, recent: int = 20) -> dict:
        return self.send("summary", run_id, recent).result()
