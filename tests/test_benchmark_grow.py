"""benchmarks/grow.py: a smoke run, whose curve does not jump at growth, and its count of steps saved."""

import json
import os
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import grow  # noqa: E402  (the benchmark module, from benchmarks/)


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_a_smoke_run_grows_width_and_depth_without_a_jump(model, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "grow.py"), "--model", model, "--steps-before", "4",
               "--steps-after", "4", "--targets", "128x2", "64x4", "--validation", "16", "--smooth", "2",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": keras.backend.backend()})
    assert done.returncode == 0, done.stderr[-2000:]
    (record_file,) = tmp_path.glob("grow_*.json")
    record = json.loads(record_file.read_text())
    assert [row["target"] for row in record["rows"]] == ["128x2", "64x4"]
    for row in record["rows"]:
        # The grown model computes what the base did: its validation loss just after growth is the base's.
        assert row["validation_just_after"] == pytest.approx(row["base_validation"], rel=1e-5)
        assert len(row["grown"]["curve"]) == 4 and len(row["scratch"]["curve"]) == 8
    assert (tmp_path / record_file.name.replace(".json", ".png")).exists()
    assert "| 64x4 |" in next(tmp_path.glob("grow_*.txt")).read_text()


def test_steps_saved_counts_from_the_first_step_the_grown_curve_reaches_scratchs_final_loss():
    base, scratch = [3.0, 2.8], [3.0, 2.9, 2.7, 2.6, 2.5, 2.4]  # scratch ends at 2.45 (mean of its last 2)
    # Base then grown, as running means of 2: 3.0, 2.9 | 2.7, 2.5, 2.35, 2.25: at 2.45 or below after step 5 of 6.
    assert grow.steps_saved(base, [2.6, 2.4, 2.3, 2.2], scratch, window=2) == 6 - 5
    assert grow.steps_saved(base, [2.7, 2.6, 2.5, 2.5], scratch, window=2) is None
