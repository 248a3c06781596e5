"""The training job entry point: config errors exit 2 before Ray starts, and `ray job submit` of the demo config
runs for real against its own `ray start --head` cluster (token authentication on, as Ray 2.60 defaults)."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_main(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "trainer.main", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--config", "configs/nope.yaml"], "configs/nope.yaml does not exist"),
    (["--config", "configs/demo.yaml", "optim.batch_size=33"], "must divide by cluster.num_workers"),
    (["--config", "configs/demo.yaml", "cluster.num_workrs=4"], "cluster.num_workrs: Extra inputs are not permitted"),
    (["--config", "configs/demo.yaml", "services.teachers.nope.num_replicas=2"], "services.teachers names ['nope']"),
    (["--config", "configs/demo.yaml", "method.routing=soft"], "method.routing"),
    (["--config", "configs/gpu-cluster.yaml", "student.base=./models/nope"], "base folder ./models/nope does not exist"),
    (["--config", "configs/demo.yaml", "services.http_host=0.0.0.0"], "$DANCEOPD_API_TOKEN is unset"),  # never open beyond loopback
    (["--config", "configs/demo.yaml", "services.api_auth.auth=maybe"], "services.api_auth.auth"),
])
def test_bad_job_config_exits_2_naming_the_key_before_ray_starts(args, needle):
    t0 = time.perf_counter()
    proc = run_main(*args)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert "started a local Ray" not in proc.stdout and time.perf_counter() - t0 < 60


def test_resume_with_changed_settings_is_refused_naming_the_keys_before_ray_starts(tmp_path):
    from trainer.cli import check_resume_config
    from trainer.job import load_job_config

    out = f"output_dir={tmp_path}"
    check_resume_config(load_job_config("configs/demo.yaml", {"output_dir": str(tmp_path)}), fresh=True, allow_change=False)
    t0 = time.perf_counter()
    proc = run_main("--config", "configs/demo.yaml", out, "optim.lr=0.5", "method.k=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "method.k: 1 -> 2" in proc.stderr and "optim.lr: 0.001 -> 0.5" in proc.stderr and "--allow-config-change" in proc.stderr
    assert "started a local Ray" not in proc.stdout and time.perf_counter() - t0 < 60


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A real `ray start --head` (own ports, own process group so that stopping it cannot touch the test
    session's cluster; `ray stop` would kill every Ray on the machine). Yields the dashboard address, the
    client environment, the GCS address and the Serve HTTP port the jobs on it use."""
    tmp_path = tmp_path_factory.mktemp("head")
    gcs, dash, http_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    log = open(tmp_path / "head.log", "w")
    # Own ports for every agent too: the session's Ray (other tests) holds the defaults, and a job agent that
    # cannot bind its port never registers ("No available agent to submit job").
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")]
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=6", "--disable-usage-stats", *ports],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # the dashboard answers (auth required): it is up
            break
        except Exception:
            time.sleep(1)
    else:
        pytest.fail(f"ray head did not come up: {(tmp_path / 'head.log').read_text()[-2000:]}")
    yield address, env, f"127.0.0.1:{gcs}", http_port
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of that cluster is still up (same process group)
    except ProcessLookupError:
        pass
    log.close()


def test_ray_job_submit_runs_the_demo_config(head_node, tmp_path):
    address, env, _, http_port = head_node
    # The cluster refuses clients without the token: the job API answers 401 to an anonymous request.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)

    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "benchmarks/results"]}), "--",
           "python", "-m", "trainer.main", "--config", "configs/demo.yaml", "--eval", f"output_dir={out}",
           "steps=12", "log_every=4", "checkpoint_every=6", "student.num_layers=2", "method.rollout_steps=4",
           "eval.samples_per_capability=12", "eval.sampling_steps=4", f"services.http_port={http_port}"]
    deadline = time.time() + 90
    while True:  # the job agent registers a few seconds after the dashboard answers
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        logs = proc.stdout + proc.stderr
        if "No available agent to submit job" not in logs or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs, logs[-3000:]
    assert "attached to" in logs and "started a local Ray" not in logs  # the driver joined the head's cluster
    assert "deployed teachers ['t2i', 'local_edit', 'global_edit']" in logs
    assert "step    12/12" in logs and "samples/s" in logs and "ETA" in logs  # progress from rank 0
    # A quiet console: what Ray, Serve, Ray Train and torch say stays in the log files the job names.
    # (The lines before "Running entrypoint" and those from cli.py are the `ray job submit` CLI's own.)
    job_out = [ln for ln in logs.split("Running entrypoint for job", 1)[1].splitlines()[1:] if ln.strip() and "cli.py:" not in ln]
    for noise in ("Traceback", "Reporting training result", " INFO ", "find_unused_parameters", "Writing model shards",
                  "Loading weights", "PlacementGroupCleaner"):
        assert not [ln for ln in job_out if noise in ln], (noise, "\n".join(job_out))
    assert len([ln for ln in job_out if not ln.startswith("step ")]) <= 40, "\n".join(job_out)
    assert f"framework logs: {out / 'demo' / 'logs'}/driver.log" in logs
    report = json.loads((out / "demo" / "report.json").read_text())
    assert set(report["routes"]) == {"t2i", "local_edit", "global_edit"}
    assert report["training"]["steps"] == 12 and report["training"]["workers"] == 2
    assert report["before"] is not None and (out / "demo" / "grid.png").exists() and (out / "demo" / "grid-before.png").exists()
    assert (out / "demo" / "student" / "transformer" / "config.json").exists()  # save_pretrained layout
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/router/v1/runs", timeout=30) as resp:  # the run left 'running'
        assert [r["status"] for r in json.loads(resp.read())["runs"]] == ["finished"]


def test_an_experiment_arm_runs_on_the_distributed_stack(head_node, tmp_path):
    """An arm with `trainers: {arm: distributed}` trains as a Ray job (python -m trainer.main) on the cluster
    that RAY_ADDRESS names, through the served teachers and the router; its result has the same form as a
    reference-trainer arm's, with the initial student's scores."""
    import yaml

    _, env, gcs, http_port = head_node
    spec = tmp_path / "dist.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "dist", "base": "configs/demo.yaml", "seeds": [0], "eval_before": True, "trainers": {"ray": "distributed"},
        "arms": {"ray": {"torch_threads": 1, "services.http_port": http_port}},
        "claims": [{"kind": "at_least", "metric": "t2i.score", "value": -1.0}]}))
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "danceopd"), "experiment", str(spec), "--smoke", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env={**env, "RAY_ADDRESS": gcs})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run_dir = out / "dist" / "ray" / "seed0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 4 and set(result["routes"]) == {"t2i", "local_edit", "global_edit"}
    assert set(result["before"]) == set(result["routes"]) and "coverage" in result["routes"]["t2i"]
    assert [h["step"] for h in result["history"]] and all(set(h["loss"]) <= set(result["routes"]) for h in result["history"])
    report = json.loads((run_dir / "report.json").read_text())  # the job's own report: it ran on Ray Train workers
    assert report["training"]["workers"] == 2 and (run_dir / "student" / "transformer" / "config.json").exists()
