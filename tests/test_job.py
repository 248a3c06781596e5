"""The training job entry point: config errors exit 2 before Ray starts, and an experiment arm runs as a Ray job
against its own `ray start --head` cluster (token authentication on, as Ray 2.60 defaults). The cluster guide's
`ray job submit` of the demo config runs in tests/test_cluster_guide.py."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import RayHead

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
    """A real `ray start --head` of its own (conftest.RayHead). Yields the dashboard address, the client environment,
    the GCS address and the Serve HTTP port the jobs on it use."""
    head = RayHead(tmp_path_factory.mktemp("head"), dict(os.environ))
    if not head.wait():
        head.stop()
        pytest.fail(f"ray head did not come up: {head.log_file.read_text()[-2000:]}")
    yield head.address, head.env, head.gcs, head.http_port
    head.stop()


def test_an_experiment_arm_runs_on_the_distributed_stack(head_node, tmp_path):
    """An arm with `trainers: {arm: distributed}` trains as a Ray job (python -m trainer.main) on the cluster
    that RAY_ADDRESS names, through the served teachers and the router; its result has the same form as a
    reference-trainer arm's, with the initial student's scores."""
    import yaml

    address, env, gcs, http_port = head_node
    # The cluster refuses clients without the token: the job API answers 401 to an anonymous request.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
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


def test_the_job_driver_holds_no_model(tiny_sd3_path, monkeypatch):
    """The driver (the `ray job submit` entry point, often on a GPU-less head) runs under a guard: building or loading
    any model there raises, naming the parameter; shape-only models on the meta device stay allowed (config checks
    build them); outside the guard nothing changes. (That a whole job passes under it: tests/test_cluster_shape.py.)"""
    import torch
    from diffusers import SD3Transformer2DModel

    import trainer.main
    from danceopd.placement import ModelInDriverError, no_model_weights
    from danceopd.student import StudentConfig, build_student

    with no_model_weights("the job driver"):
        with pytest.raises(ModelInDriverError, match=r"was about to be loaded in the job driver, which holds no model"):
            build_student(StudentConfig(num_layers=1))
        with pytest.raises(ModelInDriverError, match=r"\.weight"):
            SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer")
        with torch.device("meta"):
            assert torch.nn.Linear(4, 4).weight.is_meta
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"
    monkeypatch.setattr(trainer.main, "_run", lambda args: build_student(StudentConfig(num_layers=1)))
    with pytest.raises(ModelInDriverError):  # the job's own entry point runs under the guard
        trainer.main.run(None)
