"""Data parallel training gives one device's losses; a model-parallel layout builds and trains.

Each case runs in its own Python process: TensorFlow's logical devices and
JAX's host device count must be set before the backend starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TRAIN = """
import json, os, warnings
warnings.simplefilter("ignore")
import numpy as np
import keras
from keras_unitscale import callbacks, losses, models, optimizers

OPTIMIZERS = {"sgd": lambda: optimizers.SGD(0.1), "adam": lambda: optimizers.Adam(0.02)}
x = np.random.default_rng(1).integers(0, 30, (64, 16))
y = np.roll(x, -1, 1)


def losses_of(optimizer, scope):
    keras.utils.set_random_seed(0)
    with scope():
        model = models.transformer_lm(30, 32, 2, head_dim=16, seq_len=16)
        model.compile(OPTIMIZERS[optimizer](), losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(float(logs["loss"])))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[callbacks.UnitScaleCallback(verbose=0), record])
    return seen
"""

TENSORFLOW = """
import contextlib
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""" + TRAIN + """
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(json.dumps({name: [losses_of(name, contextlib.nullcontext), losses_of(name, mirrored.scope)]
                  for name in OPTIMIZERS}))
"""

JAX = TRAIN + """
import contextlib
import jax


@contextlib.contextmanager
def data_parallel():
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


assert len(jax.devices()) == 2
result = {name: [losses_of(name, contextlib.nullcontext), losses_of(name, data_parallel)] for name in OPTIMIZERS}

# Model parallel: our kernels split over the "model" axis of a 1×2 mesh.
from keras_unitscale import layers as L
mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], jax.devices())
layout = keras.distribution.LayoutMap(mesh)
layout[".*hidden.*/kernel"] = (None, "model")
keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch"))
model = keras.Sequential([keras.Input((8,)), L.Dense(16, activation="relu", name="hidden0"),
                          L.Dense(16, activation="relu", name="hidden1"), L.Dense(1, role="output", name="readout")])
kernel = model.get_layer("hidden0").kernel
model.compile(optimizers.Adam(0.01), losses.MeanSquaredError())
features = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
step_loss = model.train_on_batch(features, features[:, :1])
result["model_parallel"] = {"sharding": str(kernel.value.sharding.spec), "loss": float(step_loss)}
print(json.dumps(result))
"""


def _run(script, backend, tmp_path, **env):
    path = tmp_path / f"distributed_{backend}.py"
    path.write_text(textwrap.dedent(script))
    environment = {**os.environ, "KERAS_BACKEND": backend, **env}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_same_losses(result):
    for optimizer in ("sgd", "adam"):
        one_device, two_replicas = (np.array(losses) for losses in result[optimizer])
        assert len(one_device) == 4 and np.isfinite(one_device).all()
        # SGD is not invariant to a gradient's scale: it checks the global-batch rule.
        np.testing.assert_allclose(two_replicas, one_device, rtol=1e-5, err_msg=optimizer)


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow", reason="runs once, on TensorFlow")
def test_mirrored_strategy_over_two_cpus_gives_one_devices_losses(tmp_path):
    pytest.importorskip("tensorflow")
    _assert_same_losses(_run(TENSORFLOW, "tensorflow", tmp_path))


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") != "jax", reason="runs once, on JAX")
def test_jax_data_parallel_gives_one_devices_losses_and_model_parallel_trains(tmp_path):
    result = _run(JAX, "jax", tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _assert_same_losses(result)
    assert "model" in result["model_parallel"]["sharding"]
    assert np.isfinite(result["model_parallel"]["loss"])
