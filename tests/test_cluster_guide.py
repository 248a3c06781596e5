"""The cluster guide's command blocks (docs/cluster.md: `ray start`, `serve deploy` + `danceopd query` + curl,
`ray job submit`, `ray stop`) run as written in a clean shell: a fresh environment (PATH=/usr/local/bin:/usr/bin:/bin, HOME), from the
repository root, with a shorter training job and the outputs in a temporary folder. The job's console is counted
and checked for framework noise, and its outputs (report, student, TensorBoard files) are read back.

The blocks start a Ray head on Ray's default ports and end with `ray stop`, which stops every Ray on the machine:
conftest runs this test first in the session, before the tests' own cluster exists; it is skipped (saying why)
when another Ray is running here."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tensorboard_files import read_images, read_scalars

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- docs-test: cluster -->\n```bash\n(.*?)```", re.S)
SHORT = ("steps=12 log_every=4 checkpoint_every=6 method.rollout_steps=4 eval.samples_per_capability=12 "
         "eval.sampling_steps=4")
NOISE = ("Traceback", "Reporting training result", " INFO ", "WARNING", "find_unused_parameters", "Writing model shards",
         "Loading weights", "PlacementGroupCleaner", "(raylet)")


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_readme_cluster_blocks_run_as_written(tmp_path):
    busy = [p for p in (6379, 8265, 8000) if port_in_use(p)]
    if busy or subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet"], capture_output=True).returncode == 0:
        pytest.skip(f"another Ray runs on this machine (ports in use: {busy}): the README's `ray stop` would stop it")
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the README's blocks run after `make install` (.venv)")
    blocks = BLOCK.findall((ROOT / "docs" / "cluster.md").read_text())
    assert len(blocks) == 3, "the cluster guide's tested blocks moved: update this test"
    script = "\n".join(blocks)
    assert "output_dir=$PWD/runs" in script and "--out query-out" in script
    script = script.replace("output_dir=$PWD/runs", f"output_dir={tmp_path}/runs {SHORT}").replace("--out query-out", f"--out {tmp_path}/q")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ["HOME"], "LANG": "C.UTF-8"}
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=120)  # after a failure
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-5000:]

    # serve deploy + danceopd query + curl
    assert (tmp_path / "q" / "velocity.npy").exists() and (tmp_path / "q" / "x0.png").exists()
    assert re.search(r"teacher t2i: velocity \[1, 3, 16, 16\]", out), out[-3000:]
    fields, _ = json.JSONDecoder().raw_decode(out[out.index('{"fields"'):])  # curl's answer (no newline after it)
    assert {f["name"] for f in fields["fields"]} >= {"t2i", "local_edit", "global_edit"}

    # ray job submit: the job attached to the deployed services and trained; its console is quiet and legible
    assert "succeeded" in out, out[-3000:]
    job_part = out.split("Running entrypoint for job", 1)[1].splitlines()[1:]
    job_part = job_part[:next(i for i, ln in enumerate(job_part) if "succeeded" in ln)]  # then `ray job submit` and `ray stop` speak
    job = [ln for ln in job_part if ln.strip() and "cli.py:" not in ln]
    assert any(ln.startswith("attached to") for ln in job) and "started a local Ray" not in out
    assert any("attached to running teachers" in ln for ln in job), "\n".join(job)
    assert any(ln.startswith("step    12/12") and "samples/s" in ln and "ETA" in ln for ln in job)
    for noise in NOISE:  # Ray's own warnings are summarised in (at most) one `note:` line that names the file
        assert not [ln for ln in job if noise in ln and not ln.startswith("note: ")], (noise, "\n".join(job))
    assert len([ln for ln in job if ln.startswith("note: ")]) <= 1
    assert len([ln for ln in job if not ln.startswith("step ")]) <= 40, "\n".join(job)
    run_dir = tmp_path / "runs" / "demo"
    assert f"framework logs: {run_dir / 'logs'}/driver.log" in out
    assert (run_dir / "logs" / "driver.log").stat().st_size > 0  # what the console left out is in the file

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["routes"]) == {"t2i", "local_edit", "global_edit"}
    assert report["training"]["steps"] == 12 and report["training"]["workers"] == 2
    assert (run_dir / "grid.png").exists() and (run_dir / "grid-before.png").exists()
    assert (run_dir / "student" / "transformer" / "config.json").exists()  # save_pretrained layout
    # Tracking: rank 0's curves (one point per log window) and the driver's evaluations (scores + grids, before/after).
    assert f"tensorboard: {run_dir / 'tensorboard'}" in out
    train = read_scalars(run_dir / "tensorboard" / "train")
    assert [s for s, _ in train["throughput/samples_per_s"]] == [4, 6, 8, 12] and "optim/grad_norm" in train  # log windows + checkpoints
    assert read_images(run_dir / "tensorboard" / "eval") == {"eval/grid": [0, 12]}
    assert [s for s, _ in read_scalars(run_dir / "tensorboard" / "eval")["eval/t2i/velocity_error"]] == [0, 12]
