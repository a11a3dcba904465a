"""Unit-scaled layers: scale at initialisation, Keras behaviour, saving, precision, errors."""

import keras
import numpy as np
import pytest
from helpers import BACKEND
from helpers import rms
from helpers import unit_normal
from keras import ops

from keras_unitscale import layers
from keras_unitscale import losses
from keras_unitscale.autodiff import layer_vjp
from keras_unitscale.autodiff import sequential_vjp
from keras_unitscale.autodiff import vjp

UNIT = (0.5, 2.0)


def _assert_in(name, value, bounds=UNIT):
    assert bounds[0] <= value <= bounds[1], f"{name}: RMS {value:.3f} outside {bounds}"


def _scales(layer, x, seed=7):
    """RMS of the output, the input gradient and each weight gradient, for a unit upstream."""
    output = ops.convert_to_numpy(layer(x))
    out, grad_x, weight_grads = layer_vjp(layer, x, unit_normal(*output.shape, seed=seed))
    return rms(out), None if grad_x is None else rms(grad_x), {k: rms(v) for k, v in weight_grads.items()}


# --- unit scale at initialisation ----------------------------------------------

SIZES = [(64, 32), (512, 128)]  # (width, batch)


@pytest.mark.parametrize("width, batch", SIZES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu", "tanh"])
def test_dense_scale(width, batch, activation):
    out, grad_x, grads = _scales(layers.Dense(width, activation=activation), unit_normal(batch, width // 2 + 16))
    _assert_in("output", out)
    _assert_in("input grad", grad_x)
    for name, value in grads.items():
        _assert_in(name, value)


@pytest.mark.parametrize("width, batch", SIZES)
def test_dense_readout_scale(width, batch):
    """The readout's output is 1/sqrt(fan_in) at initialisation: u-μP's readout, by design."""
    out, grad_x, grads = _scales(layers.Dense(10, role="output"), unit_normal(batch, width))
    _assert_in("output", out * width**0.5)
    _assert_in("input grad", grad_x)
    for name, value in grads.items():
        _assert_in(name, value)


@pytest.mark.parametrize("width, batch", SIZES)
def test_embedding_scale(width, batch):
    ids = np.random.default_rng(0).integers(0, 100, size=(batch, 16))
    out, _, grads = _scales(layers.Embedding(100, width), ids)
    _assert_in("output", out)
    _assert_in("table grad", grads[next(iter(grads))])


@pytest.mark.parametrize("width, batch", SIZES)
@pytest.mark.parametrize("layer_cls", [layers.LayerNormalization, layers.RMSNormalization])
def test_normalization_scale(width, batch, layer_cls):
    out, grad_x, grads = _scales(layer_cls(), unit_normal(batch, width))
    _assert_in("output", out)
    _assert_in("input grad", grad_x)
    for name, value in grads.items():
        _assert_in(name, value)


@pytest.mark.parametrize("width, batch", SIZES)
@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "tanh", "sigmoid", "softmax"])
def test_activation_layer_scale(width, batch, name):
    out, grad_x, _ = _scales(layers.Activation(name, constraint=None), unit_normal(batch, width))
    _assert_in("output", out)
    _assert_in("input grad", grad_x)


@pytest.mark.parametrize("width, batch", SIZES)
def test_dropout_layer_scale(width, batch):
    layer = layers.Dropout(0.3, seed=1)
    x = unit_normal(batch, width)
    out, (grad,) = vjp(lambda t: layer(t, training=True), [x], unit_normal(batch, width, seed=2))
    _assert_in("output", rms(out))
    _assert_in("input grad", rms(grad))


def _attention_kernel_bounds(name, key_dim, mult=1.0):
    """Query/key gradients pass through a nearly flat softmax at initialisation:
    about mult/sqrt(key_dim) of the rest (see functional.dot_product_attention)."""
    if "query" in name or "key/" in name:
        target = mult / key_dim**0.5
        return (UNIT[0] * target, UNIT[1] * target)
    return UNIT


@pytest.mark.parametrize("width, batch, heads", [(64, 8, 4), (256, 4, 4)])
def test_multi_head_attention_scale(width, batch, heads):
    layer = layers.MultiHeadAttention(heads, width // heads)
    x = unit_normal(batch, 32, width)
    out = ops.convert_to_numpy(layer(x, x, use_causal_mask=True))

    def fn(t, *weights):
        state = [v.value for v in layer.non_trainable_variables]
        return layer.stateless_call(list(weights), state, t, t, use_causal_mask=True)[0]

    _, grads = vjp(fn, [x, *[v.value for v in layer.trainable_variables]], unit_normal(*out.shape, seed=3))
    _assert_in("output", rms(out))
    _assert_in("input grad", rms(grads[0]))
    for variable, grad in zip(layer.trainable_variables, grads[1:]):
        if "key/bias" in variable.path:
            # Adding one vector to every key shifts each query's logits by a
            # constant, which the softmax ignores: its gradient is exactly 0.
            assert rms(grad) < 1e-6
            continue
        if "value/bias" in variable.path:
            # At initialisation every position's value gradient points the same
            # way (a flat softmax spreads each query's gradient evenly), so the
            # bias's sum over positions grows ~ linearly, not as sqrt: larger
            # than 1 by design of the rule. TransformerBlock has no biases.
            assert rms(grad) > 1.0
            continue
        _assert_in(variable.path, rms(grad), _attention_kernel_bounds(variable.path, width // heads))


@pytest.mark.parametrize("width, index, depth", [(64, 0, 2), (128, 3, 4)])
def test_transformer_block_scale(width, index, depth):
    block = layers.TransformerBlock(num_heads=4, index=index, depth=depth)
    out, grad_x, grads = _scales(block, unit_normal(8, 32, width))
    _assert_in("output", out)
    _assert_in("input grad", grad_x)
    for name, value in grads.items():
        _assert_in(name, value, _attention_kernel_bounds(name, width // 4))


# --- the drop-in models of seed 000 and of a language model ---------------------


def seed_000_model(lib):
    """Seed 000's model, with `lib` standing for `keras.layers` or `keras_unitscale.layers`."""
    model = keras.Sequential()
    model.add(keras.Input((100,)))
    model.add(lib.Dense(128, activation="relu"))
    model.add(lib.Dense(64, activation="relu"))
    model.add(lib.Dense(1, activation="sigmoid"))
    return model


def transformer_lm(lib, vocab=40, width=64, depth=2, seq=32):
    model = keras.Sequential([keras.Input((seq,), dtype="int32"), lib.Embedding(vocab, width)])
    for index in range(depth):
        model.add(layers.TransformerBlock(num_heads=4, index=index, depth=depth, name=f"block_{index}"))
    model.add(lib.Dense(vocab, role="output") if lib is layers else lib.Dense(vocab))
    return model


def keras_style_transformer_lm(lib, vocab=40, width=32, depth=2, seq=16):
    """A language model written with Keras layers only (MHA, LayerNormalization, Add, Dense)."""
    ids = keras.Input((seq,), dtype="int32")
    x = lib.Embedding(vocab, width)(ids)
    for _ in range(depth):
        h = lib.LayerNormalization()(x)
        x = lib.Add()([x, lib.MultiHeadAttention(num_heads=2, key_dim=width // 2)(h, h, use_causal_mask=True)])
        h = lib.LayerNormalization()(x)
        x = lib.Add()([x, lib.Dense(width)(lib.Dense(2 * width, activation="gelu")(h))])
    return keras.Model(ids, lib.Dense(vocab)(lib.LayerNormalization()(x)))


def test_keras_written_transformer_is_a_drop_in(tmp_path):
    """The same user code with `keras_unitscale.layers` for `keras.layers`: builds, trains, reloads."""
    keras.utils.set_random_seed(0)
    text = np.tile(np.arange(40), 40)
    x = np.stack([text[i : i + 16] for i in range(0, 1200, 8)])
    y = np.stack([text[i + 1 : i + 17] for i in range(0, 1200, 8)])
    for lib in (keras.layers, layers):
        model = keras_style_transformer_lm(lib)
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
        assert history.history["loss"][-1] < 0.5 * history.history["loss"][0], lib.__name__
    assert any(isinstance(layer, layers.Add) for layer in model.layers)
    _round_trip(model, x[:4], tmp_path)


def _binary_data(n=256, features=100, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x[:, :5].sum(axis=1) > 0).astype("float32")
    return x, y


def _round_trip(model, x, tmp_path):
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(reloaded.predict(x, verbose=0)), ops.convert_to_numpy(model.predict(x, verbose=0)),
        rtol=1e-6, atol=1e-6,
    )
    return reloaded


@pytest.mark.parametrize("jit_compile", [False, True])
def test_seed_000_model_is_a_drop_in(tmp_path, jit_compile):
    """Seed 000's code with `keras_unitscale.layers` for `keras.layers`, nothing else changed.

    Its Adam default (1e-3) moves unit-variance weights ~10x more slowly, relative
    to their size, than Keras's Glorot-initialised ones: it trains, more slowly.
    The u-μP optimizers give unit-scaled weights their own learning rates.
    """
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch.compile is exercised by test_scale.py; it takes ~20 s a model")
    keras.utils.set_random_seed(0)
    x, y = _binary_data()
    model = seed_000_model(layers)
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"], jit_compile=jit_compile)
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=["accuracy"],
                  jit_compile=jit_compile)
    history = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    predictions = ops.convert_to_numpy(model.predict(x, verbose=0))
    assert np.all((predictions > 0) & (predictions < 1))
    _round_trip(model, x, tmp_path)


def test_transformer_language_model_trains_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    text = np.tile(np.arange(40), 40)
    x = np.stack([text[i : i + 32] for i in range(0, 1200, 8)])
    y = np.stack([text[i + 1 : i + 33] for i in range(0, 1200, 8)])
    model = transformer_lm(layers)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    reloaded = _round_trip(model, x[:4], tmp_path)
    assert isinstance(reloaded.get_layer("block_1"), layers.TransformerBlock)
    assert isinstance(reloaded.loss, losses.SparseCategoricalCrossentropy)


def _activation_and_gradient_scales(model, x, cotangent):
    """RMS of each layer's output and of the gradient arriving at it."""
    return [(name, rms(output), rms(grad)) for name, output, grad in sequential_vjp(model, x, cotangent)]


def test_models_of_our_layers_are_unit_scaled_at_initialisation():
    """Every layer output and gradient within [0.25, 4]; the readout's logits excepted."""
    x, y = _binary_data(n=64)
    model = seed_000_model(layers)
    # The gradient that arrives from the (unit-scaled) loss, as in training.
    prediction = ops.convert_to_numpy(model(x))
    _, (upstream,) = vjp(lambda p: losses.BinaryCrossentropy()(y[:, None], p), [prediction], np.float32(1.0))
    rows = _activation_and_gradient_scales(model, x, upstream)
    for name, activation, grad in rows:
        _assert_in(f"{name} output", activation, (0.25, 4))
    # The head's output is a probability; the gradient there is the loss's own,
    # 2(p - y) / (p (1 - p)) ≈ ±4 at p = 1/2, which becomes ±1 at the logits.
    for name, activation, grad in rows[:-1]:
        _assert_in(f"{name} grad", grad, (0.25, 4))
    _, _, weight_grads = layer_vjp(model, x, upstream)
    for name, value in weight_grads.items():
        _assert_in(name, rms(value), (0.25, 4))

    # Byte-sized vocabulary: with a tiny one the same rows recur along the
    # sequence and the weight gradients add up coherently (see docs/limitations.md).
    ids = np.random.default_rng(0).integers(0, 256, size=(16, 32))
    lm = transformer_lm(layers, vocab=256)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    _, (upstream,) = vjp(lambda z: loss(ids, z), [ops.convert_to_numpy(lm(ids))], np.float32(1.0))
    rows = _activation_and_gradient_scales(lm, ids, upstream)
    for name, activation, grad in rows[:-1]:
        _assert_in(f"{name} output", activation, (0.25, 4))
        _assert_in(f"{name} grad", grad, (0.25, 4))
    _assert_in("readout logits × sqrt(width)", rows[-1][1] * 64**0.5, (0.25, 4))
    _, _, weight_grads = layer_vjp(lm, ids, upstream)
    for name, value in weight_grads.items():
        _assert_in(name, rms(value), (0.25, 4) if "query" not in name and "key/" not in name else (0.05, 4))


# --- masking, precision, config, errors ---------------------------------------


def test_embedding_mask_reaches_attention():
    embed = layers.Embedding(10, 16, mask_zero=True)
    attention = layers.MultiHeadAttention(2, 8)
    ids = np.array([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    h = embed(ids)
    _, scores = attention(h, h, return_attention_scores=True)
    scores = ops.convert_to_numpy(scores)
    assert np.all(scores[0, :, :3, 3:] < 1e-6)  # padded keys get no attention
    assert np.all(scores[1] > 0)


def test_causal_attention_matches_keras_pattern():
    attention = layers.MultiHeadAttention(2, 4)
    x = unit_normal(1, 5, 8)
    _, scores = attention(x, x, use_causal_mask=True, return_attention_scores=True)
    scores = ops.convert_to_numpy(scores)[0, 0]
    assert np.all(np.triu(scores, k=1) < 1e-6)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)
    fused = ops.convert_to_numpy(attention(x, x, use_causal_mask=True))
    unfused, _ = attention(x, x, use_causal_mask=True, return_attention_scores=True)
    np.testing.assert_allclose(ops.convert_to_numpy(unfused), fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    if BACKEND == "jax" and policy == "mixed_float16":
        import jax

        if jax.devices()[0].platform == "cpu":
            pytest.skip("XLA:CPU has no float16 dot with float32 accumulation; plain Keras attention fails alike")
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    model = transformer_lm(layers, depth=1)
    ids = np.random.default_rng(0).integers(0, 40, size=(32, 32))
    compute = keras.DTypePolicy(policy).compute_dtype
    assert keras.backend.standardize_dtype(model(ids).dtype) == compute
    assert all(v.dtype == "float32" for v in model.weights)
    model.compile(optimizer="adam", loss=losses.SparseCategoricalCrossentropy(from_logits=True), auto_scale_loss=False)
    history = model.fit(ids, ids, epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


LAYERS_FOR_CONFIG = [
    layers.Dense(8, activation="gelu", role="input", mult=2.0),
    layers.Dense(3, role="output"),
    layers.Embedding(7, 4, mask_zero=True),
    layers.LayerNormalization(epsilon=1e-5, center=False),
    layers.RMSNormalization(axis=-1),
    layers.Activation("silu", mult=0.5),
    layers.Dropout(0.2, seed=3),
    layers.MultiHeadAttention(2, 4, value_dim=6, dropout=0.1, output_shape=5, mult=2.0),
    layers.TransformerBlock(2, mlp_ratio=2, index=1, depth=3, norm="rms", residual_attn_ratio=2.0),
    layers.ResidualSplit(tau=0.3),
    layers.ResidualAdd(tau=0.3),
    layers.Residual(layers.Dense(4), tau=0.7),
    layers.Add(constraint="gmean"),
]


@pytest.mark.parametrize("layer", LAYERS_FOR_CONFIG, ids=lambda layer: type(layer).__name__)
def test_config_round_trip(layer):
    config = layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)
    assert restored.get_config() == config


def test_residual_layers_in_a_functional_model(tmp_path):
    inputs = keras.Input((16,))
    residual, skip = layers.ResidualSplit(tau=0.5)(inputs)
    branch = layers.Activation("relu")(layers.Dense(16)(residual))
    outputs = layers.ResidualAdd(tau=0.5)([branch, skip])
    model = keras.Model(inputs, layers.Residual(layers.Dense(16), tau=0.5)(outputs))
    x = unit_normal(4, 16)
    _round_trip(model, x, tmp_path)


@pytest.mark.parametrize("loss_cls, y_true, y_pred, keras_cls, scale", [
    (losses.SparseCategoricalCrossentropy, np.array([1, 0, 3]), unit_normal(3, 5), keras.losses.SparseCategoricalCrossentropy, 3 * 5 / 4**0.5),
    (losses.CategoricalCrossentropy, np.eye(5, dtype="float32")[[1, 0, 3]], unit_normal(3, 5), keras.losses.CategoricalCrossentropy, 3 * 5 / 4**0.5),
    (losses.BinaryCrossentropy, np.array([[1.0], [0.0]], "float32"), unit_normal(2, 1), keras.losses.BinaryCrossentropy, 2 * 2.0),
    (losses.MeanSquaredError, unit_normal(4, 3, seed=4), unit_normal(4, 3), keras.losses.MeanSquaredError, 12 * 8**-0.5),
])
def test_losses_report_keras_values_with_unit_scaled_gradients(loss_cls, y_true, y_pred, keras_cls, scale):
    kwargs = {} if loss_cls is losses.MeanSquaredError else {"from_logits": True}
    ours, theirs = loss_cls(**kwargs), keras_cls(**kwargs)
    value, (grad,) = vjp(lambda p: ours(y_true, p), [y_pred], np.float32(1.0))
    plain_value, (plain_grad,) = vjp(lambda p: theirs(y_true, p), [y_pred], np.float32(1.0))
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    np.testing.assert_allclose(grad, plain_grad * scale, rtol=1e-5, atol=1e-7)


BAD_LAYERS = [
    (lambda: layers.Dense(0), "units=0"),
    (lambda: layers.Dense(-3), "units=-3"),
    (lambda: layers.Dense(4, activation="not_an_activation"), "not_an_activation"),
    (lambda: layers.Dense(4, role="middle"), "role='middle'"),
    (lambda: layers.Embedding(0, 4), "input_dim=0"),
    (lambda: layers.MultiHeadAttention(num_heads=2), "key_dim=None"),
    (lambda: layers.MultiHeadAttention(2, 4, dropout=1.0), "dropout=1.0"),
    (lambda: layers.Dropout(1.5), "rate=1.5"),
    (lambda: layers.Activation(42), "42"),
    (lambda: layers.LayerNormalization(epsilon=-1), "epsilon=-1"),
    (lambda: layers.ResidualAdd(tau=-0.1), "tau=-0.1"),
    (lambda: layers.TransformerBlock(2, index=4, depth=4), "index=4"),
    (lambda: layers.TransformerBlock(2, norm="batch"), "norm='batch'"),
    (lambda: layers.Dense(4)(np.ones((3,), "float32")), "ndim"),
    (lambda: layers.MultiHeadAttention(2, 4)(np.ones((2, 8), "float32"), np.ones((2, 8), "float32")), "query.shape=\\(2, 8\\)"),
    (lambda: losses.MeanSquaredError(reduction="sum"), "reduction='sum'"),
    (lambda: layers.Add()([np.ones((2, 2), "float32"), np.ones((2, 3), "float32")]), "incompatible shapes"),
]


@pytest.mark.parametrize("call, received", BAD_LAYERS, ids=[b[1] for b in BAD_LAYERS])
def test_bad_arguments_raise_value_error_with_the_value(call, received):
    with pytest.raises(ValueError, match=received):
        call()
