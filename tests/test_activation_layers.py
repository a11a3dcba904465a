"""Keras's activation layers, unit-scaled: ReLU, LeakyReLU, ELU, PReLU, Softmax; and their conversion."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import autodiff
from keras_unitscale import layers as L
from keras_unitscale import unit_scale
from keras_unitscale.scale import scaling_disabled
from tests.helpers import unit_normal

CASES = {
    "relu": (lambda: L.ReLU(), lambda: keras.layers.ReLU()),
    "relu6-leaky": (lambda: L.ReLU(max_value=6.0, negative_slope=0.1),
                    lambda: keras.layers.ReLU(max_value=6.0, negative_slope=0.1)),
    "leaky": (lambda: L.LeakyReLU(0.2), lambda: keras.layers.LeakyReLU(0.2)),
    "elu": (lambda: L.ELU(0.5), lambda: keras.layers.ELU(0.5)),
    "prelu": (lambda: L.PReLU(alpha_initializer=keras.initializers.Constant(0.25)),
              lambda: keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25))),
    "softmax": (lambda: L.Softmax(), lambda: keras.layers.Softmax()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_is_its_keras_layer_times_its_rule_at_unit_scale(name):
    ours, theirs = CASES[name][0](), CASES[name][1]()
    assert isinstance(ours, type(theirs))
    x = unit_normal(4096, 32)
    y = ops.convert_to_numpy(ours(x))
    scales = ours.scales(x.shape)
    np.testing.assert_allclose(y, scales.output * ops.convert_to_numpy(theirs(x)), rtol=1e-5, atol=1e-6)
    with scaling_disabled():
        np.testing.assert_allclose(ops.convert_to_numpy(ours(x)), ops.convert_to_numpy(theirs(x)), rtol=1e-6)
    # Unit scale out (the softmax rule aims at unit scale for logits of scale 1, within its model).
    rms = float(np.sqrt(np.mean(y.astype("float64") ** 2)))
    assert (0.3 if name == "softmax" else 0.9) < rms < 1.1, rms
    # The input gradient: the rule's gradient scale times Keras's (tied to the output's by default).
    upstream = unit_normal(4096, 32, seed=1)
    _, (grad,) = autodiff.vjp(ours, [x], upstream)
    _, (keras_grad,) = autodiff.vjp(theirs, [x], upstream)
    np.testing.assert_allclose(ops.convert_to_numpy(grad), scales.grad * ops.convert_to_numpy(keras_grad),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_round_trip(name):
    layer = CASES[name][0]()
    keras_config = CASES[name][1]().get_config()
    assert {key: layer.get_config()[key] for key in keras_config if key != "name"} == {
        key: value for key, value in keras_config.items() if key != "name"}  # Keras's arguments, all of them
    layer.constraint = None
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config() and clone.constraint is None
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is type(layer)


def test_softmax_masks_and_axes_as_keras_does():
    x = unit_normal(2, 3, 5)
    mask = np.array([[[1, 1, 0, 1, 0]]] * 2, bool).repeat(3, axis=1)
    ours, theirs = L.Softmax(), keras.layers.Softmax()
    scale = ours.scales(x.shape).output
    np.testing.assert_allclose(ops.convert_to_numpy(ours(x, mask=mask)),
                               scale * ops.convert_to_numpy(theirs(x, mask=mask)), rtol=1e-5, atol=1e-7)
    both = L.Softmax(axis=(1, 2))
    assert both.scales(x.shape) == L.Softmax().scales((2, 15))  # the rule of the 15 entries normalised together
    with pytest.raises(ValueError, match="must be known"):
        L.Softmax().scales((2, None))


def test_the_rule_is_the_derived_one_where_there_is_one():
    assert L.ReLU().scales().output == pytest.approx(2**0.5)
    assert L.PReLU().scales().output == pytest.approx(2**0.5)  # Keras's default slope 0: a ReLU as it starts
    assert L.ReLU(threshold=0.5).homogeneous() is False and L.LeakyReLU().homogeneous() is True
    with pytest.raises(ValueError, match="constraint"):
        L.ELU(constraint="sideways")


def _script_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 3))
    h = keras.layers.Conv1D(8, 3, padding="same")(inputs)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv1D(8, 3)(h)
    h = keras.layers.LeakyReLU(0.2)(h)
    h = keras.layers.Dense(8)(h)
    h = keras.layers.ELU()(h)
    h = keras.layers.Dense(8)(h)
    h = keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.1))(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(4)(h)))


def test_unit_scale_converts_them_and_keeps_the_softmax_head():
    model = _script_model()
    x = unit_normal(8, 16, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing kept, nothing inexact
        twin = unit_scale(model)
    kinds = {type(layer).__name__: type(layer).__module__.split(".")[0] for layer in twin.layers}
    assert all(kinds[name] == "keras_unitscale" for name in ("ReLU", "LeakyReLU", "ELU", "PReLU"))
    assert kinds["Softmax"] == "keras"  # the prediction stays a probability
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    fresh = unit_scale(model, mode="reinit")
    assert type(fresh.layers[8]) is L.PReLU


class _Scores(keras.layers.Layer):
    """(batch, T, 1) → (batch, T), passing the (batch, T) mask on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x):
        return ops.squeeze(x, -1)


def test_softmax_takes_the_mask_keras_carries():
    tokens = np.array([[1, 2, 0, 0], [3, 0, 0, 0]])
    inputs = keras.Input((4,), dtype="int32")
    scores = _Scores()(keras.layers.Embedding(5, 1, mask_zero=True)(inputs))
    ours = keras.Model(inputs, L.Softmax()(scores))
    theirs = keras.Model(inputs, keras.layers.Softmax()(scores))
    y, reference = ours.predict(tokens, verbose=0), theirs.predict(tokens, verbose=0)
    np.testing.assert_allclose(y, L.Softmax().scales((2, 4)).output * reference, rtol=1e-5, atol=1e-7)
    assert (y[tokens == 0] == 0).all()
