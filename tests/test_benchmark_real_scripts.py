"""benchmarks/real_scripts.py: a smoke run over two seeds, its table aggregating them against each seed's reference,
and its step times taken in interleaved rounds."""

import json
import os
import subprocess
import sys

import keras

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_quick_run_over_two_seeds_reports_each_cell_over_both(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "real_scripts.py"), "--quick", "--steps", "6",
               "--models", "convnet", "--variants", "script", "callback", "--precisions", "float32",
               "--seeds", "2", "--timing-repeats", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": keras.backend.backend()})
    assert done.returncode == 0, done.stderr[-2000:]
    (record_file,) = tmp_path.glob("real_scripts_*.json")
    rows = json.loads(record_file.read_text())["rows"]
    # The script's float32 run (the reference) and the callback's, once per seed.
    assert sorted((row["seed"], row["variant"]) for row in rows) == [
        (0, "callback"), (0, "script"), (1, "callback"), (1, "script")]
    assert all("error" not in row for row in rows)
    assert rows[0]["final_train_loss"] != rows[2]["final_train_loss"]  # the seeds differ
    # Seed 0's trained models are timed in interleaved rounds, the script's ratio to itself 1.
    timed = {row["variant"]: row.get("interleaved_step_ratio") for row in rows if row["seed"] == 0}
    assert timed["script"] == 1.0 and timed["callback"] > 0
    assert all("interleaved_step_ms" not in row for row in rows if row["seed"] == 1)
    table = next(tmp_path.glob("real_scripts_*.txt")).read_text()
    assert "over seeds [0, 1]" in table and "timed after training in interleaved rounds" in table
    callback_line = next(line for line in table.splitlines() if line.startswith("| callback | float32 |"))
    assert " ± " in callback_line and "| 3/3 |" in callback_line
    assert "the script's float32 final loss from seed to seed" in table
