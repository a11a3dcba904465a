"""One record per weight: its role, weight multiplier and fixed learning-rate multiplier, read and written in one place."""

import ast
import gc
import pathlib
import weakref

import keras
import numpy as np
import pytest

from keras_unitscale import layers as L
from keras_unitscale import optimizers as O
from keras_unitscale import parametrization as P
from keras_unitscale import weights
from keras_unitscale.rules.mup import WeightRole


def _dense(**kwargs):
    layer = L.Dense(4, name="dense", **kwargs)
    layer.build((None, 8))
    return layer


def test_a_layer_declares_its_weights_records():
    layer = _dense()
    record = weights.record(layer.kernel)
    assert record == weights.WeightRecord(role=WeightRole("hidden", fan_in=8, fan_out=4))
    assert weights.role(layer.bias) == WeightRole("bias", fan_out=4)
    assert weights.is_declared(layer.kernel) and P.is_unit_scaled(layer.kernel)
    plain = keras.layers.Dense(4)
    plain.build((None, 8))
    assert weights.record(plain.kernel) is None and not weights.is_declared(plain.kernel)
    assert weights.multiplier(plain.kernel) == 1.0 and weights.lr_multiplier(plain.kernel) is None


def test_the_layer_api_and_the_record_are_one_store():
    layer = _dense()
    layer.set_weight_multiplier("kernel", 2.0)
    layer.set_lr_multiplier("bias", 0.5)
    assert weights.multiplier(layer.kernel) == 2.0 and weights.lr_multiplier(layer.bias) == 0.5
    weights.set_multiplier(layer.kernel, 3.0)
    weights.set_lr_multiplier(layer.kernel, 0.25)
    assert layer.weight_multiplier("kernel") == 3.0 and P.weight_multiplier_of(layer.kernel) == 3.0
    assert layer.lr_multipliers == {"kernel": 0.25, "bias": 0.5}
    assert P.fixed_lr_multiplier_of(layer.kernel) == 0.25
    layer.set_lr_multiplier("bias", None)
    layer.set_weight_multiplier("kernel", 1.0)
    assert weights.lr_multiplier(layer.bias) is None and layer.weight_multipliers == {}


def test_values_given_before_build_wait_for_their_weights():
    layer = L.Dense(4, weight_multipliers={"kernel": 2.0}, lr_multipliers={"bias": 0.5})
    assert layer.weight_multipliers == {"kernel": 2.0} and layer.lr_multiplier("bias") == 0.5
    layer.set_weight_multiplier("bias", 4.0)
    layer.build((None, 8))
    assert weights.multiplier(layer.kernel) == 2.0 and weights.multiplier(layer.bias) == 4.0
    assert weights.lr_multiplier(layer.bias) == 0.5
    # Once built, the layer keeps no values of its own: they are in the records.
    assert layer._waiting_multipliers == {} and layer._waiting_lr_multipliers == {}


def test_declaring_a_role_keeps_the_multipliers_and_a_model_role_keeps_the_declared_one():
    layer = _dense(weight_multipliers={"kernel": 2.0}, lr_multipliers={"kernel": 0.5})
    P.set_depth([layer.kernel], 4)
    assert weights.role(layer.kernel).depth == 4
    assert weights.multiplier(layer.kernel) == 2.0 and weights.lr_multiplier(layer.kernel) == 0.5
    model = keras.Sequential([keras.Input((8,)), layer])
    P.tag_model(model, overrides={"kernel": "output"})
    assert weights.model_role(layer.kernel).role == "output" and weights.role(layer.kernel).role == "hidden"
    assert P.role_of(layer.kernel).role == "output" and weights.multiplier(layer.kernel) == 2.0


def test_the_optimizer_starts_from_the_record():
    layer = _dense()
    weights.set_multiplier(layer.kernel, 4.0)
    weights.set_lr_multiplier(layer.bias, 0.3)
    optimizer = O.Adam(0.01)
    optimizer.build(layer.trainable_variables)
    # u-μP's learning-rate multiplier over the weight multiplier; the fixed one as it is.
    assert optimizer.lr_multiplier(layer.kernel) == pytest.approx(8**-0.5 / 4)
    assert optimizer.lr_multiplier(layer.bias) == pytest.approx(0.3)


def _model():
    inputs = keras.Input((5, 8))
    h = L.Dense(8, weight_multipliers={"kernel": 0.5}, lr_multipliers={"bias": 2.0}, name="dense")(inputs)
    h = L.LSTM(8, weight_multipliers={"recurrent_kernel": 3.0}, name="lstm")(h)
    return keras.Model(inputs, L.Dense(1, role="output", name="readout")(h))


def _records(model):
    return {v.path: weights.record(v) for v in model.trainable_variables}


def test_the_records_survive_get_config_and_from_config():
    model = _model()
    model.get_layer("dense").set_weight_multiplier("bias", 1.5)
    config = model.get_layer("dense").get_config()
    assert config["weight_multipliers"] == {"kernel": 0.5, "bias": 1.5}
    assert config["lr_multipliers"] == {"bias": 2.0}
    clone = keras.Model.from_config(model.get_config())
    assert _records(clone) == _records(model)
    assert weights.multiplier(clone.get_layer("lstm").cell.recurrent_kernel) == 3.0


def test_the_records_survive_saving_and_loading(tmp_path):
    model = _model()
    model.get_layer("readout").set_weight_multiplier("kernel", 0.25)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert _records(loaded) == _records(model)
    assert weights.multiplier(loaded.get_layer("readout").kernel) == 0.25
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-5, atol=1e-6)


def test_the_record_does_not_point_back_to_the_layer():
    layer = _dense(weight_multipliers={"kernel": 2.0})
    kernel = layer.kernel
    assert not any(isinstance(value, weakref.ref) for value in vars(kernel).values())
    alive = weakref.ref(layer)
    del layer
    gc.collect()
    # The record holds the values itself; whether or not the layer is still alive, they are read the same.
    assert weights.multiplier(kernel) == 2.0 and P.weight_multiplier_of(kernel) == 2.0
    assert alive() is None or weights.record(kernel) is not None


@pytest.mark.parametrize("module", ["weights", "parametrization"])
def test_the_low_modules_import_nothing_from_above(module):
    source = pathlib.Path(__file__).parents[1] / "keras_unitscale" / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    above = ("layers", "optimizers", "callbacks", "convert", "analysis")
    assert not [name for name in imported if any(f"keras_unitscale.{part}" in name for part in above)]


def test_values_are_checked_and_the_received_value_named():
    kernel = _dense().kernel
    with pytest.raises(ValueError, match="Received: multiplier=0"):
        weights.set_multiplier(kernel, 0)
    with pytest.raises(ValueError, match="Received: lr_multiplier=inf"):
        weights.set_lr_multiplier(kernel, float("inf"))
    with pytest.raises(ValueError, match="Received: multiplier=True"):
        weights.set_multiplier(kernel, True)
    with pytest.raises(ValueError, match="Received: weight_role='hidden'"):
        weights.declare(kernel, "hidden")
    with pytest.raises(ValueError, match=r"Received: weight_multipliers=\['kernel'\]"):
        weights.check_multipliers("weight_multipliers", ["kernel"])
    with pytest.raises(ValueError, match=r"weight_multipliers\['kernel'\]=nan"):
        L.Dense(3, weight_multipliers={"kernel": float("nan")})
    with pytest.raises(ValueError, match=r"lr_multipliers\['bias'\]=-2"):
        _dense().set_lr_multiplier("bias", -2)
    with pytest.raises(ValueError, match="no weight called 'kernal'"):
        _dense().set_weight_multiplier("kernal", 2.0)
    # A failed check leaves the record as it was.
    assert weights.multiplier(kernel) == 1.0 and weights.lr_multiplier(kernel) is None
