"""benchmarks/tf_schedule.py: its probe optimizer keeps the script's numbers, a smoke run, and its refusal of another
backend."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "tf_schedule.py")


def _run(backend, *arguments):
    return subprocess.run([sys.executable, SCRIPT, *arguments], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "KERAS_BACKEND": backend})


def test_one_more_variable_keeps_the_optimizers_numbers_and_adds_one_variable():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import tf_schedule
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))

    def trained(optimizer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer, "mse")
        x, y = np.random.default_rng(0).normal(size=(2, 32, 4)).astype("float32")
        model.fit(x, y[:, :3], batch_size=8, epochs=2, verbose=0, shuffle=False)
        return model

    keras_rmsprop = keras.optimizers.RMSprop(0.01, rho=0.8)
    probe = tf_schedule.with_one_more_variable(keras.optimizers.RMSprop(0.01, rho=0.8))
    assert isinstance(probe, keras.optimizers.RMSprop) and probe.rho == 0.8
    plain, probed = trained(keras_rmsprop), trained(probe)
    for a, b in zip(plain.get_weights(), probed.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert len(probe.variables) == len(keras_rmsprop.variables) + 1
    assert float(keras.ops.convert_to_numpy(probe._one)) == 1.0


def test_a_quick_run_times_every_form_against_the_script(tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow benchmark")
    done = _run("tensorflow", "--quick", "--steps", "4", "--rounds", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "tf_schedule_tensorflow_cpu.json").read_text())
    forms = record["results"]["char_lstm"]
    assert list(forms) == ["script", "script + one variable", "script, our optimizer", "callback"]
    assert forms["script"]["ratio_to_script"] == 1.0
    assert all(row["step_ms"] > 0 and row["ratio_to_script"] > 0 for row in forms.values())
    # One more variable times 1.0 is the script's training to the bit.
    assert forms["script + one variable"]["final_train_loss"] == forms["script"]["final_train_loss"]
    assert abs(forms["script, our optimizer"]["final_train_loss"] / forms["script"]["final_train_loss"] - 1) < 1e-4
    table = (tmp_path / "tf_schedule_tensorflow_cpu.txt").read_text()
    assert "| script + one variable |" in table and "inter-op threads: TensorFlow's default" in table


def test_another_backend_is_refused_with_the_one_it_needs(tmp_path):
    # PyTorch or JAX, whichever is installed (the README's test environment has neither: CI runs this in PyTorch's).
    other = next((name for name in ("torch", "jax") if importlib.util.find_spec(name)), None)
    if other is None:
        pytest.skip("neither PyTorch nor JAX is installed")
    done = _run(other, "--quick", "--out", str(tmp_path))
    assert done.returncode != 0
    assert "KERAS_BACKEND=tensorflow" in done.stderr and f"Received: KERAS_BACKEND={other}" in done.stderr
    assert not list(tmp_path.iterdir())
