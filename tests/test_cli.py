"""`danceopd eval`: report and grid from a saved student; bad input exits 2 with a message."""

import json
import subprocess
import sys

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
