"""The command line, run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "keras_unitscale", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_quick_demo_writes_its_table_plots_and_json(tmp_path):
    out = tmp_path / "demo"
    result = _run("demo", "--quick", "--steps", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "results.json").read_text())
    assert record["settings"]["steps"] == 30 and record["backend"] == "tensorflow"
    rows = {(row["task"], row["variant"], row["precision"]): row for row in record["rows"]}
    assert len(rows) == 15 and all(row["finite"] for row in rows.values())
    # --steps is the LM's training; the MLP keeps its own.
    assert rows["transformer", "plain", "float32"]["curve"]["step"][-1] == 30
    assert rows["mlp", "plain", "float32"]["curve"]["step"][-1] == record["settings"]["mlp_steps"]
    for name in ("loss_curves.png", "scales.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows.values():
        assert row["label"] in result.stdout
    assert "unit-scaled runs within 2% of their float32 loss" in result.stdout
    # Scale-free FP8 flushes the plain LM's small gradients; the unit-scaled LM's sit near 1.
    plain, ours = rows["transformer", "plain", "fp8"], rows["transformer", "ours", "fp8"]
    assert plain["gradient_format"] == "E5M2"
    assert plain["gradient_underflow"] > 10 * ours["gradient_underflow"]
    assert abs(ours["vs_float32"]) < 0.02 and abs(rows["transformer", "ours", "fp16"]["vs_float32"]) < 0.02
    # One report per float32 run but the callback's: its model is converted as it trains, and a report of the
    # task's model rebuilt with its weights would describe another model.
    assert len(record["scale_reports"]) == 4
    assert all(title.endswith("trained, float32") for title in record["scale_reports"])
    assert not any("UnitScaleCallback" in title for title in record["scale_reports"])
    assert not any("gradient_underflow" in row for key, row in rows.items() if key[1] == "callback")


@pytest.mark.parametrize("steps", ["0", "-3", "many"])
def test_steps_must_be_a_positive_integer(steps):
    result = _run("demo", "--steps", steps)
    assert result.returncode == 2
    assert f"must be a positive integer. Received: {steps!r}" in result.stderr


def test_bad_option_exits_non_zero_with_a_message():
    result = _run("demo", "--steps-per-moon", "3")
    assert result.returncode == 2
    assert "unrecognized arguments: --steps-per-moon" in result.stderr


def test_unknown_backend_is_refused():
    result = _run("demo", "--backend", "numpyish")
    assert result.returncode == 2
    assert "invalid choice: 'numpyish'" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = _run("demo", "--out", str(locked / "demo"))
    assert result.returncode != 0
    assert "cannot write to --out" in result.stderr


def test_output_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _run("demo", "--out", str(blocker))
    assert result.returncode != 0
    assert "cannot write to --out" in result.stderr
