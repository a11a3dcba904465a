"""The unit-scaled convolutions: unit scale at initialisation, Keras's layer underneath, the rule's arithmetic.

Keras's own test files for these layers run in `tests/test_keras_layers.py`.
"""

import math

import keras
import numpy as np
import pytest

from keras_unitscale import layers
from keras_unitscale import rules
from keras_unitscale.autodiff import layer_vjp
from keras_unitscale.ops import convolution as conv_ops
from keras_unitscale.scale import scaling_disabled
from tests.helpers import rms
from tests.helpers import unit_normal

# (class name, constructor arguments, input shape): 1-3 spatial axes, strides, groups, dilation.
CASES = [
    ("Conv1D", dict(filters=48, kernel_size=5), (8, 64, 32)),
    ("Conv1D", dict(filters=32, kernel_size=3, padding="causal", dilation_rate=2), (8, 64, 16)),
    ("Conv2D", dict(filters=32, kernel_size=3, padding="same"), (8, 24, 24, 16)),
    ("Conv2D", dict(filters=32, kernel_size=3, strides=2, padding="same", groups=4), (8, 24, 24, 16)),
    ("Conv3D", dict(filters=16, kernel_size=3, padding="same"), (4, 10, 10, 10, 8)),
    ("Conv1DTranspose", dict(filters=32, kernel_size=4, strides=2, padding="same"), (8, 32, 32)),
    ("Conv2DTranspose", dict(filters=16, kernel_size=3, padding="same"), (8, 16, 16, 32)),
    ("Conv2DTranspose", dict(filters=16, kernel_size=4, strides=2, padding="same"), (8, 16, 16, 32)),
    ("Conv3DTranspose", dict(filters=8, kernel_size=3, padding="same"), (4, 8, 8, 8, 16)),
    ("DepthwiseConv1D", dict(kernel_size=5, depth_multiplier=2, padding="same"), (8, 64, 16)),
    ("DepthwiseConv2D", dict(kernel_size=3, padding="same"), (8, 24, 24, 16)),
    ("SeparableConv1D", dict(filters=32, kernel_size=5, padding="same"), (8, 64, 16)),
    ("SeparableConv2D", dict(filters=32, kernel_size=3, depth_multiplier=2, padding="same"), (8, 24, 24, 16)),
]


def _ids(case):
    name, arguments, _ = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in arguments.items() if k != "filters")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_unit_scale_at_initialisation(case):
    """Output, input gradient and every weight gradient within ±25% of unit RMS, for unit-normal input and gradient.

    Untied (`constraint=None`): the default ties the input gradient's scale to
    the output's, as `Dense` does, which leaves it at `sqrt(fan_out/fan_in)`.
    """
    name, arguments, shape = case
    keras.utils.set_random_seed(0)  # the initial weights: the same draw whichever tests ran before in this process
    layer = getattr(layers, name)(**arguments, constraint=None)
    x = unit_normal(*shape)
    y = layer(x)
    out, grad_x, weight_grads = layer_vjp(layer, x, unit_normal(*y.shape, seed=1))
    assert 0.75 < rms(out) < 1.25, f"output RMS {rms(out):.3f}"
    assert 0.75 < rms(grad_x) < 1.25, f"input gradient RMS {rms(grad_x):.3f}"
    for path, grad in weight_grads.items():
        if not path.endswith("bias"):  # a bias's gradient sums a zero-mean cotangent: its RMS is noise around 1
            assert 0.75 < rms(grad) < 1.25, f"{path} gradient RMS {rms(grad):.3f}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_is_keras_layer_with_scaling_removed(case):
    """Each class is its Keras layer: same weights, and without the scale ops Keras's numbers, activation included."""
    name, arguments, shape = case
    ours = getattr(layers, name)(**arguments, activation="tanh")
    theirs = getattr(keras.layers, name)(**arguments, activation="tanh")
    assert isinstance(ours, getattr(keras.layers, name))
    x = unit_normal(*shape)
    ours.build(shape)
    theirs.build(shape)
    assert [v.path.split("/")[-1] for v in ours.weights] == [v.path.split("/")[-1] for v in theirs.weights]
    theirs.set_weights([np.asarray(w) for w in ours.get_weights()])
    with scaling_disabled():
        ours_out = keras.ops.convert_to_numpy(ours(x))
    np.testing.assert_allclose(ours_out, keras.ops.convert_to_numpy(theirs(x)), rtol=1e-4, atol=1e-4)


def test_forward_scale_is_the_rule():
    """Conv2D's output is Keras's times `rules.conv.conv`'s output scale, `1/sqrt(k·k·in/groups)`."""
    layer = layers.Conv2D(8, 3, groups=2, use_bias=False)
    x = unit_normal(2, 9, 9, 12)
    y = keras.ops.convert_to_numpy(layer(x))
    with scaling_disabled():
        plain = keras.ops.convert_to_numpy(layer(x))
    expected = rules.conv.conv(9, 6, 4).output
    assert expected == pytest.approx(1 / math.sqrt(9 * 6))
    np.testing.assert_allclose(y, plain * expected, rtol=1e-5, atol=1e-6)


def test_rule_counts_strided_taps():
    """Strides thin a convolution's input-gradient taps and a transpose's output taps."""
    plain, strided = rules.conv.conv(9, 16, 32, constraint=None), rules.conv.conv(9, 16, 32, 4, constraint=None)
    assert strided.output == plain.output and strided.grad_input == pytest.approx(2 * plain.grad_input)
    plain_t, strided_t = (rules.conv.conv(9, 16, 32, s, transpose=True, constraint=None) for s in (1, 4))
    assert strided_t.grad_input == plain_t.grad_input and strided_t.output == pytest.approx(2 * plain_t.output)
    with pytest.raises(ValueError, match="kernel_volume"):
        rules.conv.conv(0, 16, 32)


def test_op_errors_name_what_was_received():
    x = unit_normal(2, 8, 8, 6)
    with pytest.raises(ValueError, match="not a multiple"):
        conv_ops.conv(x, unit_normal(3, 3, 4, 8))
    with pytest.raises(ValueError, match="data_format"):
        conv_ops.conv(x, unit_normal(3, 3, 6, 8), data_format="NHWC")
    with pytest.raises(ValueError, match="strides"):
        conv_ops.conv(x, unit_normal(3, 3, 6, 8), strides=(1, 1, 1))


def test_int_inputs_give_float_outputs():
    layer = layers.Conv1D(4, 3)
    y = layer(np.ones((2, 8, 3), "int32"))
    assert keras.backend.standardize_dtype(y.dtype) == "float32"


def test_config_round_trip_and_saving(tmp_path):
    model = keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(8, 3, activation="relu", role="input", weight_multipliers={"kernel": 0.5}),
        layers.SeparableConv2D(8, 3, padding="same"),
        layers.Conv2DTranspose(4, 2, strides=2),
        layers.DepthwiseConv2D(3),
    ])
    x = unit_normal(2, 16, 16, 3)
    path = str(tmp_path / "conv.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert [type(layer) for layer in reloaded.layers] == [type(layer) for layer in model.layers]
    assert reloaded.layers[0].role == "input" and reloaded.layers[0].weight_multiplier("kernel") == 0.5
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-5, atol=1e-5)
    clone = layers.Conv2D.from_config(keras.layers.Conv2D(8, 3, activation="relu").get_config())
    assert isinstance(clone, layers.Conv2D) and clone.role == "hidden"


def test_lora_on_conv_uses_the_unit_scaling_alpha():
    layer = layers.Conv2D(8, 3)
    layer.build((None, 10, 10, 4))
    layer.enable_lora(4)
    assert layer.lora_alpha == pytest.approx(rules.linear.lora_alpha(4))
    x = unit_normal(2, 10, 10, 4)
    before = keras.ops.convert_to_numpy(layer(x))
    layer.lora_kernel_b.assign(unit_normal(*layer.lora_kernel_b.shape))
    assert not np.allclose(keras.ops.convert_to_numpy(layer(x)), before)  # the adapters are in the call


def test_trains_a_small_convnet():
    """A MNIST-style convnet of our layers learns sklearn's digits, with u-μP's Adam (the convolutions' roles read)."""
    from sklearn.datasets import load_digits

    from keras_unitscale import losses
    from keras_unitscale import optimizers

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype("float32")
    y = digits.target
    model = keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(16, 3, activation="relu", padding="same", role="input"),
        keras.layers.MaxPooling2D(), layers.Conv2D(32, 3, activation="relu", padding="same"),
        keras.layers.GlobalAveragePooling2D(), layers.Dense(10, role="output"),
    ])
    model.compile(optimizer=optimizers.Adam(2.0**-4), loss=losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x[:1400], y[:1400], epochs=15, batch_size=64, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert model.evaluate(x[1400:], y[1400:], verbose=0)[1] > 0.7


def test_unit_scale_converts_every_convolution_and_keeps_the_function():
    """`unit_scale` turns each of Keras's convolutions into ours; the equivalent twin predicts what the original does."""
    from keras_unitscale import unit_scale

    inputs = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(8, 3, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3))(inputs)
    h = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu")(h)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2)(h)
    h = keras.layers.Conv2DTranspose(6, 2, strides=2, activation="tanh")(h)
    h = keras.layers.Reshape((-1, 6))(h)
    h = keras.layers.Conv1D(4, 3, padding="causal", groups=2)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    x = unit_normal(4, 16, 16, 3)
    twin = unit_scale(model)
    kinds = [type(layer) for layer in twin.layers if "conv" in layer.name]
    assert kinds == [layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D, layers.Conv2DTranspose,
                     layers.Conv1D]
    assert isinstance(twin.layers[1].kernel_regularizer, keras.regularizers.L2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(twin(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-4, atol=1e-5)
