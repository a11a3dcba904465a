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


def test_demo_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "demo"
    result = _run("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "plain Keras" in result.stdout and "unit-scaled" in result.stdout
    record = json.loads((out / "scales.json").read_text())
    rows = {row["tensor"]: row for row in record["rows"]}
    assert len(rows) == 12
    # The point of the demo: plain gradients far below 1, unit-scaled ones near it.
    for name in ("dense output grad", "dense_1 output grad"):
        assert rows[name]["plain_rms"] < 2**-8
        assert 0.25 < rows[name]["unit_scaled_rms"] < 4


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
