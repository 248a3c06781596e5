"""The `danceopd` command: help for every subcommand, bad input exits 2 naming the key, `eval` and `train --reference` for real."""

import json
import subprocess
import sys

import pytest

from PIL import Image

from danceopd.student import StudentConfig, build_student


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "danceopd_cli", *args], capture_output=True, text=True, timeout=300)


def test_eval_writes_report_and_grid(tmp_path):
    build_student(StudentConfig(num_layers=1, seed=0)).save_pretrained(tmp_path / "student")
    proc = run_cli("eval", "--student", str(tmp_path / "student"), "--out", str(tmp_path / "eval"),
                   "eval.samples_per_capability=12", "eval.sampling_steps=4", "eval.samples_per_condition_in_grid=2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["routes"]) == {"t2i", "local_edit", "global_edit"}
    t2i = report["routes"]["t2i"]
    assert t2i["teacher"]["score"] == 1.0 and t2i["student"]["score"] <= 0.2  # a random student fails
    assert t2i["diversity"]["teacher"]["modes_hit"] == 12 and "coverage_vs_teacher" in t2i["diversity"]
    assert "psnr_db" in report["routes"]["global_edit"]["student"]
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.width > 400 and grid.height > 3 * 3 * 64  # 3 routes x 3 conditions x 64 px rows
    assert "t2i" in proc.stdout and "report:" in proc.stdout


def test_eval_bad_input_exits_2(tmp_path):
    proc = run_cli("eval", "--student", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "danceopd_student.json" in proc.stderr and "Traceback" not in proc.stderr
    build_student(StudentConfig(num_layers=1)).save_pretrained(tmp_path / "s")
    proc = run_cli("eval", "--student", str(tmp_path / "s"), "suite.tier=hard", "student.sample_size=32")
    assert proc.returncode == 2 and "suite.tier" in proc.stderr
    proc = run_cli("eval", "--student", str(tmp_path / "s"), "eval.sampling_steps=0")
    assert proc.returncode == 2 and "eval.sampling_steps" in proc.stderr


def test_danceopd_help_names_every_command_and_each_says_what_it_does():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "serve", "query", "eval", "experiment", "bench"):
        assert f"    {command} " in proc.stdout, command
    says = {"train": "--reference", "serve": "teachers file", "query": "--wait", "eval": "--student", "experiment": "--smoke",
            "bench": "samples/s"}
    for command, needle in says.items():
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and needle in sub.stdout, (command, sub.stdout)


@pytest.mark.parametrize("args, needle", [
    (["train", "--reference", "optim.lrr=1"], "optim.lrr: Extra inputs are not permitted"),
    (["train", "--config", "configs/demo.yaml", "cluster.num_workrs=4"], "cluster.num_workrs: Extra inputs are not permitted"),
    (["train", "tracking.wandb.mode=sometimes"], "tracking.wandb"),
    (["bench", "step", "optim.lrr=1"], "optim.lrr: Extra inputs are not permitted"),
    (["bench", "nope"], "invalid choice: 'nope'"),
    (["query", "t2i", "--sigma", "2"], "--sigma 2.0 must lie in [0, 1]"),
])
def test_a_bad_key_exits_2_naming_it(args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "started a local Ray" not in proc.stdout


def test_serve_refuses_a_bad_teachers_file_naming_the_key(tmp_path):
    bad = tmp_path / "teachers.yaml"
    bad.write_text("teachers:\n  - name: t2i\n    field: {kind: suite, capability: t2i}\n    replicas: 2\n")
    proc = run_cli("serve", str(bad), "--logs", str(tmp_path / "logs"))
    assert proc.returncode == 2 and "teachers.0.replicas: Extra inputs are not permitted" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "logs").exists()  # refused before Ray started


def test_train_reference_trains_and_tracks(tmp_path):
    proc = run_cli("train", "--reference", f"output_dir={tmp_path}", "steps=4", "log_every=2", "student.num_layers=1",
                   "optim.batch_size=8", "method.rollout_steps=4")
    assert proc.returncode == 0, proc.stderr
    assert "step     4/4" in proc.stdout and f"checkpoint: {tmp_path}/run/checkpoints/step-00000004" in proc.stdout
    assert f"tensorboard: {tmp_path}/run/tensorboard" in proc.stdout
    assert list((tmp_path / "run" / "tensorboard" / "train").glob("events.out.tfevents.*"))


def test_serve_deploys_a_teachers_file_that_answers_queries_until_stopped(tmp_path):
    """`danceopd serve` on its own local Ray: the teacher answers `danceopd query` over REST; SIGTERM stops it."""
    import os
    import signal
    import time

    from conftest import free_port

    teachers = tmp_path / "teachers.yaml"
    teachers.write_text("teachers:\n  - name: t2i\n    field: {kind: suite, capability: t2i, tier: basic}\n"
                        "    ray_actor_options: {num_cpus: 0.25}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "danceopd_cli", "serve", str(teachers), "--port", str(port), "--logs",
                             str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        lines = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "until Ctrl-C" in line:
                break
        assert lines and "until Ctrl-C" in lines[-1], "".join(lines) + proc.stderr.read() if proc.poll() is not None else "".join(lines)
        assert any("deployed 1 teachers ['teacher-t2i'], teacher-gateway and router" in ln for ln in lines), "".join(lines)
        import urllib.request

        rest = next(ln for ln in lines if ln.startswith("REST: ")).split()[1]  # the URL it prints answers
        assert [f["name"] for f in json.loads(urllib.request.urlopen(rest, timeout=30).read())["fields"]] == ["t2i"]
        q = run_cli("query", "t2i", "--sigma", "0.5", "--prompt", "a red circle", "--url", f"http://127.0.0.1:{port}",
                    "--wait", "60", "--out", str(tmp_path / "q"))
        assert q.returncode == 0, q.stderr
        assert (tmp_path / "q" / "velocity.npy").exists() and "velocity [1, 3, 16, 16]" in q.stdout
        assert len(lines) <= 6 and not any("INFO" in ln for ln in lines)  # Ray and Serve went to the log file
        assert (tmp_path / "logs" / "serve.log").stat().st_size > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_prefetch_fetches_every_model_of_a_config_into_the_cache_and_names_what_it_cannot_reach(tmp_path):
    """`danceopd prefetch`, offline (HF_HUB_OFFLINE): local folders are measured, a hub id already in the Hugging Face
    cache (laid out as the hub writes it) is taken from there (exit 0, a size per model); a hub id that is not cached
    is one line naming it and its key (exit 1, no traceback); a bad config exits 2 naming the key."""
    import os
    import shutil

    from danceopd.testing.tiny import build_random_lora, build_tiny_pipeline

    flux = build_tiny_pipeline("flux", tmp_path / "flux", seed=0)
    lora = build_random_lora(flux, tmp_path / "lora", rank=4, seed=1)
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-flux" / "snapshots" / ("0" * 40)
    shutil.copytree(flux, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"student": {"base": str(flux)}, "routes": {
        "t2i": {"capability": "t2i", "teacher": {"loras": [{"path": str(lora)}]}},
        "hub": {"capability": "t2i", "teacher": {"base": "acme/tiny-flux", "family": "flux"}}}}))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def prefetch(*extra):
        return subprocess.run([sys.executable, "-m", "danceopd_cli", "prefetch", "--config", str(config), *extra], capture_output=True,
                              text=True, timeout=300, env=env)

    proc = prefetch()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"3 models named by {config}; Hugging Face cache: {tmp_path / 'hf' / 'hub'}")
    assert any(ln.split()[:2] == ["student.base", str(flux)] and ln.rstrip().endswith("local") for ln in lines)
    assert any(ln.split()[:2] == ["routes.t2i.teacher.loras.0", str(lora)] for ln in lines)
    assert any(ln.split()[:2] == ["routes.hub.teacher.base", "acme/tiny-flux"] and ln.rstrip().endswith(str(snapshot)) for ln in lines)
    assert lines[-1].startswith("3 of 3 models ready, ") and proc.stderr == ""
    proc = prefetch("routes.hub.teacher.base=acme/not-cached")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == ["error: cannot fetch acme/not-cached (routes.hub.teacher.base): not in the cache, and "
                                        "HF_HUB_OFFLINE forbids downloading it"]
    assert proc.stdout.splitlines()[-1].startswith("2 of 3 models ready")
    proc = prefetch("student.lora.rnk=2")
    assert proc.returncode == 2 and "student.lora.rnk" in proc.stderr
