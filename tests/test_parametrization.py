"""The u-μP table, the roles our layers give their variables, and the roles inferred for plain Keras layers."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale import layers as L
from keras_unitscale import parametrization as P
from keras_unitscale import unit_scale
from keras_unitscale import weights
from tests.helpers import unit_normal


def _by_layer(model, by_path):
    """Keys without the model's name, which Sequential models put in front of their paths."""
    return {path.removeprefix(model.name + "/"): value for path, value in by_path.items()}


def _roles(model, overrides=None):
    return _by_layer(model, P.tag_model(model, overrides))


@pytest.mark.parametrize(
    "role, expected_forward, expected_adam, expected_sgd",
    [
        (P.WeightRole("input", fan_in=1, fan_out=256), 1.0, 256**-0.5, 16.0),
        (P.WeightRole("input", fan_in=30, fan_out=256), 30**-0.5, 256**-0.5, 16.0),
        (P.WeightRole("hidden", fan_in=64, fan_out=256), 0.125, 0.125, 8.0),
        (P.WeightRole("output", fan_in=64, fan_out=10), 1 / 64, 1.0, 1.0),
        (P.WeightRole("bias", fan_out=32), 1.0, 1.0, 32.0),
        (P.WeightRole("norm", fan_out=32), 1.0, 1.0, 32.0),
    ],
)
def test_table(role, expected_forward, expected_adam, expected_sgd):
    assert role.forward_multiplier() == pytest.approx(expected_forward)
    assert role.lr_multiplier("adam") == pytest.approx(expected_adam)
    # SGD takes Adam's column unless the readout is constrained.
    assert role.lr_multiplier("sgd") == pytest.approx(expected_adam)
    assert role.lr_multiplier("sgd", "to_output_scale") == pytest.approx(expected_sgd)
    assert role.with_depth(4).lr_multiplier("adam") == pytest.approx(expected_adam / 2)


def test_table_errors_name_the_value():
    with pytest.raises(ValueError, match="role='weights'"):
        P.WeightRole("weights", fan_in=3)
    with pytest.raises(ValueError, match=r"needs \['fan_in'\]"):
        P.WeightRole("hidden", fan_out=3)
    with pytest.raises(ValueError, match="family='lamb'"):
        P.WeightRole("bias", fan_out=3).lr_multiplier("lamb")
    with pytest.raises(ValueError, match="readout_constraint='gmean'"):
        P.WeightRole("bias", fan_out=3).lr_multiplier("sgd", "gmean")


def test_forward_multipliers_are_what_the_ops_apply():
    x = unit_normal(8, 48)
    kernel = unit_normal(48, 16, seed=1)
    plain = np.asarray(x, "float64") @ kernel
    hidden = P.WeightRole("hidden", fan_in=48, fan_out=16).forward_multiplier()
    output = P.WeightRole("output", fan_in=48, fan_out=16).forward_multiplier()
    np.testing.assert_allclose(ops.convert_to_numpy(U.dense(x, kernel)), plain * hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ops.convert_to_numpy(U.dense_readout(x, kernel)), plain * output, rtol=1e-5, atol=1e-6
    )
    table = unit_normal(10, 16)
    embedding = P.WeightRole("input", fan_in=1, fan_out=16).forward_multiplier()
    np.testing.assert_allclose(
        ops.convert_to_numpy(U.embedding(np.array([3, 7]), table)), table[[3, 7]] * embedding
    )


def test_our_layers_tag_their_variables():
    inputs = keras.Input((12,), dtype="int32")
    x = L.Embedding(50, 32, name="embed")(inputs)
    x = L.TransformerBlock(num_heads=4, index=0, depth=2, name="block0")(x)
    x = L.TransformerBlock(num_heads=4, index=1, depth=2, name="block1")(x)
    x = L.LSTM(24, return_sequences=True, name="lstm")(x)
    x = L.LayerNormalization(name="norm")(x)
    outputs = L.Dense(50, role="output", name="readout")(x)
    roles = _roles(keras.Model(inputs, outputs))

    assert roles["embed/embeddings"] == P.WeightRole("input", fan_in=1, fan_out=32)
    assert roles["block0/attention/query/kernel"] == P.WeightRole("hidden", 32, 32, depth=2)
    assert roles["block1/attention/attention_output/kernel"] == P.WeightRole("hidden", 32, 32, depth=2)
    assert roles["block0/attention_norm/gamma"] == P.WeightRole("norm", fan_out=32, depth=2)
    assert roles["block0/mlp_up/kernel"] == P.WeightRole("hidden", 32, 128, depth=2)
    assert roles["block1/mlp_down/kernel"] == P.WeightRole("hidden", 128, 32, depth=2)
    assert roles["lstm/lstm_cell/kernel"] == P.WeightRole("hidden", 32, 96)
    assert roles["lstm/lstm_cell/recurrent_kernel"] == P.WeightRole("hidden", 24, 96)
    assert roles["lstm/lstm_cell/bias"] == P.WeightRole("bias", fan_out=96)
    assert roles["norm/gamma"] == P.WeightRole("norm", fan_out=24)
    assert roles["norm/beta"] == P.WeightRole("bias", fan_out=24)
    assert roles["readout/kernel"] == P.WeightRole("output", 24, 50)


def test_roles_are_inferred_for_plain_keras_layers():
    # Seed 000's model: the first Dense is the input, the last the output.
    model = keras.Sequential(
        [keras.Input((30,)), keras.layers.Dense(128, activation="relu", name="a"),
         keras.layers.Dense(64, activation="relu", name="b"), keras.layers.Dense(1, activation="sigmoid", name="c")]
    )
    roles = _roles(model)
    assert roles["a/kernel"] == P.WeightRole("input", 30, 128)
    assert roles["b/kernel"] == P.WeightRole("hidden", 128, 64)
    assert roles["c/kernel"] == P.WeightRole("output", 64, 1)
    assert roles["a/bias"] == P.WeightRole("bias", fan_out=128)


def test_roles_are_inferred_for_a_keras_transformer():
    inputs = keras.Input((8,), dtype="int32")
    x = keras.layers.Embedding(40, 32, name="embed")(inputs)
    h = keras.layers.LayerNormalization(name="norm")(x)
    h = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8, name="mha")(h, h)
    x = keras.layers.Add()([x, h])
    x = keras.layers.Dense(64, activation="gelu", name="up")(x)
    outputs = keras.layers.Dense(40, name="readout")(x)
    roles = _roles(keras.Model(inputs, outputs))
    assert roles["embed/embeddings"] == P.WeightRole("input", 1, 32)
    assert roles["norm/gamma"].role == "norm" and roles["norm/beta"].role == "bias"
    # EinsumDense kernels: the fan-in is what the equation sums over.
    assert roles["mha/query/kernel"] == P.WeightRole("hidden", 32, 32)
    assert roles["mha/attention_output/kernel"] == P.WeightRole("hidden", 32, 32)
    assert roles["up/kernel"] == P.WeightRole("hidden", 32, 64)
    assert roles["readout/kernel"] == P.WeightRole("output", 64, 40)


def test_overrides_win():
    model = keras.Sequential(
        [keras.Input((30,)), keras.layers.Dense(16, name="a"), keras.layers.Dense(1, name="b")]
    )
    roles = _roles(model, overrides={"a/kernel": "hidden", "b/bias": P.WeightRole("norm", fan_out=1)})
    assert roles["a/kernel"] == P.WeightRole("hidden", 30, 16)
    assert roles["b/bias"] == P.WeightRole("norm", fan_out=1)
    with pytest.raises(ValueError, match="role='kernel'"):
        P.tag_model(model, overrides={"a": "kernel"})


def test_a_plain_layer_between_ours_is_hidden():
    model = keras.Sequential(
        [keras.Input((30,)), L.Dense(16, role="input", name="a"), keras.layers.Dense(16, name="b"),
         L.Dense(1, role="output", name="c")]
    )
    roles = _roles(model)
    assert roles["b/kernel"] == P.WeightRole("hidden", 16, 16)
    assert roles["a/kernel"].role == "input" and roles["c/kernel"].role == "output"


def test_roles_are_recomputed_on_every_call():
    model = keras.Sequential(
        [keras.Input((30,)), keras.layers.Dense(16, name="a"), keras.layers.Dense(1, name="b")]
    )
    assert _roles(model, overrides={"a/kernel": "hidden"})["a/kernel"].role == "hidden"
    assert P.role_of(model.get_layer("a").kernel).role == "hidden"
    assert _roles(model)["a/kernel"].role == "input"


def test_an_unbuilt_model_is_refused_with_how_to_build_it():
    model = keras.Sequential([keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="model.build"):
        P.tag_model(model)


def test_lr_multipliers_follow_width_and_depth():
    def transformer(width, depth):
        inputs = keras.Input((8,), dtype="int32")
        x = L.Embedding(40, width, name="embed")(inputs)
        for i in range(depth):
            x = L.TransformerBlock(num_heads=2, index=i, depth=depth, name=f"block{i}")(x)
        outputs = L.Dense(40, role="output", name="readout")(x)
        model = keras.Model(inputs, outputs)
        return _by_layer(model, P.lr_multipliers(model))

    narrow, wide, deep = transformer(32, 2), transformer(128, 2), transformer(32, 8)
    assert narrow["embed/embeddings"] == pytest.approx(32**-0.5)
    assert narrow["block0/mlp_down/kernel"] == pytest.approx((4 * 32) ** -0.5 * 2**-0.5)
    assert narrow["block1/attention_norm/gamma"] == pytest.approx(2**-0.5)
    assert narrow["readout/kernel"] == 1.0
    # 4× the width: hidden and input weights' learning rates halve.
    for path in ("embed/embeddings", "block0/attention/query/kernel", "block1/mlp_up/kernel"):
        assert wide[path] == pytest.approx(narrow[path] / 2)
    assert wide["readout/kernel"] == narrow["readout/kernel"]
    # 4× the depth: everything inside the stack halves, the rest stays.
    assert deep["block0/attention/key/kernel"] == pytest.approx(narrow["block0/attention/key/kernel"] / 2)
    assert deep["embed/embeddings"] == narrow["embed/embeddings"]


def test_convolutions_are_inferred_as_our_layers_declare_them():
    # One rule (`rules.conv.kernel_fans`) for both: a DepthwiseConv2D's kernel sums its own channel's taps
    # (fan-in 9, not 9 × 16), a transpose's taps are thinned by its strides.
    keras.utils.set_random_seed(0)
    plain = keras.Sequential([
        keras.Input((8, 8, 16)), keras.layers.DepthwiseConv2D(3, padding="same"),
        keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same"),
        keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, padding="same"),
        keras.layers.Conv2D(4, 3, groups=2), keras.layers.Flatten(), keras.layers.Dense(1),
    ])
    inferred = {path.removeprefix(f"{plain.name}/"): (role.fan_in, role.fan_out)
                for path, role in P.tag_model(plain).items() if role.role not in ("bias", "norm")}
    ours = unit_scale(plain, mode="reinit")
    declared = {v.path: (weights.role(v).fan_in, weights.role(v).fan_out) for v in ours.trainable_variables
                if weights.role(v).role not in ("bias", "norm")}
    assert inferred == declared and len(declared) == 6
    assert declared[ours.layers[0].kernel.path] == (9, 16)
    assert declared[ours.layers[1].kernel.path] == (9 * 16 // 4, 8)  # the transpose: taps × inputs / strides
