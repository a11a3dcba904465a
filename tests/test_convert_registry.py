"""The converters' registry: users add a converter for their own layer, and `unit_scale` uses it."""

import warnings

import keras
import numpy as np
import pytest

from keras_unitscale import layers as L
from keras_unitscale.convert import TensorRatio
from keras_unitscale.convert import converter_for
from keras_unitscale.convert import register_converter
from keras_unitscale.convert import unit_scale


class Doubler(keras.layers.Layer):
    """A weightless layer: 2·x commutes with any positive factor."""

    def call(self, x):
        return 2.0 * x


class Halver(keras.layers.Layer):
    def call(self, x):
        return 0.5 * x


def _model(middle):
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    h = middle(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="readout")(h))


def test_a_registered_converter_is_used_and_keeps_the_function():
    keras.utils.set_random_seed(0)
    calls = []

    def convert_doubler(conversion, layer, call):
        calls.append(layer.name)
        return conversion.transparent(layer, call)

    register_converter(Doubler, convert_doubler)
    model = _model(Doubler(name="doubler"))
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a registered layer is not "kept unchanged"
        twin = unit_scale(model)
    assert calls == ["doubler"]
    assert isinstance(twin.get_layer("hidden"), L.Dense)
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_a_converter_returns_ratios_the_walk_absorbs():
    keras.utils.set_random_seed(1)

    def convert_halver(conversion, layer, call):
        # Drop the layer: the twin's tensor is then 2 × the original's, which the readout absorbs.
        value = call.args[0]
        ratio = call.inputs[0]
        return value, [TensorRatio(2.0 * ratio.value, None, ratio.grad_ratio)]

    register_converter(Halver, convert_halver)
    model = _model(Halver(name="halver"))
    x = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")
    twin = unit_scale(model)
    assert "halver" not in [layer.name for layer in twin.layers]
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_later_registrations_win_and_subclasses_need_asking():
    class Base(keras.layers.Layer):
        pass

    class Child(Base):
        pass

    def first(conversion, layer, call):
        return None

    def second(conversion, layer, call):
        return None

    register_converter(Base, first)
    assert converter_for(Base()) is first and converter_for(Child()) is None
    register_converter(Base, second, subclasses=True)
    assert converter_for(Child()) is second
    register_converter(Base, first, accepts=lambda layer: False)
    assert converter_for(Base()) is None  # refused: kept as it is


def test_registration_errors_name_the_value():
    with pytest.raises(ValueError, match="layer_class='Dense'"):
        register_converter("Dense", lambda *args: None)
    with pytest.raises(ValueError, match="converter=3"):
        register_converter(Doubler, 3)
    with pytest.raises(ValueError, match="accepts=True"):
        register_converter(Doubler, lambda *args: None, accepts=True)


def test_the_default_registry_knows_keras_layers():
    assert converter_for(keras.layers.Dense(3)) is not None
    assert converter_for(keras.layers.Conv2D(3, 3)) is not None
    assert converter_for(keras.layers.GRU(3)) is not None
    assert converter_for(keras.layers.SimpleRNN(3)) is None  # no unit-scaled counterpart
    assert converter_for(L.Dense(3)) is not None  # ours: kept as they are
