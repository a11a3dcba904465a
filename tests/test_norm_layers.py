"""BatchNormalization and GroupNormalization: Keras's output, the norm rule on the gain's and bias's gradients."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import autodiff
from keras_unitscale import layers as L
from keras_unitscale import rules
from keras_unitscale import unit_scale
from tests.helpers import unit_normal

CASES = {
    "batch": (lambda: L.BatchNormalization(momentum=0.5), lambda: keras.layers.BatchNormalization(momentum=0.5)),
    "group": (lambda: L.GroupNormalization(groups=4), lambda: keras.layers.GroupNormalization(groups=4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_is_keras_and_the_gain_gradient_follows_the_norm_rule(name):
    ours, theirs = CASES[name][0](), CASES[name][1]()
    x = 3.0 * unit_normal(64, 5, 8) + 1.0
    ours.build(x.shape)
    theirs.build(x.shape)
    kwargs = {"training": True} if name == "batch" else {}
    np.testing.assert_allclose(ops.convert_to_numpy(ours(x, **kwargs)), ops.convert_to_numpy(theirs(x, **kwargs)),
                               rtol=1e-5, atol=1e-5)
    if name == "batch":  # the moving statistics move as Keras's
        np.testing.assert_allclose(ops.convert_to_numpy(ours.moving_variance),
                                   ops.convert_to_numpy(theirs.moving_variance), rtol=1e-5)
        np.testing.assert_allclose(ops.convert_to_numpy(ours(x)), ops.convert_to_numpy(theirs(x)), rtol=1e-5,
                                   atol=1e-5)
    upstream = unit_normal(64, 5, 8, seed=1)
    training = name == "batch"
    _, ours_input_grad, ours_grads = autodiff.layer_vjp(ours, x, upstream, training=training)
    _, keras_input_grad, keras_grads = autodiff.layer_vjp(theirs, x, upstream, training=training)
    np.testing.assert_allclose(ours_input_grad, keras_input_grad, rtol=1e-4, atol=1e-5)
    scale = rules.norms.affine_grad(8, x.size)
    for ours_weight, keras_weight in zip((ours.gamma, ours.beta), (theirs.gamma, theirs.beta)):
        np.testing.assert_allclose(ours_grads[ours_weight.path], scale * keras_grads[keras_weight.path],
                                   rtol=1e-4, atol=1e-6)
    # Unit scale: the gain's gradient sums 320 unit-scale products, brought back to about 1.
    assert 0.5 < float(np.sqrt(np.mean(ours_grads[ours.gamma.path] ** 2))) < 2.0
    assert ours.gamma.path.endswith("gamma") and ours.get_config()["weight_multipliers"] == {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_and_saving(name, tmp_path):
    layer = CASES[name][0]()
    keras_config = CASES[name][1]().get_config()
    config = layer.get_config()
    assert {key: config[key] for key in keras_config if key != "name"} == {
        key: value for key, value in keras_config.items() if key != "name"}
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, layer(inputs))
    layer.set_weight_multiplier("gamma", 2.0)
    model.save(tmp_path / "norm.keras")
    loaded = keras.saving.load_model(tmp_path / "norm.keras")
    x = unit_normal(4, 5, 8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert loaded.layers[1].weight_multipliers == {"gamma": 2.0}


def _timeseries_classifier():
    """The Keras example's timeseries classifier: Conv1D, BatchNormalization, ReLU, three times."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 1))
    h = inputs
    for _ in range(3):
        h = keras.layers.Conv1D(16, 3, padding="same")(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(h))


def test_unit_scale_converts_them_and_the_statistics_carry_over():
    model = _timeseries_classifier()
    x = unit_normal(16, 32, 1)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, np.arange(16) % 2, epochs=1, verbose=0)  # moving statistics away from their start
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        twin = unit_scale(model)
    assert {type(layer).__module__.split(".")[0] for layer in twin.layers[1:]} == {"keras_unitscale", "keras"}
    assert all(type(layer) is L.BatchNormalization for layer in twin.layers if "batch" in layer.name)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(twin(x, training=True)),
                               ops.convert_to_numpy(model(x, training=True)), atol=1e-5)
    grouped = keras.Sequential([keras.Input((6, 8)), keras.layers.Dense(8), keras.layers.GroupNormalization(2)])
    assert type(unit_scale(grouped).layers[-1]) is L.GroupNormalization
