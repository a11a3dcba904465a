"""Unit-scaled ops: the scales they reach, the rules they state, the errors they raise."""

import math

import keras
import numpy as np
import pytest
from helpers import rms
from helpers import unit_normal
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale import rules
from keras_unitscale.autodiff import vjp
from keras_unitscale.ops import linear
from keras_unitscale.ops.linear import einsum_dense

ANALYTIC = 0.10  # rules derived in closed form
CALIBRATED = 0.25  # rules fitted to a limit or to measurements


def _within(value, tolerance, target=1.0):
    return abs(value / target - 1.0) <= tolerance


def _assert_unit(name, value, tolerance, target=1.0):
    assert _within(value, tolerance, target), (
        f"{name}: RMS {value:.3f}, expected {target:.3f} ± {tolerance:.0%}"
    )


# --- scale at unit-normal inputs, two sizes each ------------------------------
# Each case runs the op with its own (unconstrained) rule, a unit-normal
# upstream gradient, and checks the output and every gradient.


@pytest.mark.parametrize("m, k, n", [(64, 256, 128), (256, 64, 512)])
def test_matmul_scale(m, k, n):
    a, b = unit_normal(m, k), unit_normal(k, n, seed=1)
    out, grads = vjp(lambda a, b: U.matmul(a, b, constraint=None), [a, b], unit_normal(m, n, seed=2))
    for name, value in [("out", out), ("grad a", grads[0]), ("grad b", grads[1])]:
        _assert_unit(name, rms(value), ANALYTIC)


@pytest.mark.parametrize("batch, fan_in, fan_out", [(128, 64, 512), (32, 512, 64)])
def test_dense_scale(batch, fan_in, fan_out):
    x, w, bias = unit_normal(batch, fan_in), unit_normal(fan_in, fan_out, seed=1), np.zeros(fan_out, "float32")
    out, grads = vjp(
        lambda x, w, b: U.dense(x, w, b, constraint=None), [x, w, bias], unit_normal(batch, fan_out, seed=2)
    )
    for name, value in zip(["out", "grad x", "grad kernel", "grad bias"], [out, *grads]):
        _assert_unit(name, rms(value), ANALYTIC)


@pytest.mark.parametrize("batch, fan_in, fan_out", [(128, 64, 10), (32, 512, 256)])
def test_dense_readout_scale(batch, fan_in, fan_out):
    """The readout's output is `fan_in^-1/2` at initialisation, by design (u-μP)."""
    x, w = unit_normal(batch, fan_in), unit_normal(fan_in, fan_out, seed=1)
    out, grads = vjp(U.dense_readout, [x, w], unit_normal(batch, fan_out, seed=2))
    _assert_unit("out", rms(out), ANALYTIC, target=fan_in**-0.5)
    for name, value in zip(["grad x", "grad kernel"], grads):
        _assert_unit(name, rms(value), ANALYTIC)


@pytest.mark.parametrize("shape_a, shape_b", [((256, 64), (256, 64)), ((128, 512), (512,)), ((64, 1, 32), (1, 48, 32))])
def test_add_scale(shape_a, shape_b):
    a, b = unit_normal(*shape_a), unit_normal(*shape_b, seed=1)
    out_shape = np.broadcast_shapes(shape_a, shape_b)
    out, grads = vjp(lambda a, b: U.add(a, b, constraint=None), [a, b], unit_normal(*out_shape, seed=2))
    for name, value in [("out", out), ("grad a", grads[0]), ("grad b", grads[1])]:
        _assert_unit(name, rms(value), ANALYTIC)


@pytest.mark.parametrize("rate", [0.1, 0.5])
@pytest.mark.parametrize("size", [256, 1024])
def test_dropout_scale(rate, size):
    x = unit_normal(64, size)
    out, (grad,) = vjp(lambda x: U.dropout(x, rate, seed=3), [x], unit_normal(64, size, seed=2))
    _assert_unit("out", rms(out), ANALYTIC)
    _assert_unit("grad", rms(grad), ANALYTIC)
    assert _within(np.mean(out == 0), 0.1, target=rate)


ACTIVATIONS = [
    ("relu", lambda x: U.relu(x, constraint=None), ANALYTIC),
    ("tanh", lambda x: U.tanh(x, constraint=None), CALIBRATED),
    ("sigmoid", lambda x: U.sigmoid(x, constraint=None), CALIBRATED),
    ("gelu", lambda x: U.gelu(x, constraint=None), CALIBRATED),
    ("gelu mult 4", lambda x: U.gelu(x, mult=4.0, constraint=None), CALIBRATED),
    ("silu", lambda x: U.silu(x, constraint=None), CALIBRATED),
    ("silu mult 0.5", lambda x: U.silu(x, mult=0.5, constraint=None), CALIBRATED),
    ("softmax", lambda x: U.softmax(x, constraint=None), CALIBRATED),
    ("softmax mult 4", lambda x: U.softmax(x, mult=4.0, constraint=None), CALIBRATED),
]


@pytest.mark.parametrize("name, fn, tolerance", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
@pytest.mark.parametrize("width", [64, 512])
def test_activation_scale(name, fn, tolerance, width):
    x = unit_normal(256, width)
    out, (grad,) = vjp(fn, [x], unit_normal(256, width, seed=2))
    _assert_unit("out", rms(out), tolerance)
    _assert_unit("grad", rms(grad), tolerance)


@pytest.mark.parametrize("width", [64, 512])
def test_silu_glu_scale(width):
    x, gate = unit_normal(256, width), unit_normal(256, width, seed=1)
    out, grads = vjp(U.silu_glu, [x, gate], unit_normal(256, width, seed=2))
    for name, value in [("out", out), ("grad x", grads[0]), ("grad gate", grads[1])]:
        _assert_unit(name, rms(value), CALIBRATED)


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_glu_scale_and_value(approximate):
    """GeGLU, `x · gelu(gate)`: the unit-scaled GELU of the gate times `x`, at unit scale in both passes."""
    x, gate = unit_normal(256, 512), unit_normal(256, 512, seed=1)
    out, grads = vjp(lambda a, b: U.gelu_glu(a, b, approximate=approximate), [x, gate], unit_normal(256, 512, seed=2))
    for name, value in [("out", out), ("grad x", grads[0]), ("grad gate", grads[1])]:
        _assert_unit(name, rms(value), CALIBRATED)
    plain = x * ops.convert_to_numpy(ops.gelu(gate, approximate=approximate))
    np.testing.assert_allclose(out, plain * rules.activations.gelu().output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab, tokens", [(64, 4096), (1000, 512)])
def test_embedding_scale(vocab, tokens):
    ids = np.random.default_rng(0).integers(0, vocab, size=(tokens,))
    table = unit_normal(vocab, 32, seed=1)
    out, (grad,) = vjp(lambda t: U.embedding(ids, t), [table], unit_normal(tokens, 32, seed=2))
    _assert_unit("out", rms(out), ANALYTIC)
    _assert_unit("grad table", rms(grad), ANALYTIC)


@pytest.mark.parametrize("batch, width", [(64, 128), (512, 32)])
def test_layer_norm_scale(batch, width):
    x = unit_normal(batch, width) * 5.0 + 3.0
    gamma, beta = np.ones(width, "float32"), np.zeros(width, "float32")
    out, grads = vjp(U.layer_norm, [x, gamma, beta], unit_normal(batch, width, seed=2))
    _assert_unit("out", rms(out), ANALYTIC)
    # The input gradient is divided by the input's scale (5), as in any norm.
    _assert_unit("grad x", rms(grads[0]) * 5.0, ANALYTIC)
    _assert_unit("grad gamma", rms(grads[1]), ANALYTIC)
    _assert_unit("grad beta", rms(grads[2]), ANALYTIC)


@pytest.mark.parametrize("batch, width", [(64, 128), (512, 32)])
def test_rms_norm_scale(batch, width):
    x = unit_normal(batch, width) * 0.01
    gamma = np.ones(width, "float32")
    out, grads = vjp(U.rms_norm, [x, gamma], unit_normal(batch, width, seed=2))
    _assert_unit("out", rms(out), ANALYTIC)
    _assert_unit("grad x", rms(grads[0]) * 0.01, ANALYTIC)
    _assert_unit("grad gamma", rms(grads[1]), ANALYTIC)


@pytest.mark.parametrize("seq, head_dim", [(64, 32), (256, 64)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mult", [1.0, 8.0])
def test_attention_scale(seq, head_dim, is_causal, mult):
    """Output and value gradient at unit scale; query/key gradients as the softmax allows.

    At initialisation the logits are small, the softmax nearly flat, and the
    true gradient of the queries and keys is about `mult/sqrt(head_dim)` of
    the value's (1/8 for a head of 64 at mult 1). Raising it with a separate
    backward scale would make the gradient that q, k and v pass to their
    shared input no longer the gradient of the function computed, so the
    rule (the reference's) keeps one scale for all three.
    """
    q, k, v = (unit_normal(4, seq, 2, head_dim, seed=s) for s in range(3))
    out, grads = vjp(
        lambda q, k, v: U.dot_product_attention(q, k, v, is_causal=is_causal, mult=mult),
        [q, k, v],
        unit_normal(4, seq, 2, head_dim, seed=3),
    )
    _assert_unit("out", rms(out), CALIBRATED)
    _assert_unit("grad value", rms(grads[2]), CALIBRATED)
    expected_qk = min(mult / head_dim**0.5, 1.0)
    _assert_unit("grad query", rms(grads[0]), 0.35, target=expected_qk)
    _assert_unit("grad key", rms(grads[1]), 0.35, target=expected_qk)


@pytest.mark.parametrize("batch, vocab", [(256, 64), (64, 1000)])
def test_cross_entropy_gradient_scale(batch, vocab):
    logits = unit_normal(batch, vocab)
    labels = np.random.default_rng(1).integers(0, vocab, size=(batch,))
    loss, (grad,) = vjp(lambda z: U.cross_entropy(z, labels), [logits], np.float32(1.0))
    _assert_unit("grad logits", rms(grad), ANALYTIC)


@pytest.mark.parametrize("shape", [(256, 16), (32, 8, 64)])
def test_mse_gradient_scale(shape):
    pred, true = unit_normal(*shape), unit_normal(*shape, seed=1)
    _, grads = vjp(U.mse, [pred, true], np.float32(1.0))
    _assert_unit("grad pred", rms(grads[0]), ANALYTIC)
    _assert_unit("grad true", rms(grads[1]), ANALYTIC)


@pytest.mark.parametrize("tau", [0.2, 1.0, 3.0])
def test_residual_apply_scale(tau):
    x = unit_normal(256, 128)
    w = unit_normal(128, 128, seed=1)
    out, (grad,) = vjp(
        lambda x: U.residual_apply(lambda r: U.dense(r, w), x, tau=tau), [x], unit_normal(256, 128, seed=2)
    )
    _assert_unit("out", rms(out), ANALYTIC)
    _assert_unit("grad x", rms(grad), ANALYTIC)


# --- each gradient is the plain derivative times the stated backward scale ----
# The plain computations use keras.ops directly; the expected scales restate
# each op's rule independently of functional.py.

SQRT2 = math.sqrt(2.0)


def _log_interp(alpha, lower, upper):
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


def _gelu_scales(mult):
    alpha = 1 / (1 + 0.25 / mult**2)
    return _log_interp(alpha, 2.0, math.sqrt(2 / (1 - 1 / math.pi))), _log_interp(alpha, 2.0, SQRT2)


def _expected_rules():
    """(name, scaled op, plain op, input shapes, forward scale, backward scale per input)."""
    gelu_out, gelu_grad = _gelu_scales(1.0)
    gelu4_out, gelu4_grad = _gelu_scales(4.0)
    silu_out = _gelu_scales(0.5)[0]
    silu_grad = _log_interp(1 / (1 + 1 / 0.5**2), 2.0, SQRT2)
    n = 48
    soft_alpha = 1 / (1 + 4 / 2.0**2)
    soft_out = _log_interp(soft_alpha, n, n**0.5)
    soft_grad = _log_interp(soft_alpha, n / 2.0, (n / 2.0) ** 0.5)
    return [
        ("matmul", lambda a, b: U.matmul(a, b, constraint=None), ops.matmul, [(6, 8), (8, 5)], 8**-0.5, [5**-0.5, 6**-0.5]),
        ("matmul constrained", U.matmul, ops.matmul, [(6, 8), (8, 5)], 8**-0.5, [8**-0.5, 8**-0.5]),
        ("dense", lambda x, w, b: U.dense(x, w, b, constraint=None), lambda x, w, b: ops.matmul(x, w) + b,
         [(3, 4, 8), (8, 5), (5,)], 8**-0.5, [5**-0.5, 12**-0.5, 12**-0.5]),
        ("dense constrained", U.dense, lambda x, w, b: ops.matmul(x, w) + b,
         [(3, 4, 8), (8, 5), (5,)], 8**-0.5, [8**-0.5, 12**-0.5, 12**-0.5]),
        ("dense gmean", lambda x, w: U.dense(x, w, constraint="gmean"), ops.matmul,
         [(12, 8), (8, 2)], 4**-0.5, [4**-0.5, 12**-0.5]),
        # x (2, 6, 4), kernel (3, 4, 5), "same": fan-in 3·4, fan-out 3·5, 2·6 positions.
        ("conv", lambda x, w, b: U.conv(x, w, b, padding="same", constraint=None),
         lambda x, w, b: ops.conv(x, w, padding="same") + b, [(2, 6, 4), (3, 4, 5), (5,)], 12**-0.5,
         [15**-0.5, 12**-0.5, 12**-0.5]),
        ("conv constrained", lambda x, w, b: U.conv(x, w, b, padding="same"),
         lambda x, w, b: ops.conv(x, w, padding="same") + b, [(2, 6, 4), (3, 4, 5), (5,)], 12**-0.5,
         [12**-0.5, 12**-0.5, 12**-0.5]),
        # A weight multiplier m: the op computes with m·w, w's gradient stays the rule's (the plain one's / m).
        ("dense with weight multipliers", lambda x, w, b: U.dense(x, w, b, weight_multipliers=(0.5, 3.0)),
         lambda x, w, b: ops.matmul(x, 0.5 * w) + 3.0 * b, [(3, 4, 8), (8, 5), (5,)], 8**-0.5,
         [8**-0.5, 12**-0.5 / 0.5, 12**-0.5 / 3.0]),
        ("conv with weight multipliers",
         lambda x, w, b: U.conv(x, w, b, padding="same", weight_multipliers=(0.5, 3.0)),
         lambda x, w, b: ops.conv(x, 0.5 * w, padding="same") + 3.0 * b, [(2, 6, 4), (3, 4, 5), (5,)], 12**-0.5,
         [12**-0.5, 12**-0.5 / 0.5, 12**-0.5 / 3.0]),
        # relu after the op: its scale √2 joins the op's (`ops.activations.relu_factor`), in both passes.
        ("dense with relu", lambda x, w, b: U.dense(x, w, b, activation="relu"),
         lambda x, w, b: ops.relu(ops.matmul(x, w) + b), [(3, 4, 8), (8, 5), (5,)], SQRT2 * 8**-0.5,
         [SQRT2 * 8**-0.5, SQRT2 * 12**-0.5, SQRT2 * 12**-0.5]),
        ("conv with relu", lambda x, w, b: U.conv(x, w, b, padding="same", activation="relu"),
         lambda x, w, b: ops.relu(ops.conv(x, w, padding="same") + b), [(2, 6, 4), (3, 4, 5), (5,)],
         SQRT2 * 12**-0.5, [SQRT2 * 12**-0.5, SQRT2 * 12**-0.5, SQRT2 * 12**-0.5]),
        ("einsum dense", lambda x, w, b: einsum_dense("abc,cde->abde", x, w, b, constraint=None),
         lambda x, w, b: ops.einsum("abc,cde->abde", x, w) + b, [(2, 3, 8), (8, 2, 5), (2, 5)], 8**-0.5,
         [10**-0.5, 6**-0.5, 6**-0.5]),
        ("dense_readout", U.dense_readout, ops.matmul, [(12, 8), (8, 5)], 1 / 8, [5**-0.5, 12**-0.5]),
        ("add broadcast", lambda a, b: U.add(a, b, constraint=None), ops.add, [(6, 5), (5,)], 2**-0.5, [1.0, 6**-0.5]),
        ("add constrained", U.add, ops.add, [(6, 5), (5,)], 2**-0.5, [2**-0.5, 2**-0.5]),
        ("add one-element", lambda a, b: U.add(a, b, constraint=None), ops.add, [(6, 5), (1,)], 1.0, [1.0, 30**-0.5]),
        ("relu", U.relu, ops.relu, [(7, 9)], SQRT2, [SQRT2]),
        ("gelu", lambda x: U.gelu(x, constraint=None), lambda x: ops.gelu(x, approximate=False), [(7, 9)], gelu_out, [gelu_grad]),
        ("gelu constrained", U.gelu, lambda x: ops.gelu(x, approximate=False), [(7, 9)], gelu_out, [gelu_out]),
        ("gelu mult 4", lambda x: U.gelu(x, mult=4.0, constraint=None),
         lambda x: ops.gelu(4.0 * x, approximate=False) / 4.0, [(7, 9)], gelu4_out, [gelu4_grad]),
        ("silu mult 0.5", lambda x: U.silu(x, mult=0.5, constraint=None),
         lambda x: ops.multiply(x, ops.sigmoid(0.5 * x)), [(7, 9)], silu_out, [silu_grad]),
        ("tanh", lambda x: U.tanh(x, constraint=None), ops.tanh, [(7, 9)], 1 / 0.6279287, [1 / 0.6814711]),
        ("sigmoid", lambda x: U.sigmoid(x, constraint=None), ops.sigmoid, [(7, 9)], 1 / 0.5416448, [1 / 0.2117457]),
        ("sigmoid constrained", U.sigmoid, ops.sigmoid, [(7, 9)], 1 / 0.5416448, [1 / 0.5416448]),
        ("softmax mult 2", lambda x: U.softmax(x, mult=2.0, constraint=None), lambda x: ops.softmax(2.0 * x),
         [(5, n)], soft_out, [soft_grad]),
        ("mse", U.mse, lambda p, t: ops.mean(ops.square(p - t)), [(4, 6), (4, 6)], 1.0, [24 * 8**-0.5, 24 * 8**-0.5]),
        ("residual_split (residual)", lambda x: U.residual_split(x, 0.5)[0], lambda x: x, [(3, 4)], 1.0, [0.5 / 1.25**0.5]),
        ("residual_split (skip)", lambda x: U.residual_split(x, 0.5)[1], lambda x: x, [(3, 4)], 1.0, [1 / 1.25**0.5]),
        ("residual_add (residual)", lambda r: U.residual_add(r, ops.zeros((3, 4)), 0.5), lambda r: r, [(3, 4)],
         0.5 / 1.25**0.5, [1.0]),
    ]


RULES = _expected_rules()


@pytest.mark.parametrize("name, scaled_fn, plain_fn, shapes, fwd, bwds", RULES, ids=[r[0] for r in RULES])
def test_gradient_is_plain_derivative_times_backward_scale(name, scaled_fn, plain_fn, shapes, fwd, bwds):
    inputs = [unit_normal(*shape, seed=i) for i, shape in enumerate(shapes)]
    out_shape = ops.shape(plain_fn(*inputs))
    upstream = unit_normal(*out_shape, seed=9) if len(out_shape) else np.float32(1.0)
    out, grads = vjp(scaled_fn, inputs, upstream)
    plain_out, plain_grads = vjp(plain_fn, inputs, upstream)
    np.testing.assert_allclose(out, plain_out * fwd, rtol=1e-5, atol=1e-6)
    for grad, plain_grad, bwd in zip(grads, plain_grads, bwds):
        np.testing.assert_allclose(grad, plain_grad * bwd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab, multiplier", [(5, 1.0), (50, 3.0)])
def test_embedding_gradient_rule(vocab, multiplier):
    ids = np.array([[0, 2, 2], [1, 2, 0]])
    table = unit_normal(vocab, 3)
    upstream = unit_normal(2, 3, 3, seed=1)
    out, (grad,) = vjp(lambda t: linear.embedding(ids, t, multiplier), [table], upstream)
    plain_out, (plain,) = vjp(lambda t: ops.take(t, ids, axis=0), [table], upstream)
    np.testing.assert_allclose(out, plain_out * multiplier, rtol=1e-6)
    np.testing.assert_allclose(grad, plain * (vocab / 6) ** 0.5, rtol=1e-6)


def test_layer_norm_affine_gradient_rule():
    x, gamma, beta = unit_normal(4, 5, 6), unit_normal(6, seed=1), unit_normal(6, seed=2)
    upstream = unit_normal(4, 5, 6, seed=3)

    def plain(x, gamma, beta):
        mean, var = ops.moments(x, axes=[-1], keepdims=True)
        return (x - mean) / ops.sqrt(var + 1e-5) * gamma + beta

    out, grads = vjp(U.layer_norm, [x, gamma, beta], upstream)
    plain_out, plain_grads = vjp(plain, [x, gamma, beta], upstream)
    np.testing.assert_allclose(out, plain_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[0], plain_grads[0], rtol=1e-4, atol=1e-5)
    for grad, plain_grad in zip(grads[1:], plain_grads[1:]):
        np.testing.assert_allclose(grad, plain_grad / 20**0.5, rtol=1e-4, atol=1e-5)


def test_cross_entropy_rule_and_reported_value():
    logits = unit_normal(6, 10)
    labels = np.array([0, 3, 9, 2, 2, 5])
    loss, (grad,) = vjp(lambda z: U.cross_entropy(z, labels, mult=2.0), [logits], np.float32(1.0))
    log_probs = ops.convert_to_numpy(ops.log_softmax(2.0 * logits))
    # The reported loss is the usual mean.
    np.testing.assert_allclose(loss, -log_probs[np.arange(6), labels].mean(), rtol=1e-6)
    # The gradient: of the *summed* loss of (mult * logits) with respect to
    # the scaled logits, times V / sqrt(V - 1) (mult scales the forward only).
    one_hot = np.eye(10)[labels]
    expected = (np.exp(log_probs) - one_hot) * 10 / 9**0.5
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_targets_match_integer_labels():
    logits = unit_normal(3, 4, 7)
    labels = np.random.default_rng(1).integers(0, 7, size=(3, 4))
    one_hot = np.eye(7, dtype="float32")[labels]
    sparse_loss, (sparse_grad,) = vjp(lambda z: U.cross_entropy(z, labels), [logits], np.float32(1.0))
    dense_loss, (dense_grad,) = vjp(lambda z: U.cross_entropy(z, one_hot), [logits], np.float32(1.0))
    np.testing.assert_allclose(sparse_loss, dense_loss, rtol=1e-6)
    np.testing.assert_allclose(sparse_grad, dense_grad, rtol=1e-5, atol=1e-7)


def test_attention_matches_plain_attention_with_unit_scaled_logits():
    q, k, v = (unit_normal(2, 5, 3, 8, seed=s) for s in range(3))
    mask = np.tril(np.ones((5, 5), bool))
    # An explicit mask does not say it is causal, so the non-causal scale applies.
    for kwargs, flat_mean_square in (({"is_causal": True}, math.log(5) / 5), ({"mask": mask}, 1 / 5)):
        out = ops.convert_to_numpy(U.dot_product_attention(q, k, v, mult=2.0, **kwargs))
        plain = ops.convert_to_numpy(ops.dot_product_attention(q, k, v, scale=2.0 / 8, is_causal=True))
        scale = out.ravel() @ plain.ravel() / (plain.ravel() @ plain.ravel())
        np.testing.assert_allclose(out, plain * scale, rtol=1e-5, atol=1e-6)
        alpha = 1 / (1 + 4 * 8 / 2.0**2)
        np.testing.assert_allclose(scale, 1 / _log_interp(alpha, flat_mean_square**0.5, 1.0), rtol=1e-5)


def test_soft_capped_attention_caps_the_unit_scaled_logits_and_keeps_the_rule():
    q, k, v = (unit_normal(2, 6, 2, 8, seed=s) for s in range(3))
    mult, cap = 8.0, 0.5  # logits of RMS 8/sqrt(8), well past the cap
    out = ops.convert_to_numpy(U.dot_product_attention(q, k, v, is_causal=True, mult=mult, logit_soft_cap=cap))
    logits = np.einsum("btnh,bsnh->bnts", q, k) * mult / 8
    logits = np.where(np.tril(np.ones((6, 6), bool)), cap * np.tanh(logits / cap), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scale = rules.attention.attention(8, 6, mult, True).output
    np.testing.assert_allclose(out, np.einsum("bnts,bsnh->btnh", probs, v) * scale, rtol=1e-5, atol=1e-6)
    # A cap far above the logits changes nothing.
    uncapped = ops.convert_to_numpy(U.dot_product_attention(q, k, v, is_causal=True))
    far = ops.convert_to_numpy(U.dot_product_attention(q, k, v, is_causal=True, logit_soft_cap=1e4))
    np.testing.assert_allclose(far, uncapped, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="logit_soft_cap"):
        U.dot_product_attention(q, k, v, logit_soft_cap=0.0)


def test_attention_dropout_path_agrees_with_fused_path_in_expectation():
    q, k, v = (unit_normal(8, 16, 2, 8, seed=s) for s in range(3))
    fused = ops.convert_to_numpy(U.dot_product_attention(q, k, v, is_causal=True))
    no_drop = ops.convert_to_numpy(U.dot_product_attention(q, k, v, is_causal=True, dropout_rate=0.3, training=False))
    np.testing.assert_allclose(fused, no_drop, rtol=1e-6)
    dropped = ops.convert_to_numpy(U.dot_product_attention(q, k, v, is_causal=True, dropout_rate=0.3, seed=1))
    assert dropped.shape == fused.shape
    _assert_unit("dropout output", rms(dropped), CALIBRATED, target=rms(fused))


def test_transformer_residual_scaling_rule_values():
    rule = U.transformer_residual_scaling_rule()
    taus = [rule(i, 8) for i in range(8)]
    np.testing.assert_allclose(taus[:3], [0.5, 1 / 5**0.5, 1 / 6**0.5], rtol=1e-12)
    assert all(a > b for a, b in zip(taus, taus[1:]))
    # residual_attn_ratio shifts weight from MLP to attention branches.
    tilted = U.transformer_residual_scaling_rule(residual_attn_ratio=2.0)
    assert tilted(0, 8) > tilted(1, 8)


def test_dropout_is_identity_outside_training_and_at_rate_zero():
    x = unit_normal(3, 3)
    np.testing.assert_array_equal(ops.convert_to_numpy(U.dropout(x, 0.5, training=False)), x)
    np.testing.assert_array_equal(ops.convert_to_numpy(U.dropout(x, 0.0)), x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ops_keep_low_precision_dtypes(dtype):
    x = ops.cast(unit_normal(16, 32), dtype)
    w = unit_normal(32, 8, seed=1)  # a float32 weight, cast as Keras autocasting would
    q = ops.reshape(x, (2, 8, 2, 16))
    outputs = [
        U.dense(x, w),
        U.layer_norm(x, np.ones(32, "float32")),
        U.rms_norm(x),
        U.gelu(x),
        U.softmax(x),
        U.dot_product_attention(q, q, q, is_causal=True),
    ]
    assert [keras.backend.standardize_dtype(y.dtype) for y in outputs] == [dtype] * len(outputs)


# --- bad input ------------------------------------------------------------------

BAD_CALLS = [
    ("tau", lambda: U.residual_split(np.ones(2, "float32"), tau=-1.0), "tau=-1.0"),
    ("tau", lambda: U.residual_add(np.ones(2, "float32"), np.ones(2, "float32"), tau=float("nan")), "tau=nan"),
    ("rate", lambda: U.dropout(np.ones(2, "float32"), 1.0), "rate=1.0"),
    ("rate", lambda: U.dropout(np.ones(2, "float32"), -0.1), "rate=-0.1"),
    ("dropout_rate", lambda: U.dot_product_attention(*[np.ones((1, 2, 1, 4), "float32")] * 3, dropout_rate=1.5), "rate=1.5"),
    ("constraint", lambda: U.matmul(np.ones((2, 2), "float32"), np.ones((2, 2), "float32"), constraint="average"), "constraint='average'"),
    ("constraint", lambda: U.gelu(np.ones(2, "float32"), constraint=3), "constraint=3"),
    ("inner dims", lambda: U.matmul(np.ones((2, 3), "float32"), np.ones((4, 2), "float32")), "a.shape\\[-1\\]=3"),
    ("rank", lambda: U.matmul(np.ones((3,), "float32"), np.ones((3, 2), "float32")), "a.shape=\\(3,\\)"),
    ("dense dims", lambda: U.dense(np.ones((2, 3), "float32"), np.ones((4, 5), "float32")), "x.shape\\[-1\\]=3"),
    ("kernel rank", lambda: U.dense(np.ones((2, 3), "float32"), np.ones((3,), "float32")), "kernel.shape=\\(3,\\)"),
    ("bias", lambda: U.dense(np.ones((2, 3), "float32"), np.ones((3, 5), "float32"), np.ones(4, "float32")), "bias.shape\\[0\\]=4"),
    ("scale_power", lambda: U.dense(np.ones((2, 3), "float32"), np.ones((3, 5), "float32"), scale_power=(1, 1)), "scale_power=\\(1, 1\\)"),
    ("add shapes", lambda: U.add(np.ones((2, 3), "float32"), np.ones((4,), "float32")), "a.shape=\\(2, 3\\)"),
    ("mult", lambda: U.gelu(np.ones(2, "float32"), mult=0.0), "mult=0.0"),
    ("mult", lambda: U.softmax(np.ones(2, "float32"), mult=-1), "mult=-1"),
    ("epsilon", lambda: U.layer_norm(np.ones((2, 2), "float32"), epsilon=-1e-3), "epsilon=-0.001"),
    ("gamma", lambda: U.rms_norm(np.ones((2, 4), "float32"), np.ones(3, "float32")), "gamma.shape=\\(3,\\)"),
    ("axis", lambda: U.layer_norm(np.ones((2, 4), "float32"), axis=2), "axis=2"),
    ("ids dtype", lambda: U.embedding(np.ones(2, "float32"), np.ones((3, 2), "float32")), "ids.dtype=float32"),
    ("labels", lambda: U.cross_entropy(np.ones((2, 3), "float32"), np.array([0, 1, 2])), "labels.shape=\\(3,\\)"),
    ("vocab", lambda: U.cross_entropy(np.ones((2, 1), "float32"), np.array([0, 0])), "logits.shape=\\(2, 1\\)"),
    ("reduction", lambda: U.mse(np.ones(2, "float32"), np.ones(2, "float32"), reduction="max"), "reduction='max'"),
    ("mse shapes", lambda: U.mse(np.ones(2, "float32"), np.ones(3, "float32")), "y_true.shape=\\(3,\\)"),
    ("attention rank", lambda: U.dot_product_attention(np.ones((2, 4, 8), "float32"), np.ones((2, 4, 8), "float32"), np.ones((2, 4, 8), "float32")), "query.shape=\\(2, 4, 8\\)"),
    ("residual fn", lambda: U.residual_apply(None, np.ones(2, "float32")), "fn=None"),
    ("rule index", lambda: U.transformer_residual_scaling_rule()(8, 8), "index=8"),
    ("rule mult", lambda: U.transformer_residual_scaling_rule(residual_mult=0), "residual_mult=0"),
]


@pytest.mark.parametrize("what, call, received", BAD_CALLS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_CALLS)])
def test_bad_input_raises_value_error_naming_the_value(what, call, received):
    with pytest.raises(ValueError, match=received):
        call()


def test_attention_scores_path_agrees_with_fused_path():
    q, k, v = (unit_normal(2, 6, 2, 8, seed=s) for s in range(3))
    mask = np.random.default_rng(5).random((2, 1, 6, 6)) > 0.3
    mask[..., 0] = True
    fused = ops.convert_to_numpy(U.dot_product_attention(q, k, v, mask=mask, mult=2.0))
    out, probs = U.dot_product_attention(q, k, v, mask=mask, mult=2.0, return_attention_scores=True)
    np.testing.assert_allclose(ops.convert_to_numpy(out), fused, rtol=1e-5, atol=1e-6)
    probs = ops.convert_to_numpy(probs)
    assert probs.shape == (2, 2, 6, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[np.broadcast_to(~mask, probs.shape)] < 1e-6)


BIAS_OPS = {
    "dense": lambda x, kernel, bias: U.dense(x, kernel, bias),
    "einsum_dense": lambda x, kernel, bias: einsum_dense("btd,de->bte", x, kernel, bias),
    "conv": lambda x, kernel, bias: U.conv(x, kernel[None], bias),
}


@pytest.mark.parametrize("name", sorted(BIAS_OPS))
def test_a_bias_gradient_of_aligned_rows_stays_finite_in_float16(name):
    """4096 rows each pushing the bias by 20: their sum (81920) is past float16's range, the scaled one (1280)
    is not. The scale must apply to each row's term before the sum, as it does in float32."""
    x = unit_normal(1, 4096, 8)
    kernel, bias = unit_normal(8, 8, seed=1), np.zeros((8,), "float32")
    cotangent = np.full((1, 4096, 8), 20.0, "float32")

    def bias_gradient(dtype):
        def fn(bias):
            return BIAS_OPS[name](ops.cast(x, dtype), ops.cast(kernel, dtype), bias)

        return np.asarray(vjp(fn, [bias], ops.cast(cotangent, dtype))[1][0], "float64")

    exact, half = bias_gradient("float32"), bias_gradient("float16")
    np.testing.assert_allclose(exact, 20.0 * 4096**0.5)  # the batch^-1/2 rule on 4096 aligned rows
    np.testing.assert_allclose(half, exact, rtol=1e-2)
