"""Resume from a weights-only checkpoint in a fresh process: the same losses as the uninterrupted run.

Issue 18, item 6. A run is killed mid-epoch (an exception in epoch 3, after
the checkpoints of epoch 2 were written) and resumed, in a new Python
process, from each of Keras's weights-only checkpoints: `BackupAndRestore`,
`ModelCheckpoint(save_weights_only=True)` and `save_weights` / `load_weights`.
The weight multipliers and fixed learning-rate multipliers travel with the
weights (`weights.saved_state`), and our optimizers keep a state loaded
before they are built for the build, so the resumed run's losses equal the
uninterrupted run's.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

SETUP = """
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
import keras
from keras_unitscale import callbacks, convert, layers as L, losses, optimizers

SETUP, DIRECTORY = sys.argv[1], sys.argv[2]
x = np.random.default_rng(1).normal(size=(96, 12)).astype("float32")
y = (x[:, :1] * x[:, 1:2] > 0).astype("float32")


def model_and_callbacks():
    keras.utils.set_random_seed(0)
    if SETUP == "callback":  # our layers, UnitScaleCallback moves the weights at the start
        model = keras.Sequential([keras.Input((12,)), L.Dense(32, activation="relu"), L.Dense(16, activation="relu"),
                                  L.Dense(1, activation="sigmoid", role="output")])
        extra = [callbacks.UnitScaleCallback(verbose=0)]
    else:  # a plain model's unit_scale twin: weight and fixed learning-rate multipliers on every weight
        plain = keras.Sequential([keras.Input((12,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
        model = convert.unit_scale(plain)
        extra = []
    model.compile(optimizers.Adam(0.01), losses.BinaryCrossentropy())
    return model, extra


class Record(keras.callbacks.Callback):
    def __init__(self, kill_at=None):
        super().__init__()
        self.losses, self.kill_at, self.epoch = [], kill_at, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            self.model.save_weights(DIRECTORY + "/saved.weights.h5")

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        if (self.epoch, batch) == self.kill_at:
            raise KeyboardInterrupt("killed mid-epoch")


def fit(model, record, more, initial_epoch=0):
    model.fit(x, y, batch_size=16, epochs=4, initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=more + [record])
"""

FIRST = SETUP + """
model, extra = model_and_callbacks()
whole = Record()
fit(model, whole, extra)

model, extra = model_and_callbacks()
checkpoints = [keras.callbacks.BackupAndRestore(DIRECTORY + "/backup"),
               keras.callbacks.ModelCheckpoint(DIRECTORY + "/epoch{epoch}.weights.h5", save_weights_only=True)]
try:
    fit(model, Record(kill_at=(2, 3)), extra + checkpoints)
except KeyboardInterrupt:
    pass
print(json.dumps(whole.losses))
"""

RESUME = SETUP + """
resumed = {}
model, extra = model_and_callbacks()
record = Record()
fit(model, record, extra + [keras.callbacks.BackupAndRestore(DIRECTORY + "/backup")])  # resumes at epoch 2
resumed["backup_and_restore"] = record.losses
for name, path in (("model_checkpoint", "/epoch2.weights.h5"), ("load_weights", "/saved.weights.h5")):
    model, extra = model_and_callbacks()
    model.load_weights(DIRECTORY + path)
    record = Record()
    fit(model, record, extra, initial_epoch=2)
    resumed[name] = record.losses
print(json.dumps(resumed))
"""


def _run(script, setup, directory):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), setup, str(directory)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setup", ["callback", "unit_scale twin"])
def test_a_killed_run_resumes_exactly_from_weights_only_checkpoints(setup, tmp_path):
    whole = _run(FIRST, setup, tmp_path)
    resumed = _run(RESUME, setup, tmp_path)
    assert len(whole) == 24  # 4 epochs of 6 steps
    for name, losses in resumed.items():
        assert len(losses) == 12, name  # epochs 3 and 4
        np.testing.assert_allclose(losses, whole[12:], rtol=1e-6, err_msg=name)


def test_weights_only_files_carry_the_multipliers(tmp_path):
    from keras_unitscale import layers as L

    layer = L.Dense(3, weight_multipliers={"kernel": 2.5}, lr_multipliers={"bias": 0.5})
    model = keras.Sequential([keras.Input((4,)), layer])
    model.save_weights(tmp_path / "w.weights.h5")
    fresh = L.Dense(3)
    keras.Sequential([keras.Input((4,)), fresh]).load_weights(tmp_path / "w.weights.h5")
    assert fresh.weight_multipliers == {"kernel": 2.5} and fresh.lr_multipliers == {"bias": 0.5}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh.kernel), keras.ops.convert_to_numpy(layer.kernel))


def test_an_optimizer_state_from_another_model_is_refused_at_build(tmp_path):
    from keras_unitscale import layers as L
    from keras_unitscale import optimizers

    small = keras.Sequential([keras.Input((4,)), L.Dense(3)])
    small.compile(optimizers.Adam(0.01), "mse")
    small.fit(np.ones((8, 4)), np.ones((8, 3)), verbose=0)
    small.optimizer.save_own_variables(store := {})
    other = optimizers.Adam(0.01)
    other.load_own_variables(store)  # waits: not built yet
    with pytest.raises(ValueError, match="does not match it"):
        other.build(keras.Sequential([keras.Input((4,)), L.Dense(3), L.Dense(2)]).trainable_variables)
