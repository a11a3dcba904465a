"""Resume: training saved to `.keras` mid-run and loaded goes on exactly as an uninterrupted run."""

import keras
import numpy as np
import pytest

from keras_unitscale import callbacks
from keras_unitscale import layers as L
from keras_unitscale import losses
from keras_unitscale import optimizers


class LossRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def _model(lib):
    keras.utils.set_random_seed(0)
    readout = L.Dense(1, activation="sigmoid", role="output") if lib is L else keras.layers.Dense(1, activation="sigmoid")
    return keras.Sequential([keras.Input((12,)), lib.Dense(32, activation="relu"), lib.Dense(16, activation="relu"),
                             readout])


def _data():
    x = np.random.default_rng(1).normal(size=(96, 12)).astype("float32")
    return x, (x[:, :1] * x[:, 1:2] > 0).astype("float32")


def _fit(model, epochs, recorder, initial_epoch=0):
    unit = callbacks.UnitScaleCallback(verbose=0)
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=initial_epoch + epochs, initial_epoch=initial_epoch, shuffle=False,
              verbose=0, callbacks=[unit, recorder])
    return unit


@pytest.mark.parametrize("lib", [L, keras.layers], ids=["our layers", "keras layers"])
def test_a_run_saved_and_resumed_follows_the_uninterrupted_one(lib, tmp_path):
    whole = LossRecorder()
    model = _model(lib)
    model.compile(optimizers.Adam(0.01), losses.BinaryCrossentropy())
    _fit(model, 4, whole)

    halves = LossRecorder()
    first = _model(lib)
    first.compile(optimizers.Adam(0.01), losses.BinaryCrossentropy())
    acted = _fit(first, 2, halves)
    assert acted.record is not None  # it moved the weights once, at the start
    factors = [first.optimizer.lr_multiplier(v) for v in first.trainable_variables]
    first.save(tmp_path / "halfway.keras")

    resumed = keras.saving.load_model(tmp_path / "halfway.keras")
    assert [resumed.optimizer.lr_multiplier(v) for v in resumed.trainable_variables] == pytest.approx(factors, rel=0)
    again = _fit(resumed, 2, halves, initial_epoch=2)
    assert again.record is None  # and not again after resuming

    assert len(halves.losses) == len(whole.losses) == 24
    np.testing.assert_allclose(halves.losses, whole.losses, rtol=1e-6)
