"""Scale-free FP8 matmuls and FP16 without loss scaling."""

import warnings

import keras
import ml_dtypes
import numpy as np
import pytest
from keras import ops

import keras_unitscale
from keras_unitscale import experiments
from keras_unitscale import formats as F
from keras_unitscale import functional as U
from keras_unitscale import layers as L
from keras_unitscale import models
from keras_unitscale import precision
from keras_unitscale.ops import linear as linear_ops
from tests.helpers import BACKEND
from tests.helpers import unit_normal


@pytest.fixture(autouse=True)
def _float32_and_fp8_off():
    keras.config.set_dtype_policy("float32")
    precision.set_fp8(False)
    yield
    keras.config.set_dtype_policy("float32")
    precision.set_fp8(False)


def _e4m3(x):
    return np.asarray(x, "float32").astype(ml_dtypes.float8_e4m3fn).astype("float32")


def _e5m2(x):
    return np.asarray(x, "float32").astype(ml_dtypes.float8_e5m2).astype("float32")


def _value_and_input_grad(fn, x, upstream):
    """fn(x) and d(sum(fn(x) * upstream))/dx, on any backend."""
    if BACKEND == "jax":
        import jax

        value, vjp = jax.vjp(fn, x)
        return np.asarray(value), np.asarray(vjp(upstream)[0])
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        return value.numpy(), tape.gradient(value, x, output_gradients=tf.constant(upstream)).numpy()
    import torch

    x = torch.tensor(x, requires_grad=True)
    value = fn(x)
    value.backward(torch.tensor(upstream))
    return value.detach().numpy(), x.grad.numpy()


def test_fp8_dense_is_float32_on_pre_quantised_values_forward_and_backward():
    x, kernel = unit_normal(16, 32, seed=0) * 3, unit_normal(32, 8, seed=1)
    upstream = unit_normal(16, 8, seed=2) * 1e-3  # E5M2 rounds it coarsely, and flushes nothing
    fp8_value, fp8_grad = _value_and_input_grad(lambda v: U.dense(v, kernel, fp8=True), x, upstream)
    value, _ = _value_and_input_grad(lambda v: U.dense(v, _e4m3(kernel)), _e4m3(x), upstream)
    np.testing.assert_allclose(fp8_value, value, rtol=1e-6, atol=1e-6)
    # The gradient reaching the matmul is E5M2 (the output scale is forward-only),
    # and it multiplies the E4M3 kernel.
    _, grad = _value_and_input_grad(lambda v: U.dense(v, _e4m3(kernel)), _e4m3(x), _e5m2(upstream))
    np.testing.assert_allclose(fp8_grad, grad, rtol=1e-6, atol=1e-9)
    _, float32_grad = _value_and_input_grad(lambda v: U.dense(v, kernel), x, upstream)
    assert not np.allclose(fp8_grad, float32_grad, rtol=1e-3)  # the switch does something


def test_the_output_gradient_cast_gives_e5m2_values():
    upstream = unit_normal(64, seed=3) * np.logspace(-6, 5, 64).astype("float32")
    _, grad = _value_and_input_grad(precision.cast_output_gradient, unit_normal(64, seed=4), upstream)
    np.testing.assert_array_equal(grad, _e5m2(np.clip(upstream, -F.E5M2.max, F.E5M2.max)))


def test_the_global_setting_and_the_layer_switch():
    x = unit_normal(4, 8, seed=0) * 1.7
    plain, critical, forced_off = L.Dense(8), L.Dense(8, fp8_critical=True), L.Dense(8, fp8=False)
    forced_on = L.Dense(8, fp8=True)
    layers = (plain, critical, forced_off, forced_on)
    outside = [ops.convert_to_numpy(layer(x)) for layer in layers]
    with precision.fp8():
        inside = [ops.convert_to_numpy(layer(x)) for layer in layers]
    with precision.fp8(critical=True):
        with_critical = [ops.convert_to_numpy(layer(x)) for layer in layers]
    changed = lambda a, b: [not np.array_equal(u, v) for u, v in zip(a, b)]  # noqa: E731
    assert changed(outside, inside) == [True, False, False, False]
    assert changed(outside, with_critical) == [True, True, False, False]
    # The forced-on layer computes the dense of the E4M3-rounded operands. Not bit for bit: on PyTorch the plain
    # dense below is one `addmm` with its scale inside the matrix product, the FP8 dense a matmul and then the
    # scale, and some CPUs' kernels round those differently in the last bit (5e-7 seen). E4M3's rounding moves
    # the result by about 1e-2, so the bound still tells FP8 from float32 operands (checked below).
    on_rounded_operands = ops.convert_to_numpy(U.dense(_e4m3(x), _e4m3(forced_on.kernel)))
    np.testing.assert_allclose(outside[3], on_rounded_operands, rtol=1e-6, atol=1e-6)
    on_float32_operands = ops.convert_to_numpy(U.dense(x, forced_on.kernel))
    assert not np.allclose(outside[3], on_float32_operands, rtol=1e-6, atol=1e-6)
    assert precision.fp8_setting() == {"enabled": False, "critical": False}


def test_fp8_convolutions_are_float32_on_pre_quantised_values():
    x = unit_normal(2, 6, 6, 4, seed=0) * 1.7
    conv, separable = L.Conv2D(8, 3, fp8=True), L.SeparableConv2D(8, 3, fp8=True)
    outputs = ops.convert_to_numpy(conv(x)), ops.convert_to_numpy(separable(x))
    np.testing.assert_allclose(outputs[0], ops.convert_to_numpy(U.conv(_e4m3(x), _e4m3(conv.kernel), conv.bias)),
                               rtol=1e-6, atol=1e-6)
    # A separable layer's two convolutions are each cast: the depthwise one's output is rounded again. That
    # rounding to E4M3 turns an ulp into a step, so the depthwise output is computed in the FP8 path's order:
    # the product of the cast operands, then the rule's output scale (fan-in 3·3 taps: 1/3).
    depthwise = ops.convert_to_numpy(ops.depthwise_conv(_e4m3(x), _e4m3(separable.depthwise_kernel)) * (1 / 3))
    expected = U.conv(_e4m3(depthwise), _e4m3(separable.pointwise_kernel), separable.bias)
    np.testing.assert_allclose(outputs[1], ops.convert_to_numpy(expected), rtol=1e-6, atol=1e-6)
    # Off by default, on under `precision.fp8()`; `fp8=False` is off there too.
    plain, off = L.Conv1D(8, 3), L.Conv1D(8, 3, fp8=False)
    signal = x[:, 0]
    outside = [ops.convert_to_numpy(layer(signal)) for layer in (plain, off)]
    with precision.fp8():
        inside = [ops.convert_to_numpy(layer(signal)) for layer in (plain, off)]
    assert not np.array_equal(outside[0], inside[0]) and np.array_equal(outside[1], inside[1])
    assert L.Conv2D.from_config(conv.get_config()).fp8 is True


def test_attention_keeps_its_output_projection_critical():
    keras.utils.set_random_seed(0)
    x = unit_normal(2, 8, 16, seed=0) * 1.7
    layer = L.MultiHeadAttention(2, 8)
    layer(x, x)
    calls = []
    original = linear_ops.einsum_dense

    def recording(*args, **kwargs):
        calls.append(kwargs.get("fp8"))
        return original(*args, **kwargs)

    linear_ops.einsum_dense = recording
    try:
        with precision.fp8():
            layer(x, x)
        with precision.fp8(critical=True):
            layer(x, x)
    finally:
        linear_ops.einsum_dense = original
    assert calls == [True, True, True, False, True, True, True, True]


def test_fp8_lstm_runs_its_own_loop_and_stays_close():
    keras.utils.set_random_seed(0)
    x = unit_normal(4, 12, 16, seed=0)
    layer = L.LSTM(32, return_sequences=True)
    reference = ops.convert_to_numpy(layer(x))
    with precision.fp8():
        fp8 = ops.convert_to_numpy(layer(x))
    assert not np.array_equal(fp8, reference)
    assert np.sqrt(np.mean((fp8 - reference) ** 2)) < 0.1 * np.sqrt(np.mean(reference**2))
    # E4M3-representable weights and inputs change nothing but the hidden
    # state's rounding: the first step, from h = 0, is exact.
    for variable in (layer.cell.kernel, layer.cell.recurrent_kernel):
        variable.assign(_e4m3(variable))
    first = ops.convert_to_numpy(layer(_e4m3(x)))[:, 0]
    with precision.fp8():
        first_fp8 = ops.convert_to_numpy(layer(_e4m3(x)))[:, 0]
    np.testing.assert_allclose(first_fp8, first, rtol=1e-6, atol=1e-6)


def test_simulate_fp8_casts_plain_keras_matmuls():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((8,), dtype="int32")
    h = keras.layers.Embedding(20, 16)(tokens)
    h = keras.layers.LSTM(16, return_sequences=True)(h)
    h = h + keras.layers.MultiHeadAttention(2, 8)(h, h, use_causal_mask=True)
    logits = keras.layers.Dense(20, name="readout")(keras.layers.EinsumDense("btd,dv->btv", (None, 20))(h))
    model = keras.Model(tokens, logits)
    twin = precision.simulate_fp8(model)
    assert all(isinstance(new, type(old)) for new, old in zip(twin.layers, model.layers))
    replaced = [type(old).__name__ for new, old in zip(twin.layers, model.layers) if type(new) is not type(old)]
    assert replaced == ["LSTM", "MultiHeadAttention", "EinsumDense", "Dense"]
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).integers(0, 20, (4, 8))
    original, fp8 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(twin(x))
    # Keras's small initial scales (logits of RMS ~0.01) sit low in E4M3's
    # range: the casts cost this model some 15% of its output, not all of it.
    relative_error = np.sqrt(np.mean((fp8 - original) ** 2) / np.mean(original**2))
    assert 0.01 < relative_error < 0.5, relative_error
    # The readout's output is the float32 product of its E4M3-cast input and kernel.
    readout = twin.get_layer("readout")
    features = keras.Model(twin.inputs, readout.input)(x)
    expected = _e4m3(ops.convert_to_numpy(features)) @ _e4m3(readout.kernel) + ops.convert_to_numpy(readout.bias)
    np.testing.assert_allclose(fp8, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dropout=0.5"):
        precision.simulate_fp8(keras.Sequential([keras.Input((3, 4)), keras.layers.LSTM(4, dropout=0.5)]))


@pytest.mark.parametrize("reset_after", [True, False])
def test_simulate_fp8_casts_keras_grus(reset_after):
    """Keras's GRU step on E4M3-cast inputs, states and kernels: its numbers move by the casts' rounding, no more."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 5)), keras.layers.GRU(8, return_sequences=True, reset_after=reset_after),
                              keras.layers.GRU(4, reset_after=reset_after)])
    twin = precision.simulate_fp8(model)
    assert [type(layer).__name__ for layer in twin.layers] == ["_FP8GRU", "_FP8GRU"]
    assert all(isinstance(layer, keras.layers.GRU) for layer in twin.layers)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(3, 6, 5)).astype("float32")
    original, fp8 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(twin(x))
    relative_error = np.sqrt(np.mean((fp8 - original) ** 2) / np.mean(original**2))
    assert 0.001 < relative_error < 0.2, relative_error
    with pytest.raises(ValueError, match="recurrent_dropout=0.5"):
        precision.simulate_fp8(keras.Sequential([keras.Input((3, 4)), keras.layers.GRU(4, recurrent_dropout=0.5)]))
    with pytest.raises(ValueError, match="activation=relu"):
        precision.simulate_fp8(keras.Sequential([keras.Input((3, 4)), keras.layers.GRU(4, activation="relu")]))


class _NoKwargsBlock(keras.layers.Layer):
    """As the Keras examples write a custom layer: sublayers made in the constructor, which takes no `**kwargs`."""

    def __init__(self, width, heads):
        super().__init__()
        self.att = keras.layers.MultiHeadAttention(heads, width // heads)
        self.ffn = keras.Sequential([keras.layers.Dense(2 * width, activation="relu"), keras.layers.Dense(width)])
        self.norm = keras.layers.LayerNormalization()

    def call(self, x):
        x = self.norm(x + self.att(x, x))
        return x + self.ffn(x)


def test_simulate_fp8_casts_the_matmuls_inside_custom_layers():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, keras.layers.Dense(3)(_NoKwargsBlock(8, 2)(inputs)))
    twin = precision.simulate_fp8(model)
    block = twin.layers[1]
    assert type(block) is _NoKwargsBlock and block is not model.layers[1]
    cast = [layer for layer in block._flatten_layers(include_self=False) if type(layer).__module__ == precision.__name__]
    # attention and its four projections, the feed-forward's two Dense
    assert sorted(type(layer).__name__ for layer in cast) == ["_FP8Dense"] * 2 + ["_FP8EinsumDense"] * 4 + [
        "_FP8MultiHeadAttention"]
    assert type(block.norm) is keras.layers.LayerNormalization
    assert {id(v) for v in twin.weights}.isdisjoint(id(v) for v in model.weights)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")
    original, fp8 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(twin(x))
    relative_error = np.sqrt(np.mean((fp8 - original) ** 2) / np.mean(original**2))
    assert 1e-3 < relative_error < 0.2, relative_error  # cast, not lost


def test_simulate_fp8_casts_keras_convolutions():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    twin = precision.simulate_fp8(model)
    assert type(twin.layers[0]).__name__ == "_FP8Conv2D" and isinstance(twin.layers[0], keras.layers.Conv2D)
    x = unit_normal(2, 6, 6, 3, seed=0)
    conv = model.layers[0]
    expected = ops.relu(ops.conv(_e4m3(x), _e4m3(conv.kernel)) + conv.bias)
    features = keras.Model(twin.inputs, twin.layers[0].output)(x)
    np.testing.assert_allclose(ops.convert_to_numpy(features), ops.convert_to_numpy(expected), rtol=1e-5, atol=1e-6)


def test_simulate_fp8_names_a_custom_layer_it_cannot_copy():
    class Unconfigurable(keras.layers.Layer):
        def __init__(self, dense, **kwargs):  # a layer argument Keras's automatic config cannot hold
            super().__init__(**kwargs)
            self.dense = dense

        def call(self, x):
            return self.dense(x)

    model = keras.Sequential([keras.Input((4,)), Unconfigurable(keras.layers.Dense(2))])
    with pytest.raises(ValueError, match="'unconfigurable' \\(Unconfigurable\\) has none that rebuilds it"):
        precision.simulate_fp8(model)


def test_config_round_trip_and_saving(tmp_path):
    keras.utils.set_random_seed(0)
    block = L.TransformerBlock(num_heads=2, fp8=True)
    model = keras.Sequential([keras.Input((8, 16)), block, L.Dense(4, fp8=False, fp8_critical=True),
                              L.LSTM(8, fp8=True)])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.layers[0].fp8 is True and loaded.layers[0].mlp_down.fp8_critical is True
    assert loaded.layers[1].fp8 is False and loaded.layers[1].fp8_critical is True
    assert loaded.layers[2].cell.fp8 is True
    x = unit_normal(2, 8, 16)
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)), atol=1e-6)
    with pytest.raises(ValueError, match="fp8='yes'"):
        L.Dense(4, fp8="yes")


def _char_lm_losses(fp8, steps=30):
    train, _, vocabulary = experiments.char_lm_data(32, steps * 16, 1)
    keras.utils.set_random_seed(0)
    model = models.transformer_lm(len(vocabulary), 64, 2, head_dim=16, seq_len=32)
    with precision.fp8(enabled=fp8, critical=True):
        model.compile(keras_unitscale.optimizers.Adam(2.0**-3),
                      keras_unitscale.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(*train, batch_size=16, epochs=1, verbose=0, shuffle=False)
    return history.history["loss"][-1]


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="two training runs: once, on the default backend (CI time)")
def test_a_short_fp8_run_lands_near_float32():
    float32, fp8 = _char_lm_losses(False), _char_lm_losses(True)
    assert abs(fp8 - float32) <= 0.05 * float32, (float32, fp8)


def test_fp16_without_loss_scaling_trains_and_wrapping_ours_warns():
    keras.config.set_dtype_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    x = unit_normal(64, 8, seed=0)
    y = x[:, :1] * x[:, 1:2]
    model = keras.Sequential([keras.Input((8,)), L.Dense(32, activation="relu"), L.Dense(1, role="output")])
    with pytest.warns(UserWarning, match="auto_scale_loss=False"):
        model.compile(keras_unitscale.optimizers.Adam(0.05), "mse")
        model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.compile(keras_unitscale.optimizers.Adam(0.05), "mse", auto_scale_loss=False)
        losses = model.fit(x, y, batch_size=16, epochs=5, verbose=0).history["loss"]
    assert type(model.optimizer) is keras_unitscale.optimizers.Adam
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert keras.backend.standardize_dtype(model.layers[0].compute_dtype) == "float16"
    # A plain Keras model is left alone: its gradients may well need scaling.
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        plain.compile(keras_unitscale.optimizers.Adam(0.05), "mse")
        plain.optimizer.build(plain.trainable_variables)


@pytest.mark.skipif(BACKEND != "jax", reason="the compiled HLO is read through JAX")
def test_fp8_casts_sit_on_both_passes_of_the_dot():
    import jax

    x, kernel = unit_normal(32, 64, seed=0), unit_normal(64, 16, seed=1)

    def loss(x, kernel):
        return (U.dense(x, kernel, fp8=True) ** 2).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()
    assert text.count("f8E4M3FN") >= 2 and "f8E5M2" in text, text[:2000]
    devices = [d for d in jax.devices() if d.platform == "gpu"]
    if not devices or "H100" not in devices[0].device_kind and "H200" not in devices[0].device_kind:
        return
    # On an FP8 GPU, XLA turns the cast-then-dot into cuBLASLt FP8 GEMMs: the
    # forward one and the two of the backward pass.
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
    assert compiled.count("__cublas$lt$matmul$f8") >= 3, compiled
