"""Bad input, property-tested: random shapes, dtypes and extreme finite values; every argument checked."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_unitscale import callbacks
from keras_unitscale import functional as U
from keras_unitscale import layers as L
from keras_unitscale import optimizers

# Few examples each: CI runs this file on three backends, and JAX compiles
# every op afresh for each new shape when run eagerly.
PROPERTY = settings(max_examples=3 if keras.backend.backend() == "jax" else 15, deadline=None, derandomize=True)
DTYPES = ("float32", "float16", "bfloat16")


@st.composite
def arrays(draw, min_rank=2, max_rank=3, max_side=8, bound=1e15, shape=None):
    """A float32 array of a random shape whose values span `bound` (extremes included)."""
    if shape is None:
        rank = draw(st.integers(min_rank, max_rank))
        shape = tuple(draw(st.integers(1, max_side)) for _ in range(rank))
    magnitude = draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e3, bound]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(size=shape) * magnitude
    if values.size > 1 and draw(st.booleans()):
        values.flat[0] = bound  # one extreme element among ordinary ones
    return np.clip(values, -bound, bound).astype("float32")


def _numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


ELEMENTWISE = {
    "relu": U.relu, "gelu": U.gelu, "silu": U.silu, "tanh": U.tanh, "sigmoid": U.sigmoid, "softmax": U.softmax,
    "layer_norm": U.layer_norm, "rms_norm": U.rms_norm,
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@PROPERTY
@given(x=arrays())
def test_elementwise_ops_and_norms_keep_finite_input_finite(name, x):
    y = _numpy(ELEMENTWISE[name](x))
    assert y.shape == x.shape and np.isfinite(y).all(), (name, x.min(), x.max())


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("dtype", DTYPES[1:])
@PROPERTY
@given(x=arrays(bound=1e4))
def test_elementwise_ops_and_norms_run_in_half_precision_and_keep_the_dtype(name, dtype, x):
    y = ELEMENTWISE[name](keras.ops.cast(x, dtype))
    assert keras.backend.standardize_dtype(y.dtype) == dtype and tuple(y.shape) == x.shape


@PROPERTY
@given(data=st.data(), batch=st.integers(1, 5), fan_in=st.integers(1, 32), fan_out=st.integers(1, 16))
def test_dense_and_add_on_extreme_values(data, batch, fan_in, fan_out):
    x = data.draw(arrays(shape=(batch, fan_in), bound=1e6))
    kernel = data.draw(arrays(shape=(fan_in, fan_out), bound=1e6))
    y = _numpy(U.dense(x, kernel, np.zeros((fan_out,), "float32")))
    assert y.shape == (batch, fan_out) and np.isfinite(y).all()
    assert np.isfinite(_numpy(U.add(y, y))).all()
    assert np.isfinite(_numpy(U.residual_add(y, y, tau=0.5))).all()


@PROPERTY
@given(data=st.data(), batch=st.integers(1, 4), classes=st.integers(2, 12))
def test_cross_entropy_on_extreme_logits_is_finite(data, batch, classes):
    logits = data.draw(arrays(shape=(batch, classes), bound=1e15))
    labels = np.arange(batch) % classes
    loss = _numpy(U.cross_entropy(logits, labels))
    assert np.isfinite(loss).all()


@PROPERTY
@given(data=st.data(), batch=st.integers(1, 3), seq=st.integers(1, 6), heads=st.integers(1, 3),
       head_dim=st.integers(1, 8), causal=st.booleans())
def test_attention_on_extreme_values_is_finite(data, batch, seq, heads, head_dim, causal):
    q, k, v = (data.draw(arrays(shape=(batch, seq, heads, head_dim), bound=1e4)) for _ in range(3))
    out = _numpy(U.dot_product_attention(q, k, v, is_causal=causal))
    assert out.shape == q.shape and np.isfinite(out).all()


# Each of our layers against Keras's, built with the same arguments on the same input shape.
LAYER_PAIRS = {
    "Dense": (lambda: L.Dense(5, activation="relu"), lambda: keras.layers.Dense(5, activation="relu")),
    "LayerNormalization": (L.LayerNormalization, keras.layers.LayerNormalization),
    "Activation": (lambda: L.Activation("gelu"), lambda: keras.layers.Activation("gelu")),
    "Dropout": (lambda: L.Dropout(0.3), lambda: keras.layers.Dropout(0.3)),
    "LSTM": (lambda: L.LSTM(4, return_sequences=True), lambda: keras.layers.LSTM(4, return_sequences=True)),
}


@pytest.mark.parametrize("name", sorted(LAYER_PAIRS))
@PROPERTY
@given(data=st.data())
def test_layers_give_kerass_output_shapes_and_finite_values(name, data):
    ours, theirs = (make() for make in LAYER_PAIRS[name])
    x = data.draw(arrays(min_rank=3, max_rank=3, bound=1e3))
    y = _numpy(ours(x))
    assert y.shape == tuple(theirs(x).shape) and np.isfinite(y).all()


@settings(PROPERTY, max_examples=min(PROPERTY.max_examples, 5))
@given(data=st.data(), batch=st.integers(1, 3), seq=st.integers(1, 6), width=st.sampled_from([4, 8, 12]))
def test_attention_layers_give_kerass_output_shapes(data, batch, seq, width):
    x = data.draw(arrays(shape=(batch, seq, width), bound=1e3))
    ours = L.MultiHeadAttention(2, 4)(x, x, use_causal_mask=True)
    theirs = keras.layers.MultiHeadAttention(2, 4)(x, x, use_causal_mask=True)
    assert tuple(ours.shape) == tuple(theirs.shape) and np.isfinite(_numpy(ours)).all()


@PROPERTY
@given(ids=st.lists(st.integers(0, 9), min_size=1, max_size=12))
def test_embedding_matches_kerass_shape(ids):
    x = np.array([ids])
    assert tuple(L.Embedding(10, 3)(x).shape) == tuple(keras.layers.Embedding(10, 3)(x).shape)


@pytest.mark.parametrize("call", [
    lambda: U.dense(np.ones((2, 3), "float32"), np.ones((4, 5), "float32")),
    lambda: U.add(np.ones((2, 3), "float32"), np.ones((4, 5), "float32")),
    lambda: U.dot_product_attention(*(np.ones((1, 2, 1, 4), "float32"),) * 2, np.ones((1, 3, 1, 4), "float32")),
    lambda: U.layer_norm(np.ones((2, 3), "float32"), axis=5),
    lambda: L.Dense(3)(np.ones((2,), "float32")),
], ids=["dense", "add", "attention", "layer_norm", "dense_layer"])
def test_mismatched_shapes_are_a_value_error_that_names_them(call):
    with pytest.raises(ValueError, match="Received|received|shape|dimension"):
        call()


ARGUMENTS = [
    (lambda: L.Dense(0), "units=0"),
    (lambda: L.Dense(3, activation="nope"), "activation='nope'"),
    (lambda: L.Dense(3, role="x"), "role='x'"),
    (lambda: L.Dense(3, constraint="zz"), "constraint='zz'"),
    (lambda: L.Dense(3, mult=-1), "mult=-1"),
    (lambda: L.Dense(3, weight_multipliers={"kernel": -1}), "weight_multipliers={'kernel': -1}"),
    (lambda: L.Dense(3, lr_multipliers={"kernel": 0}), "lr_multipliers={'kernel': 0}"),
    (lambda: L.Embedding(0, 3), "input_dim=0"),
    (lambda: L.Embedding(3, -2), "output_dim=-2"),
    (lambda: L.LayerNormalization(epsilon=-1), "epsilon=-1"),
    (lambda: L.RMSNormalization(epsilon=-1), "epsilon=-1"),
    (lambda: L.MultiHeadAttention(0, 4), "num_heads=0"),
    (lambda: L.MultiHeadAttention(2, None), "key_dim=None"),
    (lambda: L.MultiHeadAttention(2, 4, dropout=1.5), "dropout=1.5"),
    (lambda: L.MultiHeadAttention(2, 4, mult=0), "mult=0"),
    (lambda: L.LSTM(0), "units=0"),
    (lambda: L.LSTM(3, dropout=1.0), "dropout=1.0"),
    (lambda: L.LSTM(3, activation="relu"), "activation='relu'"),
    (lambda: L.Dropout(1.5), "rate=1.5"),
    (lambda: L.Activation("zz"), "activation='zz'"),
    (lambda: L.Activation("gelu", mult=0), "mult=0"),
    (lambda: L.Add(constraint="zz"), "constraint='zz'"),
    (lambda: L.ResidualAdd(tau=-1), "tau=-1"),
    (lambda: L.ResidualSplit(tau=-1), "tau=-1"),
    (lambda: L.TransformerBlock(0), "num_heads=0"),
    (lambda: L.TransformerBlock(2, depth=0), "depth=0"),
    (lambda: L.TransformerBlock(2, index=3, depth=2), "index=3"),
    (lambda: L.TransformerBlock(2, norm="batch"), "norm='batch'"),
    (lambda: L.TransformerBlock(2, mlp_ratio=0), "mlp_ratio=0"),
    (lambda: optimizers.Adam(parametrization="x"), "parametrization='x'"),
    (lambda: optimizers.Adam(weight_decay=-1), "weight_decay=-1"),
    (lambda: optimizers.SGD(readout_constraint="x"), "readout_constraint='x'"),
    (lambda: callbacks.UnitScaleCallback(mode="x"), "mode='x'"),
    (lambda: callbacks.UnitScaleCallback(lr_scale="x"), "lr_scale='x'"),
    (lambda: callbacks.ScaleTracker(every=0), "every=0"),
]


@pytest.mark.parametrize("make, received", ARGUMENTS, ids=[received for _, received in ARGUMENTS])
def test_every_public_argument_is_checked_and_the_value_named(make, received):
    with pytest.raises(ValueError) as error:
        make()
    assert f"Received: {received}" in str(error.value) or received in str(error.value), str(error.value)
