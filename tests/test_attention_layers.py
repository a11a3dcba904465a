"""`EinsumDense` and `MultiHeadAttention` as subclasses of Keras's: Keras's behaviours, with the unit-scaling rules.

Attention is compared with Keras's own layer through a *twin*: our layer with
Keras's weights, weight multipliers that undo each projection's
`fan_in^-1/2` and `mult = sqrt(key_dim)` (so that its logits are Keras's
`q·k / sqrt(key_dim)`). The twin's attention probabilities are then Keras's,
and its output is Keras's times the rule's output scale
(`rules.attention.attention`), which tells which scale (causal or not, which
key length) the layer applied.
"""

import math

import keras
import numpy as np
import pytest
from helpers import rms
from helpers import unit_normal
from keras import ops
from keras.src.backend import get_keras_mask

from keras_unitscale import layers as L
from keras_unitscale import rules
from keras_unitscale import unit_scale
from keras_unitscale import weights
from keras_unitscale.rules.mup import WeightRole
from keras_unitscale.autodiff import layer_vjp
from keras_unitscale.autodiff import vjp
from keras_unitscale.ops import linear as linear_ops

B, T, WIDTH, HEADS, KEY_DIM = 2, 6, 16, 2, 8


def _numpy(x):
    return ops.convert_to_numpy(x)


# --- EinsumDense: the unit-scaled op -----------------------------------------------------------

EQUATIONS = [
    # (equation, output_shape, bias_axes, input shape)
    ("ab,bc->ac", 128, "c", (256, 128)),
    ("abc,cde->abde", (None, 4, 32), "de", (16, 32, 128)),  # an attention projection
    ("abcd,cde->abe", (None, 96), "e", (16, 32, 4, 32)),  # attention's output projection
    ("...b,bc->...c", 128, "c", (8, 16, 96)),
    ("ab...,bc->ac...", (96, None), "c", (64, 96, 8)),
]


@pytest.mark.parametrize("equation, output_shape, bias_axes, shape", EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_einsum_dense_is_unit_scaled_at_initialisation(equation, output_shape, bias_axes, shape):
    """Unconstrained, the output, the input gradient and both weight gradients start at unit RMS."""
    keras.utils.set_random_seed(0)
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes, constraint=None)
    x = unit_normal(*shape)
    y = _numpy(layer(x))
    out, grad_x, grads = layer_vjp(layer, x, unit_normal(*y.shape, seed=1))
    assert 0.8 < rms(out) < 1.25
    assert 0.8 < rms(grad_x) < 1.25
    assert sorted(name.rsplit("/", 1)[1] for name in grads) == ["bias", "kernel"]
    for name, grad in grads.items():
        assert 0.8 < rms(grad) < 1.25, name
    # The kernel's u-μP role: its fan-in is the product of its contracted axes.
    sizes = linear_ops.einsum_sizes(equation, shape, tuple(layer.kernel.shape))
    role = weights.role(layer._kernel)
    assert (role.role, role.fan_in) == ("hidden", sizes.fan_in)
    assert role.fan_in * role.fan_out == int(np.prod(layer.kernel.shape))


@pytest.mark.parametrize("equation, output_shape, bias_axes, shape", EQUATIONS[:3], ids=[e[0] for e in EQUATIONS[:3]])
def test_einsum_dense_default_constraint_ties_the_input_gradient_to_the_output_scale(
    equation, output_shape, bias_axes, shape
):
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    x = unit_normal(*shape)
    y = _numpy(layer(x))
    _, grad_x, _ = layer_vjp(layer, x, unit_normal(*y.shape, seed=1))
    sizes = linear_ops.einsum_sizes(equation, shape, tuple(layer.kernel.shape))
    # The input gradient sums fan_out unit terms, scaled by the output's fan_in^-1/2.
    assert rms(grad_x) == pytest.approx((sizes.fan_out / sizes.fan_in) ** 0.5, rel=0.15)


def test_einsum_dense_of_a_dense_equation_is_dense():
    keras.utils.set_random_seed(0)
    einsum = L.EinsumDense("...b,bc->...c", 24, bias_axes="c", activation="gelu")
    dense = L.Dense(24, activation="gelu")
    x = unit_normal(4, 5, 40)
    einsum.build(x.shape)
    dense.build(x.shape)
    dense.kernel.assign(einsum.kernel)
    dense.bias.assign(unit_normal(24, seed=3))
    einsum.bias.assign(unit_normal(24, seed=3))
    cotangent = unit_normal(4, 5, 24, seed=2)
    ours, grad_ours, weight_grads_ours = layer_vjp(einsum, x, cotangent)
    theirs, grad_theirs, weight_grads_theirs = layer_vjp(dense, x, cotangent)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_ours, grad_theirs, rtol=1e-5, atol=1e-6)
    for ours_grad, theirs_grad in zip(weight_grads_ours.values(), weight_grads_theirs.values()):
        np.testing.assert_allclose(ours_grad, theirs_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "silu", "softplus", lambda z: ops.tanh(z) + 0.1 * z])
def test_einsum_dense_activations_are_unit_scaled(activation):
    layer = L.EinsumDense("abc,cd->abd", (None, 64), activation=activation, constraint=None)
    x = unit_normal(8, 32, 256)
    y = _numpy(layer(x))
    _, grad_x, _ = layer_vjp(layer, x, unit_normal(*y.shape, seed=1))
    assert 0.75 < rms(y) < 1.25
    assert 0.75 < rms(grad_x) < 1.25


def test_einsum_dense_weight_multipliers_and_config():
    layer = L.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d", weight_multipliers={"kernel": 0.5},
                          lr_multipliers={"bias": 2.0}, role="input", mult=1.5, fp8=False, name="proj")
    x = unit_normal(2, 3, 16)
    y = _numpy(layer(x))
    assert layer.weight_multipliers == {"kernel": 0.5} and layer.lr_multipliers == {"bias": 2.0}
    assert weights.role(layer._kernel).role == "input"
    config = layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is L.EinsumDense and restored.get_config() == config
    assert restored.built  # the serialised object has its build config
    restored.set_weights(layer.get_weights())
    np.testing.assert_allclose(_numpy(restored(x)), y, rtol=1e-6)
    # Keras's own layer's config is accepted.
    plain = keras.layers.EinsumDense("abc,cd->abd", (None, 8), bias_axes="d", lora_rank=2)
    ours = L.EinsumDense.from_config(plain.get_config())
    assert ours.equation == "abc,cd->abd" and ours.lora_rank == 2


def test_einsum_dense_bad_equation_names_it():
    with pytest.raises(ValueError, match="equation='ab,cd'"):
        linear_ops.einsum_sizes("ab,cd", (2, 3), (3, 4))
    with pytest.raises(ValueError, match="repeats a label"):
        linear_ops.einsum_dense("abb,bc->ac", np.ones((2, 3, 3), "float32"), np.ones((3, 4), "float32"))


# --- EinsumDense: LoRA ------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 16, 64])
def test_lora_update_has_unit_scale_whatever_the_rank(rank):
    """With A and B unit-normal, the low-rank path's output has unit RMS (Keras's default alpha: sqrt(rank))."""
    keras.utils.set_random_seed(rank)
    layer = L.EinsumDense("abc,cde->abde", (None, 4, 64), kernel_initializer="zeros")
    x = unit_normal(8, 16, 256)
    layer.build(x.shape)
    layer.enable_lora(rank, b_initializer=keras.initializers.RandomNormal(stddev=1.0))
    assert layer.lora_alpha == pytest.approx(rules.linear.lora_alpha(rank)) == pytest.approx(rank**0.5)
    low_rank = rms(_numpy(layer(x)))  # the kernel is zero: all of it is the low-rank path
    assert 0.8 < low_rank < 1.25, low_rank
    # Keras's own default, lora_alpha = rank, makes the same path grow as sqrt(rank).
    plain_alpha = L.EinsumDense("abc,cde->abde", (None, 4, 64), kernel_initializer="zeros")
    plain_alpha.build(x.shape)
    plain_alpha.enable_lora(rank, lora_alpha=rank, b_initializer=keras.initializers.RandomNormal(stddev=1.0))
    assert rms(_numpy(plain_alpha(x))) / rank**0.5 == pytest.approx(low_rank, rel=0.25)


def test_lora_factors_declare_their_roles():
    layer = L.EinsumDense("abc,cde->abde", (None, 4, 8), bias_axes="de", lora_rank=3)
    layer.build((2, 5, 32))
    kernel_role = weights.role(layer._kernel)
    assert weights.role(layer.lora_kernel_a) == WeightRole("hidden", fan_in=kernel_role.fan_in, fan_out=3)
    assert weights.role(layer.lora_kernel_b) == WeightRole("hidden", fan_in=3, fan_out=8)
    assert layer.lora_alpha == pytest.approx(3**0.5)
    assert not layer._kernel.trainable
    assert {v.name for v in layer.trainable_variables} == {"lora_kernel_a", "lora_kernel_b", "bias"}


def _lora_model(lora_rank=None):
    inputs = keras.Input((6, 12))
    h = L.EinsumDense("abc,cde->abde", (None, 2, 8), bias_axes="de", name="proj", lora_rank=lora_rank)(inputs)
    h = keras.layers.Reshape((6, 16))(h)
    return keras.Model(inputs, L.EinsumDense("abc,cd->abd", (None, 3), name="head", role="output")(h))


def test_lora_fine_tuning_trains_the_factors_only_and_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = unit_normal(64, 6, 12), unit_normal(64, 6, 3, seed=1)
    model = _lora_model()
    frozen = _numpy(model.get_layer("proj")._kernel)
    model.get_layer("proj").enable_lora(4)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    np.testing.assert_array_equal(_numpy(model.get_layer("proj")._kernel), frozen)
    assert np.any(_numpy(model.get_layer("proj").lora_kernel_b) != 0)
    predictions = model.predict(x, verbose=0)
    # The whole model, LoRA included.
    model.save(tmp_path / "lora.keras")
    reloaded = keras.saving.load_model(tmp_path / "lora.keras")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), predictions, rtol=1e-5, atol=1e-6)
    # Weights only, into a model with LoRA: Keras saves the merged kernel and zeroes the factors on loading.
    model.save_weights(tmp_path / "lora.weights.h5")
    fresh = _lora_model(lora_rank=4)
    fresh.load_weights(tmp_path / "lora.weights.h5")
    np.testing.assert_allclose(fresh.predict(x, verbose=0), predictions, rtol=1e-5, atol=1e-5)


# --- EinsumDense: quantization ----------------------------------------------------------------


def _plain_twin(layer, x_shape):
    """Keras's EinsumDense computing what `layer` computes: its kernel times the op's forward scale."""
    sizes = linear_ops.einsum_sizes(layer.equation, x_shape, tuple(layer.kernel.shape))
    plain = keras.layers.EinsumDense(layer.equation, layer.partial_output_shape, bias_axes=layer.bias_axes)
    plain.build(x_shape)
    plain.kernel.assign(_numpy(layer.kernel) * rules.linear.forward_scale(sizes.fan_in))
    if layer.bias is not None:  # the op's output scale applies to the bias too
        plain.bias.assign(_numpy(layer.bias) * rules.linear.forward_scale(sizes.fan_in))
    return plain


def _relative_error(approximate, exact):
    return float(np.sqrt(np.mean((approximate - exact) ** 2) / np.mean(exact**2)))


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
@pytest.mark.parametrize("equation, output_shape, bias_axes, shape", EQUATIONS[1:3], ids=[e[0] for e in EQUATIONS[1:3]])
def test_quantized_einsum_dense_is_as_close_as_kerass_own(mode, equation, output_shape, bias_axes, shape):
    keras.utils.set_random_seed(0)
    layer = L.EinsumDense(equation, output_shape, bias_axes=bias_axes, weight_multipliers={"kernel": 0.7})
    x = unit_normal(*shape)
    layer.build(x.shape)
    layer.bias.assign(unit_normal(*layer.bias.shape, seed=5) * 0.1)
    plain = _plain_twin(layer, x.shape)
    plain.kernel.assign(_numpy(plain.kernel) * 0.7)
    exact = _numpy(layer(x))
    np.testing.assert_allclose(_numpy(plain(x)), exact, rtol=1e-4, atol=1e-4)
    layer.quantize(mode)
    plain.quantize(mode)
    assert layer.quantization_mode == plain.quantization_mode == mode
    assert layer.weight_multipliers == {}  # folded into the kernel before quantizing
    ours, theirs = _numpy(layer(x)), _numpy(plain(x))
    ours_error, theirs_error = _relative_error(ours, exact), _relative_error(theirs, exact)
    assert ours_error <= 1.1 * theirs_error + 1e-6, (ours_error, theirs_error)
    assert ours_error < 0.2
    sizes = linear_ops.einsum_sizes(equation, shape, layer._kernel_shape())
    # The quantized kernel keeps its role.
    assert weights.role(layer._stored_kernel()).fan_in == sizes.fan_in
    if mode == "float8":
        # Keras's float8 layer trains through its own trainer, which overwrites
        # its scale variables with their "gradients": it trains inside a model.
        inputs = keras.Input(shape[1:])
        model = keras.Model(inputs, layer(inputs))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        history = model.fit(x, exact * 0.5, epochs=3, batch_size=4, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert history.history["loss"][-1] < history.history["loss"][0]
        return
    # The rule's input-gradient scale stays around Keras's quantized computation.
    _, grad_x, _ = layer_vjp(layer, x, unit_normal(*exact.shape, seed=1))
    _, plain_grad_x, _ = layer_vjp(plain, x, unit_normal(*exact.shape, seed=1))
    expected = rules.linear.dense(sizes.fan_in, sizes.fan_out).grad_input / rules.linear.forward_scale(sizes.fan_in)
    assert rms(grad_x) / rms(plain_grad_x) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantized_dtype_policy_builds_the_quantized_layer(mode):
    keras.utils.set_random_seed(0)
    x = unit_normal(4, 10, 32)
    layer = L.EinsumDense("abc,cde->abde", (None, 2, 8), bias_axes="de")
    layer.build(x.shape)
    layer.quantize(mode)
    policy = layer.dtype_policy.name
    rebuilt = L.EinsumDense("abc,cde->abde", (None, 2, 8), bias_axes="de", dtype=policy)
    rebuilt.build(x.shape)
    assert rebuilt.quantization_mode == mode
    store = {}  # as Keras's weight files carry them (the order of `get_weights` differs for float8)
    layer.save_own_variables(store)
    rebuilt.load_own_variables(store)
    np.testing.assert_allclose(_numpy(rebuilt(x)), _numpy(layer(x)), rtol=1e-5, atol=1e-5)
    # Through a config, as a saved model carries it.
    restored = L.EinsumDense.from_config(rebuilt.get_config())
    assert restored.dtype_policy.name == policy


# --- MultiHeadAttention: Keras's layer, our projections -------------------------------------


def test_attention_projections_are_our_einsum_dense_with_kerass_paths():
    layer = L.MultiHeadAttention(HEADS, KEY_DIM, use_gate=True, name="mha")
    x = unit_normal(B, T, WIDTH)
    layer(x, x)
    projections = [layer.query_dense, layer.key_dense, layer.value_dense, layer._gate_dense, layer.output_dense]
    assert all(isinstance(p, L.EinsumDense) for p in projections)
    plain = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, use_gate=True, name="mha")
    plain(x, x)
    assert [v.path for v in layer.weights] == [v.path for v in plain.weights]
    assert [tuple(v.shape) for v in layer.weights] == [tuple(v.shape) for v in plain.weights]
    assert weights.role(layer.output_dense._kernel) == WeightRole("hidden", HEADS * KEY_DIM, WIDTH)
    assert weights.role(layer.query_dense._kernel) == WeightRole("hidden", WIDTH, HEADS * KEY_DIM)
    assert layer.output_dense.fp8_critical and not layer.query_dense.fp8_critical


def test_each_projection_draws_its_own_kernel():
    # Before the layers were Keras's, one seeded draw initialised the query,
    # key, value and output kernels alike: q = k at initialisation.
    keras.utils.set_random_seed(0)
    layer = L.MultiHeadAttention(4, 16, use_gate=True)
    x = unit_normal(B, T, 64)
    layer(x, x)
    kernels = [ops.convert_to_numpy(p.kernel).ravel() for p in
               (layer.query_dense, layer.key_dense, layer.value_dense, layer._gate_dense, layer.output_dense)]
    for i in range(len(kernels)):  # 4096 draws each: independent ones correlate by about ±0.016
        for j in range(i):
            assert abs(np.corrcoef(kernels[i], kernels[j])[0, 1]) < 0.1, (i, j)


def _twin(theirs, query_shape, value_shape=None, **config):
    """Our layer computing Keras's attention probabilities, and its output times the rule's scale."""
    ours = L.MultiHeadAttention.from_config({**theirs.get_config(), "mult": theirs.key_dim**0.5, **config})
    ours.build(query_shape, value_shape or query_shape)
    for name in ("query_dense", "key_dense", "value_dense", "_gate_dense", "output_dense"):
        mine, original = getattr(ours, name, None), getattr(theirs, name, None)
        if original is None:
            continue
        multiplier = weights.role(mine._kernel).fan_in ** 0.5
        for variable, value in zip(mine._own_weights(), [original.kernel, original.bias]):
            variable.assign(_numpy(value))
            mine.set_weight_multiplier(variable.name, multiplier)
    return ours


def _scale(key_length, causal=False, gate=False):
    """The output scale of the twin over Keras's layer."""
    scale = rules.attention.attention(KEY_DIM, key_length, KEY_DIM**0.5, causal).output
    return scale * (rules.activations.sigmoid().output if gate else 1.0)


def _keras_layer(x, **kwargs):
    keras.utils.set_random_seed(0)
    layer = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, **kwargs)
    layer(x, x)
    return layer


def _valid_mask(shape, seed=0):
    """A random boolean mask in which every query attends at least one key (itself)."""
    mask = np.random.default_rng(seed).random(shape) < 0.6
    return mask | np.eye(shape[-2], shape[-1], dtype=bool)


@pytest.mark.parametrize("mask_shape", [(T, T), (B, T, T), (B, HEADS, T, T), (B, 1, T, T)],
                         ids=["T,S", "B,T,S", "B,H,T,S", "B,1,T,S"])
def test_every_attention_mask_shape_keras_takes(mask_shape):
    x = unit_normal(B, T, WIDTH)
    theirs = _keras_layer(x)
    ours = _twin(theirs, x.shape)
    mask = _valid_mask(mask_shape)
    out, scores = ours(x, x, attention_mask=mask, return_attention_scores=True)
    plain_out, plain_scores = theirs(x, x, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_allclose(_numpy(scores), _numpy(plain_scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_numpy(out), _scale(T) * _numpy(plain_out), rtol=1e-4, atol=1e-5)
    # The fused path (no scores) gives the same.
    np.testing.assert_allclose(_numpy(ours(x, x, attention_mask=mask)), _numpy(out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_shape", [(T, T), (B, T, T), (B, HEADS, T, T)], ids=["T,S", "B,T,S", "B,H,T,S"])
def test_use_causal_mask_equals_the_explicit_causal_mask(mask_shape):
    x = unit_normal(B, T, WIDTH)
    theirs = _keras_layer(x)
    ours = _twin(theirs, x.shape)
    causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), mask_shape)
    implicit = _numpy(ours(x, x, use_causal_mask=True))
    np.testing.assert_allclose(_numpy(ours(x, x, attention_mask=causal)), implicit, rtol=1e-5, atol=1e-6)
    # Both are Keras's causal attention, at the rule's causal scale.
    np.testing.assert_allclose(implicit, _scale(T, causal=True) * _numpy(theirs(x, x, use_causal_mask=True)),
                               rtol=1e-4, atol=1e-5)
    # A mask that lets some query see a later key is not causal: the non-causal scale.
    leaky = causal.copy()
    leaky[..., 0, 1] = True
    np.testing.assert_allclose(_numpy(ours(x, x, attention_mask=leaky)),
                               _scale(T) * _numpy(theirs(x, x, attention_mask=leaky)), rtol=1e-4, atol=1e-5)


def _padded(ids):
    """Embedded `ids` with Keras's padding mask: a fresh tensor each time (Keras's attention clears its input's)."""
    keras.utils.set_random_seed(0)
    return keras.layers.Embedding(10, WIDTH, mask_zero=True)(ids)


def test_causal_and_padding_masks_combine_as_in_keras():
    ids = np.array([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    h = _padded(ids)
    theirs = _keras_layer(_numpy(h))
    ours = _twin(theirs, h.shape)
    out, scores = ours(h, h, use_causal_mask=True, return_attention_scores=True)
    h = _padded(ids)
    plain_out, plain_scores = theirs(h, h, use_causal_mask=True, return_attention_scores=True)
    assert np.all(_numpy(scores)[0, :, :3, 3:] < 1e-6)  # padded keys get no attention
    valid = np.array([[1, 1, 1, 0, 0, 0], [1] * 6], bool)
    np.testing.assert_allclose(_numpy(scores)[valid[:, None, :, None].repeat(HEADS, 1).repeat(T, 3)],
                               _numpy(plain_scores)[valid[:, None, :, None].repeat(HEADS, 1).repeat(T, 3)],
                               rtol=1e-5, atol=1e-6)
    # Padded queries' rows are Keras's concern; the others are causal attention, at the causal scale.
    np.testing.assert_allclose(_numpy(out)[valid], _scale(T, causal=True) * _numpy(plain_out)[valid],
                               rtol=1e-4, atol=1e-5)
    explicit = np.tril(np.ones((T, T), bool))[None] & valid[:, :, None] & valid[:, None, :]
    h = _numpy(_padded(ids))  # no Keras mask: all of it in the explicit mask
    np.testing.assert_allclose(_numpy(ours(h, h, attention_mask=explicit))[valid], _numpy(out)[valid],
                               rtol=1e-5, atol=1e-5)


def test_query_mask_propagates_eagerly_and_in_functional_models():
    ids = np.array([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    ours, theirs = L.MultiHeadAttention(HEADS, KEY_DIM), keras.layers.MultiHeadAttention(HEADS, KEY_DIM)
    for layer in (ours, theirs):
        h = _padded(ids)
        mask = get_keras_mask(layer(h, h))
        np.testing.assert_array_equal(_numpy(mask), ids != 0)
    # Functional: the mask reaches the layer after attention (a masked mean over positions).
    tokens = keras.Input((T,), dtype="int32")
    embedded = keras.layers.Embedding(10, WIDTH, mask_zero=True)(tokens)
    attended = L.MultiHeadAttention(HEADS, KEY_DIM)(embedded, embedded)
    model = keras.Model(tokens, [attended, keras.layers.GlobalAveragePooling1D()(attended)])
    sequence, pooled = model.predict(ids, verbose=0)
    expected = np.stack([sequence[i][ids[i] != 0].mean(axis=0) for i in range(len(ids))])
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


def test_return_attention_scores_in_a_functional_model():
    x = unit_normal(B, T, WIDTH)
    query = keras.Input((T, WIDTH))
    value = keras.Input((T + 2, WIDTH))
    layer = L.MultiHeadAttention(HEADS, KEY_DIM)
    outputs = layer(query, value, return_attention_scores=True)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    model = keras.Model([query, value], outputs)
    v = unit_normal(B, T + 2, WIDTH, seed=1)
    out, scores = model.predict([x, v], verbose=0)
    assert out.shape == (B, T, WIDTH) and scores.shape == (B, HEADS, T, T + 2)
    eager_out, eager_scores = layer(x, v, return_attention_scores=True)
    np.testing.assert_allclose(out, _numpy(eager_out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, _numpy(eager_scores), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("attention_axes, shape", [((1, 2), (B, 3, 4, WIDTH)), ((2,), (B, 3, 4, WIDTH)),
                                                   ((-2,), (B, 3, 4, WIDTH)), (None, (B, 2, 3, 2, WIDTH))],
                         ids=["axes12", "axis2", "axis-2", "rank5"])
def test_attention_axes_and_inputs_of_rank_above_3(attention_axes, shape):
    x = unit_normal(*shape)
    theirs = _keras_layer(x, attention_axes=attention_axes)
    ours = _twin(theirs, x.shape)
    out, scores = ours(x, x, return_attention_scores=True)
    plain_out, plain_scores = theirs(x, x, return_attention_scores=True)
    np.testing.assert_allclose(_numpy(scores), _numpy(plain_scores), rtol=1e-5, atol=1e-6)
    key_length = math.prod(shape[axis] for axis in theirs._attention_axes)  # over all the attention axes
    np.testing.assert_allclose(_numpy(out), _scale(key_length) * _numpy(plain_out), rtol=1e-4, atol=1e-5)
    assert _numpy(ours(x, x)).shape == _numpy(plain_out).shape
    # Unit scale at initialisation, over several attention axes too.
    fresh = L.MultiHeadAttention(HEADS, KEY_DIM, attention_axes=attention_axes)
    assert 0.6 < rms(_numpy(fresh(x, x))) < 1.6


def test_use_gate_applies_the_unit_scaled_sigmoid():
    x = unit_normal(B, T, WIDTH)
    theirs = _keras_layer(x, use_gate=True)
    ours = _twin(theirs, x.shape)
    np.testing.assert_allclose(_numpy(ours(x, x)), _scale(T, gate=True) * _numpy(theirs(x, x)), rtol=1e-4, atol=1e-5)
    # At initialisation the gated output keeps unit scale (a plain sigmoid gate would halve it).
    keras.utils.set_random_seed(1)
    wide = L.MultiHeadAttention(4, 16, use_gate=True)
    y = unit_normal(8, 32, 64)
    assert 0.7 < rms(_numpy(wide(y, y, use_causal_mask=True))) < 1.4


@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_sliding_window(use_causal_mask):
    x = unit_normal(B, T, WIDTH)
    theirs = _keras_layer(x, sliding_window=2)
    ours = _twin(theirs, x.shape)
    out, scores = ours(x, x, use_causal_mask=use_causal_mask, return_attention_scores=True)
    plain_out, plain_scores = theirs(x, x, use_causal_mask=use_causal_mask, return_attention_scores=True)
    np.testing.assert_allclose(_numpy(scores), _numpy(plain_scores), rtol=1e-5, atol=1e-6)
    far = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]) >= 2
    assert np.all(_numpy(scores)[..., far] < 1e-6)
    np.testing.assert_allclose(_numpy(out), _scale(T, causal=use_causal_mask) * _numpy(plain_out),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_numpy(ours(x, x, use_causal_mask=use_causal_mask)), _numpy(out), rtol=1e-5,
                               atol=1e-5)


def _runs(fn):
    try:
        return fn(), None
    except Exception as error:  # the backend's own refusal, which Keras's layer meets too
        return None, error


@pytest.mark.parametrize("use_causal_mask", [False, True])
def test_flash_attention_where_the_backend_has_it(use_causal_mask):
    x = unit_normal(B, T, 64).astype("float16")
    keras.utils.set_random_seed(0)
    default = L.MultiHeadAttention(4, 16, dtype="float16")
    expected = _numpy(default(x, x, use_causal_mask=use_causal_mask)).astype("float32")
    for flash in (False, True):
        layer = L.MultiHeadAttention(4, 16, flash_attention=flash, dtype="float16")
        layer.build(x.shape, x.shape)
        layer.set_weights(default.get_weights())
        plain = keras.layers.MultiHeadAttention(4, 16, flash_attention=flash, dtype="float16")
        plain.build(x.shape, x.shape)
        ours, ours_error = _runs(lambda: layer(x, x, use_causal_mask=use_causal_mask))
        theirs, theirs_error = _runs(lambda: plain(x, x, use_causal_mask=use_causal_mask))
        if theirs_error is not None:
            # Where Keras's own layer cannot run flash attention, ours refuses too.
            assert ours_error is not None, f"Keras refused flash_attention={flash}: {theirs_error}"
            continue
        assert ours_error is None, ours_error
        np.testing.assert_allclose(_numpy(ours).astype("float32"), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="flash attention"):
        L.MultiHeadAttention(4, 16, flash_attention=True)(x, x, return_attention_scores=True)


def test_dropout_keeps_unit_scale_in_training_and_is_off_in_inference():
    keras.utils.set_random_seed(0)
    x = unit_normal(4, 32, 64)
    layer = L.MultiHeadAttention(4, 16, dropout=0.5, seed=3)
    inference = _numpy(layer(x, x, use_causal_mask=True))
    np.testing.assert_allclose(_numpy(layer(x, x, use_causal_mask=True, training=False)), inference)
    trained = _numpy(layer(x, x, use_causal_mask=True, training=True))
    assert not np.allclose(trained, inference)
    assert 0.6 < rms(trained) / rms(inference) < 1.6
    # The rule's sqrt(1 - p): dropped attention keeps the output's scale (unlike plain inverted dropout).
    _, scores = layer(x, x, return_attention_scores=True, training=True)
    np.testing.assert_allclose(_numpy(scores).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("output_shape", [5, (5,), (2, 3)])
def test_output_shape_as_keras(output_shape):
    x = unit_normal(B, T, WIDTH)
    ours = L.MultiHeadAttention(HEADS, KEY_DIM, output_shape=output_shape)
    theirs = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, output_shape=output_shape)
    assert _numpy(ours(x, x)).shape == _numpy(theirs(x, x)).shape
    assert ours.compute_output_shape(x.shape, x.shape) == theirs.compute_output_shape(x.shape, x.shape)


def test_kerass_config_is_accepted_and_ours_round_trips():
    keras_layer = keras.layers.MultiHeadAttention(
        HEADS, KEY_DIM, value_dim=4, dropout=0.1, output_shape=(3, 2), attention_axes=(1,), use_gate=True,
        sliding_window=3, seed=7, name="attention",
    )
    ours = L.MultiHeadAttention.from_config(keras_layer.get_config())
    assert (ours.num_heads, ours.key_dim, ours.value_dim, ours._use_gate, ours._sliding_window, ours.seed) == (
        HEADS, KEY_DIM, 4, True, 3, 7)
    layer = L.MultiHeadAttention(HEADS, KEY_DIM, mult=2.0, fp8=False, weight_multipliers={"value/kernel": 0.5},
                                 lr_multipliers={"attention_output/bias": 0.25})
    config = layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is L.MultiHeadAttention and restored.get_config() == config
    x = unit_normal(B, T, WIDTH)
    layer(x, x)
    assert layer.get_config() == {**config, "attention_axes": (1,)}  # Keras records the axes it resolved


def test_weight_and_lr_multipliers_by_projection_path(tmp_path):
    x = unit_normal(B, T, WIDTH)
    layer = L.MultiHeadAttention(HEADS, KEY_DIM, weight_multipliers={"query/kernel": 2.0},
                                 lr_multipliers={"value/bias": 0.5}, name="attention")
    assert layer.weight_multiplier("query/kernel") == 2.0 and layer.lr_multiplier("value/bias") == 0.5
    before = _numpy(layer(x, x))
    assert layer.query_dense.weight_multipliers == {"kernel": 2.0}
    assert layer.value_dense.lr_multipliers == {"bias": 0.5}
    assert layer.weight_multipliers == {"query/kernel": 2.0} and layer.lr_multipliers == {"value/bias": 0.5}
    layer.set_weight_multiplier("attention_output/kernel", 3.0)
    layer.set_lr_multiplier("value/bias", None)
    assert layer.output_dense.weight_multiplier("kernel") == 3.0 and layer.lr_multipliers == {}
    np.testing.assert_allclose(_numpy(layer(x, x)), 3.0 * before, rtol=1e-5, atol=1e-5)
    # Saved with the weights, and in the config.
    inputs = keras.Input((T, WIDTH))
    model = keras.Model(inputs, layer(inputs, inputs))
    model.save_weights(tmp_path / "attention.weights.h5")
    twin = L.MultiHeadAttention(HEADS, KEY_DIM, name="attention")
    twin_model = keras.Model(inputs, twin(inputs, inputs))
    twin_model.load_weights(tmp_path / "attention.weights.h5")
    assert twin.weight_multipliers == {"query/kernel": 2.0, "attention_output/kernel": 3.0}
    np.testing.assert_allclose(_numpy(twin(x, x)), _numpy(layer(x, x)), rtol=1e-6)
    with pytest.raises(ValueError, match="'query_kernel'"):
        L.MultiHeadAttention(HEADS, KEY_DIM, weight_multipliers={"query_kernel": 2.0})
    with pytest.raises(ValueError, match="gate/kernel"):
        L.MultiHeadAttention(HEADS, KEY_DIM, weight_multipliers={"gate/kernel": 2.0})(x, x)
    with pytest.raises(ValueError, match="no weight called 'key/gamma'"):
        layer.set_weight_multiplier("key/gamma", 2.0)


def test_lora_on_the_projections_trains_saves_and_reloads(tmp_path):
    keras.utils.set_random_seed(0)
    query, key, value = unit_normal(1, 2, 2), unit_normal(1, 2, 2, seed=1), unit_normal(1, 2, 2, seed=2)
    layer = L.MultiHeadAttention(num_heads=3, key_dim=8, use_bias=False, use_gate=True)
    layer.build(query.shape, value.shape, key.shape)
    for projection in (layer.query_dense, layer.key_dense, layer.value_dense):
        projection.enable_lora(2)
    # As Keras's own test counts them: A and B of three projections, the gate and output kernels.
    assert len(layer.trainable_variables) == 8 and len(layer.non_trainable_variables) == 3
    assert weights.role(layer.query_dense.lora_kernel_a) == WeightRole("hidden", 2, 2)
    assert weights.role(layer.value_dense.lora_kernel_b) == WeightRole("hidden", 2, 8)
    inputs = [keras.Input((2, 2), name=name) for name in ("query", "key", "value")]
    model = keras.Model(inputs, layer(inputs[0], inputs[2], inputs[1]))
    model.compile(optimizer="sgd", loss="mse")
    model.fit([query, key, value], unit_normal(1, 2, 2, seed=3), epochs=2, verbose=0)
    expected = model.predict([query, key, value], verbose=0)
    # Keras's config rebuilds the projections without LoRA: the merged kernels load into them.
    model.save(tmp_path / "lora.keras")
    reloaded = keras.saving.load_model(tmp_path / "lora.keras")
    np.testing.assert_allclose(reloaded.predict([query, key, value], verbose=0), expected, rtol=1e-5, atol=1e-6)
    model.save_weights(tmp_path / "lora.weights.h5")
    fresh = L.MultiHeadAttention(num_heads=3, key_dim=8, use_bias=False, use_gate=True)
    fresh_model = keras.Model(inputs, fresh(inputs[0], inputs[2], inputs[1]))
    fresh_model.load_weights(tmp_path / "lora.weights.h5")
    np.testing.assert_allclose(fresh_model.predict([query, key, value], verbose=0), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4", "float8"])
def test_quantizing_the_projections_is_as_close_as_kerass_own(mode):
    x = unit_normal(B, T, WIDTH)
    theirs = _keras_layer(x)
    ours = _twin(theirs, x.shape)
    models = []
    for layer in (ours, theirs):
        inputs = keras.Input((T, WIDTH))
        models.append(keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True)))
    exact = [model.predict(x, verbose=0) for model in models]
    np.testing.assert_allclose(exact[0], _scale(T, causal=True) * exact[1], rtol=1e-4, atol=1e-5)
    for model in models:
        model.quantize(mode)
    assert all(p.quantization_mode == mode for p in (ours.query_dense, ours.output_dense))
    errors = [_relative_error(model.predict(x, verbose=0), value) for model, value in zip(models, exact)]
    assert errors[0] <= 1.1 * errors[1] + 1e-6, errors


def test_quantized_dtype_policy_on_attention():
    """Keras's way: a policy map that quantizes the projections, by path."""
    x = unit_normal(B, T, WIDTH)
    keras.utils.set_random_seed(0)
    layer = L.MultiHeadAttention(HEADS, KEY_DIM, name="mha")
    reference = _numpy(layer(x, x, use_causal_mask=True))
    inputs = keras.Input((T, WIDTH))
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    model.quantize("int8")
    quantized = model.predict(x, verbose=0)
    policy_map = keras.dtype_policies.DTypePolicyMap()
    for name in ("query", "key", "value", "attention_output"):
        policy_map[f"mha/{name}"] = keras.dtype_policies.QuantizedDTypePolicy("int8", "float32")
    rebuilt = L.MultiHeadAttention(HEADS, KEY_DIM, dtype=policy_map, name="mha")
    rebuilt.build(x.shape, x.shape)
    assert rebuilt.query_dense.quantization_mode == rebuilt.output_dense.quantization_mode == "int8"
    rebuilt.set_weights(layer.get_weights())
    np.testing.assert_allclose(_numpy(rebuilt(x, x, use_causal_mask=True)), quantized, rtol=1e-5, atol=1e-5)
    assert _relative_error(quantized, reference) < 0.05


def test_attention_is_unit_scaled_with_any_mask():
    keras.utils.set_random_seed(0)
    layer = L.MultiHeadAttention(4, 16)
    x = unit_normal(8, 32, 64)
    causal = np.tril(np.ones((32, 32), bool))
    masks = ({}, {"use_causal_mask": True}, {"attention_mask": causal}, {"attention_mask": _valid_mask((8, 32, 32))})
    for kwargs in masks:
        out = _numpy(layer(x, x, **kwargs))

        def fn(t, kwargs=kwargs):
            return layer(t, t, **kwargs)

        _, (grad,) = vjp(fn, [x], unit_normal(*out.shape, seed=2))
        assert 0.6 < rms(out) < 1.6, kwargs.keys()
        assert 0.4 < rms(grad) < 2.5, kwargs.keys()


# --- conversion of Keras's attention ------------------------------------------------------------


@pytest.mark.parametrize("kwargs, shape, call", [
    ({"use_gate": True}, (T, WIDTH), {"use_causal_mask": True}),
    ({"attention_axes": (1, 2)}, (3, 4, WIDTH), {}),
    ({"sliding_window": 3, "output_shape": (2, 4)}, (T, WIDTH), {"use_causal_mask": True}),
], ids=["gate", "axes", "window"])
def test_equivalent_conversion_of_kerass_attention(kwargs, shape, call):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    attended = keras.layers.MultiHeadAttention(HEADS, KEY_DIM, **kwargs)(inputs, inputs, **call)
    model = keras.Model(inputs, attended)
    for variable in model.trainable_variables:  # biases off zero, so that they are carried too
        variable.assign(_numpy(variable) + 0.05)
    twin = unit_scale(model)
    x = unit_normal(B, *shape)
    converted = [layer for layer in twin.layers if isinstance(layer, L.MultiHeadAttention)]
    assert len(converted) == 1
    np.testing.assert_allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
