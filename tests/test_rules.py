"""The scale rules in pure Python: numbers in, numbers out, no tensors.

Each rule is checked against what it claims to normalise, measured here with
numpy on unit-normal samples (or exactly, where the rule is exact), and
against the values the reference package and the papers give.
"""

import math

import numpy as np
import pytest

from keras_unitscale import rules
from keras_unitscale.rules import activations
from keras_unitscale.rules import attention
from keras_unitscale.rules import linear
from keras_unitscale.rules import losses
from keras_unitscale.rules import lstm
from keras_unitscale.rules import mup
from keras_unitscale.rules import norms
from keras_unitscale.rules import residual

RNG = np.random.default_rng(0)
Z = RNG.normal(size=400_000)


def _is_number(value):
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool))


def test_static_sizes_give_python_numbers():
    results = [
        *linear.dense(64, 16, batch=8), *linear.matmul(4, 8, 16), *linear.add((4, 8), (8,)),
        linear.embedding_grad(100, 20), *activations.gelu(), *activations.softmax(10), activations.dropout(0.1),
        norms.affine_grad(8, 64), *attention.attention(16, 32, is_causal=True), losses.cross_entropy_grad(10),
        *residual.branch_weights(0.5), *lstm.weights(8, 4, batch=2, steps=3).kernel,
    ]
    assert all(_is_number(value) for value in results), results


def test_a_memoised_rule_runs_once_per_static_arguments_and_every_time_for_a_tensor():
    import keras

    from keras_unitscale.sizes import static_memo

    calls = []

    def rule(size, shape, name):
        calls.append(size)
        return size * 2

    memoised = static_memo(rule)
    assert [memoised(3, (4, None), "a") for _ in range(3)] == [6, 6, 6]
    assert memoised(3.0, (4, None), "a") == 6 and memoised(5, (4, None), "a") == 10
    assert calls == [3, 5]  # 3.0 is the key 3 (equal numbers, the same result)
    # A size that is a tensor (traced) is never stored: each call computes with its own value.
    sizes = [keras.ops.convert_to_tensor(7.0), keras.ops.convert_to_tensor(9.0)]
    results = [float(keras.ops.convert_to_numpy(memoised(size, (4,), "a"))) for size in sizes + sizes]
    assert results == [14.0, 18.0, 14.0, 18.0] and len(calls) == 6


def test_dense_rule_normalises_output_and_gradients():
    fan_in, fan_out, batch = 256, 64, 128
    x, w, g = RNG.normal(size=(batch, fan_in)), RNG.normal(size=(fan_in, fan_out)), RNG.normal(size=(batch, fan_out))
    scales = linear.dense(fan_in, fan_out, batch, constraint=None)
    assert np.std(x @ w * scales.output) == pytest.approx(1.0, rel=0.05)
    assert np.std(g @ w.T * scales.grad_input) == pytest.approx(1.0, rel=0.05)
    assert np.std(x.T @ g * scales.grad_weight) == pytest.approx(1.0, rel=0.05)


def test_constraints_tie_the_dense_scales():
    assert linear.dense(256, 64).output == linear.dense(256, 64).grad_input == 256**-0.5
    tied = linear.dense(256, 64, constraint="gmean")
    assert tied.output == tied.grad_input == pytest.approx((256 * 64) ** -0.25)
    assert linear.dense(256, 64).grad_weight is None  # no batch given


def test_readout_is_one_over_fan_in_and_uncut():
    scales = linear.readout(64, 10, batch=16)
    assert (scales.output, scales.grad_input, scales.grad_weight) == (1 / 64, 10**-0.5, 0.25)
    assert linear.forward_scale(64, linear.READOUT_POWERS) == scales.output


def test_matmul_and_add():
    assert linear.matmul(4, 16, 64, constraint=None) == (0.25, 0.125, 0.5)
    assert linear.add((4, 8), (4, 8)) == (2**-0.5,) * 3
    broadcast = linear.add((4, 8), (1, 8), constraint=None)
    assert broadcast.grad_right == pytest.approx(0.5)  # each element of the (1, 8) operand is used 4 times
    assert linear.add_output((None, 8), (1,)) == 1.0
    assert linear.embedding_grad(100, 25) == 2.0


@pytest.mark.parametrize("name", activations.NAMES)
def test_every_activation_name_has_a_rule(name):
    scales = activations.by_name(name, size=16)
    assert scales.output > 0 and scales.grad > 0


@pytest.mark.parametrize(
    "fn, derivative",
    [
        (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
        (lambda z: 1 / (1 + np.exp(-z)), lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
        (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(float)),
    ],
)
def test_the_general_rule_gives_unit_rms(fn, derivative):
    scales = activations.quadrature(fn, derivative, constraint=None)
    assert np.sqrt(np.mean((fn(Z) * scales.output) ** 2)) == pytest.approx(1.0, rel=0.01)
    assert np.sqrt(np.mean((derivative(Z) * scales.grad) ** 2)) == pytest.approx(1.0, rel=0.01)


def test_relu_is_the_exact_general_rule():
    general = activations.quadrature(lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(float), None)
    assert tuple(activations.relu(constraint=None)) == pytest.approx(tuple(general), rel=1e-4)
    assert activations.relu() == (math.sqrt(2),) * 2


def test_the_general_rule_from_sampled_values_is_the_quadrature():
    grid = rules.common.gaussian_grid()
    tanh_values, tanh_derivatives = np.tanh(grid), 1 - np.tanh(grid) ** 2
    assert activations.general(tanh_values, tanh_derivatives, None) == activations.tanh(constraint=None)
    assert activations.general(tanh_values, tanh_derivatives) == activations.tanh()
    # A step: hard_sigmoid's kinks and its gradient's jumps, against the closed form.
    values, derivatives = np.clip(grid / 6 + 0.5, 0, 1), ((grid > -3) & (grid < 3)) / 6.0
    scales = activations.general(values, derivatives, None)
    assert np.sqrt(np.mean((np.clip(Z / 6 + 0.5, 0, 1) * scales.output) ** 2)) == pytest.approx(1.0, rel=0.01)
    assert scales.grad == pytest.approx(6 / math.sqrt(math.erf(3 / math.sqrt(2))), rel=1e-4)
    with pytest.raises(ValueError, match="gaussian_grid"):
        activations.general(np.ones(7), np.ones(7))


def test_the_general_rule_keeps_unit_scales_for_zero_and_refuses_infinite_rms():
    grid = rules.common.gaussian_grid()
    assert activations.general(np.sign(grid), np.zeros_like(grid), None).grad == 1.0
    with pytest.raises(ValueError, match="no finite RMS"):
        activations.general(np.where(grid > 9, np.inf, grid), np.ones_like(grid))


def test_monte_carlo_rule_is_one_over_the_sample_rms():
    outputs, grads = 3.0 * Z[:1000].reshape(10, 100), 0.5 * Z[:2000].reshape(10, 200)
    scales = activations.monte_carlo(outputs, grads, None)
    assert scales == pytest.approx((1 / np.sqrt(np.mean(outputs**2)), 1 / np.sqrt(np.mean(grads**2))))
    assert activations.monte_carlo(outputs, grads).grad == scales.output  # tied to the output


def test_the_tie_is_judged_by_the_ratio_of_the_untied_scales():
    for name, keeps in [("relu", True), ("tanh", True), ("gelu", True), ("sigmoid", False)]:
        untied = activations.by_name(name, constraint=None)
        assert activations.tied_gradient_rms(untied) == untied.output / untied.grad
        assert activations.tie_keeps_gradient(untied) is keeps, name
    # sigmoid's tied gradient: RMS(σ') × 1/RMS(σ), measured on samples.
    sig = 1 / (1 + np.exp(-Z))
    tied = np.sqrt(np.mean((sig * (1 - sig)) ** 2)) * activations.sigmoid().grad
    assert activations.tied_gradient_rms(activations.sigmoid(constraint=None)) == pytest.approx(tied, rel=0.01)
    assert activations.tie_keeps_gradient(activations.ElementwiseScales(1.0, 0.8))
    assert not activations.tie_keeps_gradient(activations.ElementwiseScales(1.0, 0.79))


def test_calibrated_rules_match_the_reference_values():
    # u-μP paper / unit-scaling 0.3.5 at mult = 1: gelu ≈ 1.767 forward, 1.516 backward.
    assert activations.gelu(constraint=None) == pytest.approx((1.767, 1.516), abs=1e-3)
    # Softmax runs from n (flat: every output 1/n) to sqrt(n) (one-hot) as mult grows.
    assert activations.softmax(16, mult=1e-6, constraint=None).output == pytest.approx(16)
    assert activations.softmax(16, mult=1e6, constraint=None).output == pytest.approx(4)
    assert activations.dropout(0.75) == 0.5


def test_norm_affine_gradient_is_one_over_root_batch():
    assert norms.affine_grad(64, 64 * 25) == pytest.approx(0.2)


def test_attention_rule():
    flat = attention.attention(head_dim=16, seq_len=64, mult=1e-6)  # flat probabilities: output RMS 1/sqrt(S)
    assert flat.output == pytest.approx(64**0.5, rel=1e-4)
    assert attention.attention(16, 64).logits == 1 / 16
    causal = attention.attention(16, 64, mult=1e-6, is_causal=True)
    assert causal.output == pytest.approx((64 / math.log(64)) ** 0.5, rel=1e-4)
    assert attention.attention(16, 64, dropout_rate=0.19).output == pytest.approx(
        0.9 * attention.attention(16, 64).output)


def test_cross_entropy_gradient_rule():
    classes = 32
    flat_gradient = np.full(classes, 1 / classes)
    flat_gradient[0] -= 1  # softmax - one_hot, flat softmax
    rms = np.sqrt(np.mean(flat_gradient**2))
    assert rms * losses.cross_entropy_grad(classes) == pytest.approx(1.0)
    pred, target = RNG.normal(size=100_000), RNG.normal(size=100_000)
    assert np.std(2 * (pred - target) * losses.MSE_GRAD) == pytest.approx(1.0, rel=0.02)
    assert losses.mean(4) == 0.25


def test_residual_rules():
    for tau in (0.0, 0.3, 1.0, 4.0):
        branch, skip = residual.branch_weights(tau)
        assert branch**2 + skip**2 == pytest.approx(1.0)
    rule = residual.transformer_residual_scaling_rule()
    assert [round(rule(i, 8), 3) for i in range(3)] == [0.5, 0.447, 0.408]
    with pytest.raises(ValueError, match="tau=-1"):
        residual.branch_weights(-1)


def test_lstm_rule_matches_its_simulation():
    rule = lstm.lstm_rule(1.0)
    assert 0.221 <= rule.hidden_rms <= 0.229  # simulated range, see rules/lstm.py
    assert 0.145 <= rule.preactivation_grad_rms / rule.output_scale <= 0.151
    assert lstm.lstm_rule(1) is rule
    scales = lstm.weights(features=64, units=32, batch=8, steps=4)
    base = (8 * 4) ** -0.5 / rule.preactivation_grad_rms
    assert scales.kernel == (64**-0.5, pytest.approx(base))
    assert scales.recurrent_kernel.forward == 32**-0.5
    assert scales.bias.backward == pytest.approx(base / rule.bias_grad_correlation)
    not_sequences = lstm.weights(features=64, units=32, batch=8, steps=4, return_sequences=False)
    assert not_sequences.kernel.backward == pytest.approx(8**-0.5 / rule.preactivation_grad_rms)


def test_lstm_input_gradient_rule():
    rule = lstm.lstm_rule(0.0)
    assert lstm.input_grad(16, 4, forget_bias=0.0) == pytest.approx(1.0 / rule.preactivation_grad_rms)
    assert lstm.input_grad(16, 4, steps=9, return_sequences=False, forget_bias=0.0) == pytest.approx(
        3.0 / rule.preactivation_grad_rms)


def test_mup_forward_multipliers_are_the_dense_rules():
    assert mup.WeightRole("hidden", fan_in=64, fan_out=8).forward_multiplier() == linear.dense(64, 8).output
    assert mup.WeightRole("output", fan_in=64, fan_out=8).forward_multiplier() == linear.readout(64, 8).output
    assert mup.WeightRole("input", fan_in=1, fan_out=8).forward_multiplier() == 1.0
    assert mup.WeightRole("norm", fan_out=8).forward_multiplier() == 1.0


def test_the_public_namespace():
    assert rules.tie("to_output_scale", 2.0, 3.0) == (2.0, 2.0)
    assert rules.logarithmic_interpolation(0.0, 2.0, 8.0) == pytest.approx(2.0)
