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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
