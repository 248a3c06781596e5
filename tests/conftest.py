import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(int(os.environ.get("DANCEOPD_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    # The cluster guide's blocks (docs/cluster.md) end with `ray stop` (every Ray on the machine): they run before any test's cluster.
    # The multi-node cluster of test_cluster_shape.py comes and goes next, before this process joins the session's
    # Ray (`ray_cluster`): Cluster.shutdown resets the calling process's connection state. The recipes (own local Rays, and
    # `make test-recipes`' `ray start` cluster, stopped with `ray stop`) run before the session's Ray exists too.
    first = {"test_cluster_guide.py": 0, "test_cluster_shape.py": 1, "test_recipes.py": 2}
    items.sort(key=lambda item: first.get(item.path.name, 2))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    from tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def basic_suite():
    from danceopd.suite import CapabilitySuite

    return CapabilitySuite("basic")


@pytest.fixture(scope="session")
def hard_suite():
    from danceopd.suite import CapabilitySuite

    return CapabilitySuite("hard")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once: one at a time, the system may hand the same port out twice)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class RayHead:
    """A real `ray start --head` (token authentication on, as Ray 2.60 defaults), on its own ports for every component
    (the session's Ray, or another test's, holds the defaults: a job agent that cannot bind its port never registers),
    in its own process group, so that stopping it touches no other cluster (`ray stop` would stop every Ray here)."""

    def __init__(self, folder, env: dict, num_cpus: int = 6):
        import subprocess
        import sys
        from pathlib import Path

        gcs, dash, self.http_port, *agents = free_ports(8)
        self.env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "RAY_AUTH_MODE": "token"}
        self.log_file = Path(folder) / "head.log"
        self.address, self.gcs = f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                 "ray-client-server-port")
        ports = [f"--{name}={port}" for name, port in zip(names, agents)]
        self.log = open(self.log_file, "w")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}",
                                      f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
                                      "--disable-usage-stats", *ports],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=folder)

    def wait(self, timeout_s: float = 120) -> bool:
        """Whether the dashboard (and its job API) answered within `timeout_s`."""
        import time
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return True
            except urllib.error.HTTPError:  # the dashboard answers (auth required): it is up
                return True
            except Exception:
                time.sleep(1)
        return False

    def stop(self) -> None:
        import os
        import signal
        import subprocess

        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of that cluster is still up (same process group)
        except ProcessLookupError:
            pass
        self.log.close()


TEST_TOKEN_ENV = "DANCEOPD_TEST_API_TOKEN"
TEST_TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster with Serve for the whole session (cold start ~12 s)."""
    import types

    import ray
    from ray import serve

    os.environ[TEST_TOKEN_ENV] = TEST_TOKEN  # inherited by the workers: the auth gateway reads it
    http_port, metrics_port = free_port(), free_port()
    # Metrics reach the export port every second (default 10 s), so short runs show up in Prometheus.
    ray.init(address="local", num_cpus=8, include_dashboard=False, _metrics_export_port=metrics_port, logging_level="WARNING",
             configure_logging=False, _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    yield types.SimpleNamespace(http=f"http://127.0.0.1:{http_port}", metrics_port=metrics_port)
    serve.shutdown()
    ray.shutdown()


class RedisProcess:
    """A real redis-server on loopback with append-only persistence, started and stopped by the tests."""

    def __init__(self, directory, port: int):
        self.directory, self.port, self.proc = directory, port, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        import shutil
        import subprocess
        import time

        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: run `make os-deps` (apt-get install redis-server)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes",
                                     "--appendfsync", "always", "--save", "", "--dir", str(self.directory)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not come up")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisProcess(tmp_path_factory.mktemp("redis"), free_port()).start()
    yield server
    server.stop()
