"""Experiment tracking: a run's TensorBoard event files, read back with TensorBoard's own reader and served by
`tensorboard` itself; a resumed run continues the same curves without duplicated steps."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port
from tensorboard_files import raw_steps, read_images, read_scalars
from danceopd.config import load_config
from trainer.reference import main as reference_main
from trainer.steps import lr_at

ROUTES = ("t2i", "local_edit", "global_edit")
TINY = ["student.num_layers=2", "student.attention_head_dim=16", "optim.batch_size=8", "method.rollout_steps=4", "torch_threads=2",
        "log_every=2", "checkpoint_every=4", "eval.samples_per_capability=8", "eval.sampling_steps=4", "eval.velocity_error_samples=4",
        "optim.lr_schedule=cosine", "optim.warmup_steps=3"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A reference run of 8 steps with --eval; its step-8 checkpoint lost (a crash after step 8 was logged but
    before it was saved); then resumed to step 10 with --eval."""
    out = tmp_path_factory.mktemp("tracked")
    over = [*TINY, f"output_dir={out}", "run_name=tracked"]
    assert reference_main(["--eval", *over, "steps=8"]) == 0
    run_dir = out / "tracked"
    shutil.rmtree(run_dir / "checkpoints" / "step-00000008")
    assert reference_main(["--eval", *over, "steps=10"]) == 0
    return run_dir


def test_every_series_is_written_with_its_steps_and_a_resume_adds_no_duplicates(resumed_run):
    train = resumed_run / "tensorboard" / "train"
    scalars = read_scalars(train)
    expected = {*(f"loss/{r}" for r in ROUTES), "throughput/samples_per_s", "optim/lr", "optim/grad_norm",
                *(f"time_share/{p}" for p in ("rollout", "teacher", "forward_backward", "optimizer")), *(f"route_mix/{r}" for r in ROUTES)}
    assert expected <= set(scalars), sorted(expected - set(scalars))
    assert [s for s, _ in scalars["throughput/samples_per_s"]] == [2, 4, 6, 8, 10]  # steps 6 and 8 logged twice, shown once
    assert raw_steps(train, "throughput/samples_per_s").count(6) == 2  # (the files do hold both attempts: the purge hides one)
    cfg = load_config(None, dict(o.split("=", 1) for o in TINY) | {"steps": 10})
    for step, lr in scalars["optim/lr"]:  # the learning rate of the window's last update
        assert lr == pytest.approx(lr_at(cfg, step - 1), rel=1e-6), step
    for step in (2, 4, 6, 8, 10):  # the route mix of a window sums to one; every update has a finite gradient norm
        assert sum(dict(scalars[f"route_mix/{r}"]).get(step, 0.0) for r in ROUTES) == pytest.approx(1.0)
    assert all(v > 0 for _, v in scalars["optim/grad_norm"])
    history = json.loads(sorted((resumed_run / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())["history"]
    for rec in history:  # the curves are the progress lines' numbers
        for route, loss in rec["loss"].items():
            assert dict(scalars[f"loss/{route}"])[rec["step"]] == pytest.approx(loss, rel=1e-6)


def test_evaluations_write_scores_and_grids_before_and_after(resumed_run):
    ev = resumed_run / "tensorboard" / "eval"
    scalars = read_scalars(ev)
    for r in ROUTES:  # before training (step 0), after the first attempt (8) and after the resumed run (10)
        assert [s for s, _ in scalars[f"eval/{r}/velocity_error"]] == [0, 8, 10]
        assert [s for s, _ in scalars[f"eval/{r}/student_score"]] == [0, 8, 10]
    report = json.loads((resumed_run / "report.json").read_text())
    assert dict(scalars["eval/t2i/velocity_error"])[10] == pytest.approx(report["routes"]["t2i"]["velocity_error"], rel=1e-6)
    assert read_images(ev) == {"eval/grid": [0, 8, 10]}


def test_tensorboard_serves_the_run_over_http(resumed_run):
    port = free_port()
    tb = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.Popen([str(tb), "--logdir", str(resumed_run), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        base = f"http://127.0.0.1:{port}/data"
        deadline = time.time() + 90
        while True:
            try:
                runs = json.loads(urllib.request.urlopen(f"{base}/runs", timeout=5).read())
                if "tensorboard/train" in runs and "tensorboard/eval" in runs:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "tensorboard did not serve the run"
            time.sleep(1)
        url = f"{base}/plugin/scalars/scalars?run=tensorboard/train&tag=throughput/samples_per_s"
        points = json.loads(urllib.request.urlopen(url, timeout=10).read())  # [[wall_time, step, value], ...]
        assert [p[1] for p in points] == [2, 4, 6, 8, 10]  # the resumed run's curve, once
        expected = dict(read_scalars(resumed_run / "tensorboard" / "train")["throughput/samples_per_s"])
        assert all(p[2] == pytest.approx(expected[p[1]]) for p in points)
        tags = json.loads(urllib.request.urlopen(f"{base}/plugin/images/tags", timeout=10).read())
        assert "eval/grid" in tags["tensorboard/eval"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_wandb_offline_and_mlflow_file_store_get_the_same_curves_once(tmp_path):
    """`tracking: {wandb, mlflow}` through their own libraries, no network: W&B offline files (read back record by
    record) and an MLflow file store (read back with MlflowClient). A crash and resume sends no step twice."""
    import mlflow

    from wandb_records import history

    # A constant learning rate: with the cosine schedule, resuming with more `steps` changes the redone steps' lr.
    over = [*TINY, f"output_dir={tmp_path}", "run_name=both", "tracking.wandb=true", "tracking.mlflow=true", "optim.lr_schedule=constant"]
    assert reference_main(["--eval", *over, "steps=6"]) == 0  # checkpoints at 4 and 6
    run_dir = tmp_path / "both"
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # the crash: step 6 logged, its checkpoint lost
    assert reference_main(["--eval", *over, "steps=8"]) == 0
    curves = read_scalars(run_dir / "tensorboard" / "train")
    assert sorted(dict(curves["throughput/samples_per_s"])) == [2, 4, 6, 8]
    losses = {(tag, step): v for tag, points in curves.items() if tag.startswith("loss/") for step, v in points}

    rows = history(run_dir)
    train = [r for r in rows if "train/throughput/samples_per_s" in r]
    assert [r["_step"] for r in train] == [2, 4, 6, 8]  # step 6 once, from the first attempt
    sent = {(k[len("train/"):], r["_step"]): v for r in train for k, v in r.items() if k.startswith("train/loss/")}
    assert sent == pytest.approx(losses, rel=1e-6)  # the redone steps' losses are the first attempt's, bit for bit
    assert {"train/loss/" + r for r in ROUTES} <= {k for r in train for k in r}
    evals = [r for r in rows if "eval/t2i/velocity_error" in r]
    assert [r["_step"] for r in evals] == [0, 6, 8]
    assert [r["_step"] for r in rows if r.get("eval/grid/_type") == "image-file"] == [0, 6, 8]  # the grids, as W&B images

    client = mlflow.MlflowClient((run_dir / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("danceopd").experiment_id])
    assert len(runs) == 1  # training and evaluations: one tracked run
    run_id = runs[0].info.run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "throughput/samples_per_s")) == [2, 4, 6, 8]
    logged = {(tag, m.step): m.value for tag, _ in losses for m in client.get_metric_history(run_id, tag)}
    assert logged == pytest.approx(losses, rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/t2i/velocity_error")) == [0, 6, 8]
    assert runs[0].data.params["method.rollout_steps"] == "4"
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert len(images) >= 3, images  # the evaluation grids

    assert reference_main(["--no-resume", *over, "steps=2"]) == 0  # a new run in the same folder: a new tracked run
    assert len(client.search_runs([client.get_experiment_by_name("danceopd").experiment_id])) == 2
