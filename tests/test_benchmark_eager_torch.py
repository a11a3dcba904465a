"""benchmarks/eager_torch.py: a smoke run of its MLP forms on PyTorch, and its refusal of another backend."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "eager_torch.py")


def _run(backend, *arguments):
    return subprocess.run([sys.executable, SCRIPT, *arguments], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": backend})


def test_a_quick_run_times_every_form_of_the_mlp_against_keras(tmp_path):
    pytest.importorskip("torch")
    done = _run("torch", "--models", "mlp", "--rounds", "2", "--steps", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "eager_torch_cpu.json").read_text())
    forms = record["results"]["mlp"]
    assert list(forms) == ["keras", "ours", "ours, scaling off", "keras + pass-through layers",
                           "keras + identity nodes"]
    assert forms["keras"]["ratio_of_medians"] == 1.0
    assert all(row["step_us"] > 0 and row["ratio_of_medians"] > 0 for row in forms.values())
    assert (record["threads"], record["rounds"], record["steps"]) == (1, 2, 2)
    table = (tmp_path / "eager_torch_cpu.txt").read_text()
    assert "keras + identity nodes" in table and "× keras" in table


def test_another_backend_is_refused_with_the_one_it_needs(tmp_path):
    done = _run("tensorflow", "--models", "mlp", "--out", str(tmp_path))
    assert done.returncode != 0
    assert "KERAS_BACKEND=torch" in done.stderr and "Received: KERAS_BACKEND=tensorflow" in done.stderr
    assert not list(tmp_path.iterdir())
