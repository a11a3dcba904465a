"""The rule of the unit-scaled LSTM (ours: the reference package has no recurrent layer).

Notation, for inputs x_t of width D (`features`), H units and a unit-normal
kernel W (D, 4H), recurrent kernel U (H, 4H) and bias b (4H,) (gate order i,
f, g, o as in Keras):

    z_t = D^-1/2 · x_t W  +  H^-1/2 · h̃_{t-1} U  +  b
    i, f, o = sigmoid(z_i, z_f, z_o),   g = tanh(z_g)      (plain gates)
    c_t = f·c_{t-1} + i·g,   h̃_t = o·tanh(c_t),   h_t = s·h̃_t

h̃ is the hidden state of a plain LSTM with these pre-activations; the layer
outputs (and carries as its state) the unit-scaled h = s·h̃. Both forward
multipliers are the dense rule on the tensor they multiply: x is unit scale,
so its term is unit; h̃ is not (RMS ≈ 0.23), and feeding back s·h̃ at unit
scale instead makes the recurrence chaotic (measured: gradients grow ×10⁷
over 256 steps), whereas H^-1/2 on h̃ matches the gain of Keras's orthogonal
recurrent initialiser and keeps the gradient stationary in time.

Everything else follows from a mean-field calculation: pre-activations
Gaussian with variance q² = 1 + r_h², gates independent of each other and of
the past, the cell state at its stationary RMS. That gives the hidden RMS r_h
(hence s = 1/r_h) and the RMS ĝ of the gradient of the pre-activations when a
unit-normal gradient arrives at every output h_t. The weight gradients then
follow: ∂L/∂W_eff = Σ_{batch,t} x_t^T ∂z_t sums n = batch·m terms, where m is
the number of steps the upstream gradient reaches (T with return_sequences,
else 1; a single injected gradient spreads over ~1/(1 - E[f²]) ≈ 2 steps, so
its energy equals one step of the stationary sum). Terms of the
recurrent-kernel and bias sums are correlated in time through the cell
state; the factors κ_U and κ_b for that are derived in the same mean field,
from the lag-d correlation E[f]^d of the cell-state gradient. Gauss-Hermite
quadrature evaluates it all for the given forget-gate bias (1 with Keras's
`unit_forget_bias`).

Calibration: a JAX simulation of exactly this recurrence (batch 32, T in
{16, 64, 256}, (D, H) in {(32, 64), (128, 256)}, unit-normal x, weights and
upstream gradients) measured r_h = 0.221-0.229 (mean field 0.225), ĝ/s =
0.145-0.151 (0.146), κ_b = 1.71-2.24 (1.83) and κ_U = 1.25-1.44 (1.35) with
forget bias 1; r_h = 0.193-0.196 (0.194), ĝ/s = 0.124-0.126 (0.124), κ_b ≈ 1.5
(1.43), κ_U = 1.08-1.17 (1.14) with forget bias 0. The mean field is used as
is: no fitted correction was needed.

Scales, with n = batch·m:
  forward: kernel × D^-1/2, recurrent kernel × H^-1/2 (on h̃), output × s
  backward: kernel × 1/(√n·ĝ), recurrent kernel × 1/(√n·ĝ·r_h·κ_U),
            bias × 1/(√n·ĝ·κ_b), input x × √(D/4H)·√(T/m)/ĝ.

Cut edges: the weights are leaves, so their backward scales are free. The
input x_t feeds exactly one place in the op (step t's input projection), so
its gradient has one route through the op and a backward-only scale on it is
a cut; it is correct for the model as long as x has no other consumer whose
gradient is added to this one (a residual around the LSTM would need the
plain gradient). Every edge inside the recurrence (h̃ and c feed the next
step and the output) is non-cut: s and 1/s are ordinary multiplications (the
same factor in both passes), and D^-1/2 and H^-1/2 scale the weights' forward
values, which the gradients of x and h̃ see as they are. So every gradient is
the true gradient of the function computed, times one constant per weight and
one for x (`tests/test_lstm.py` checks this against autodiff of a plain LSTM).
"""

import math
from typing import NamedTuple

import numpy as np

from keras_unitscale.rules.common import Constants
from keras_unitscale.rules.common import gaussian_mean as mean
from keras_unitscale.rules.common import gaussian_nodes
from keras_unitscale.rules.common import geometric_tail
from keras_unitscale.rules.common import sigmoid
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import at_least_one
from keras_unitscale.sizes import power

__all__ = ["LSTMRule", "lstm_rule", "WeightScales", "RecurrentWeightScales", "LSTMWeightScales", "weights", "input_grad"]


class LSTMRule(Constants):
    """The constants of the unit-scaled LSTM for one forget-gate bias (read-only).

    Attributes:
        forget_bias: the forget-gate bias the rule was derived for.
        preactivation_rms: q, the RMS of the gate pre-activations.
        cell_rms: the stationary RMS of the cell state c.
        hidden_rms: r_h, the RMS of the plain hidden state `o·tanh(c)`.
        output_scale: s = 1 / r_h, applied to the hidden state.
        preactivation_grad_rms: ĝ, the RMS of the gradient of the gate
            pre-activations for a unit-normal gradient on every output.
        recurrent_grad_correlation: κ_U, by how much the time correlation
            of `h̃_{t-1}` and `∂z_t` grows the recurrent kernel's gradient.
        bias_grad_correlation: κ_b, the same for the bias.
    """

    __slots__ = (
        "forget_bias",
        "preactivation_rms",
        "cell_rms",
        "hidden_rms",
        "output_scale",
        "preactivation_grad_rms",
        "recurrent_grad_correlation",
        "bias_grad_correlation",
    )



class _Forward(NamedTuple):
    """The forward mean field at its fixed point: gate values on the quadrature nodes, mean squares."""

    q: float
    i_gate: np.ndarray
    f_gate: np.ndarray
    g_gate: np.ndarray
    tanh_c: np.ndarray
    i_ms: float
    f_ms: float
    g_ms: float
    cell_ms: float
    hidden_ms: float


def _forward(forget_bias):
    """Iterates the hidden mean square to its fixed point (the input term has unit variance; the recurrent one h̃'s)."""
    nodes = gaussian_nodes()
    hidden_ms = 0.0
    for _ in range(200):
        q = math.sqrt(1.0 + hidden_ms)
        z = q * nodes
        i_gate, f_gate, g_gate = sigmoid(z), sigmoid(z + forget_bias), np.tanh(z)
        i_ms, f_ms, g_ms = mean(i_gate**2), mean(f_gate**2), mean(g_gate**2)
        cell_ms = i_ms * g_ms / (1.0 - f_ms)  # c = f·c + i·g, stationary
        tanh_c = np.tanh(math.sqrt(cell_ms) * nodes)
        new_hidden_ms = i_ms * mean(tanh_c**2)  # h̃ = o·tanh(c); o as i
        converged = abs(new_hidden_ms - hidden_ms) < 1e-13
        hidden_ms = new_hidden_ms
        if converged:
            break
    return _Forward(q, i_gate, f_gate, g_gate, tanh_c, i_ms, f_ms, g_ms, cell_ms, hidden_ms)


def _gate_grad_ms(state, forget_bias):
    """Each gate's pre-activation gradient mean square, per unit mean-square gradient on h̃."""
    d_i = state.i_gate * (1.0 - state.i_gate)
    d_f = state.f_gate * (1.0 - state.f_gate)
    d_g = 1.0 - state.g_gate**2
    # dc_t = dh̃_t·o·tanh'(c) + f·dc_{t+1}, stationary.
    cell_grad_ms = state.i_ms * mean((1.0 - state.tanh_c**2) ** 2) / (1.0 - state.f_ms)
    gate_grad_ms = np.array([
        cell_grad_ms * state.g_ms * mean(d_i**2),  # i: dc·g·σ'
        cell_grad_ms * state.cell_ms * mean(d_f**2),  # f: dc·c·σ'
        cell_grad_ms * state.i_ms * mean(d_g**2),  # g: dc·i·tanh'
        mean(state.tanh_c**2) * mean(d_i**2),  # o: dh̃·tanh(c)·σ'
    ])
    # The recurrent projection feeds Σ_gates ∂z back into ∂h̃ (H^-1/2·U^T,
    # unit gain per gate): a geometric series.
    feedback = float(gate_grad_ms.sum())
    if not feedback < 1.0:
        raise ValueError(
            "The LSTM's gradient is unstable for this forget-gate bias. "
            f"Received: forget_bias={forget_bias!r}"
        )
    return gate_grad_ms / (1.0 - feedback)


def _correlations(state, gate_grad_ms):
    """κ_U and κ_b: how time correlation grows the recurrent kernel's and the bias's gradients.

    The g gate's gradient dc·i·tanh'(z_g) has lag-d correlation λ_g·E[f]^d
    (λ_g = E[i·tanh']² / E[(i·tanh')²]); the f gate's, dc·c·σ'(z_f),
    λ_f·E[f]^2d (c is correlated as well); i's and o's have none. The hidden
    state's is (E[o]²/E[o²])·E[f]^d.
    """
    f_mean = mean(state.f_gate)
    d_f = state.f_gate * (1.0 - state.f_gate)
    d_g = 1.0 - state.g_gate**2
    lambda_g = (mean(state.i_gate) * mean(d_g)) ** 2 / (state.i_ms * mean(d_g**2))
    lambda_f = mean(d_f) ** 2 / mean(d_f**2)
    rho_h = mean(state.i_gate) ** 2 / state.i_ms

    bias_ms = np.array(
        [1.0, 1.0 + 2 * lambda_f * geometric_tail(f_mean**2), 1.0 + 2 * lambda_g * geometric_tail(f_mean), 1.0]
    )
    recurrent_ms = np.array([
        1.0,
        1.0 + 2 * rho_h * lambda_f * geometric_tail(f_mean**3),
        1.0 + 2 * rho_h * lambda_g * geometric_tail(f_mean**2),
        1.0,
    ])
    total = gate_grad_ms.sum()
    return (
        math.sqrt(float((recurrent_ms * gate_grad_ms).sum() / total)),
        math.sqrt(float((bias_ms * gate_grad_ms).sum() / total)),
    )


def _mean_field(forget_bias):
    """Derives `LSTMRule` for unit-normal inputs and weights (see the module notes)."""
    state = _forward(forget_bias)
    gate_grad_ms = _gate_grad_ms(state, forget_bias)
    output_scale = 1.0 / math.sqrt(state.hidden_ms)
    recurrent_correlation, bias_correlation = _correlations(state, gate_grad_ms)
    return LSTMRule(
        forget_bias=float(forget_bias),
        preactivation_rms=state.q,
        cell_rms=math.sqrt(state.cell_ms),
        hidden_rms=math.sqrt(state.hidden_ms),
        output_scale=output_scale,
        # ∂z for a unit gradient on h = s·h̃ is s times the above.
        preactivation_grad_rms=output_scale * math.sqrt(gate_grad_ms.mean()),
        recurrent_grad_correlation=recurrent_correlation,
        bias_grad_correlation=bias_correlation,
    )


_RULES = {}  # forget bias -> LSTMRule, derived on first use


def lstm_rule(forget_bias=1.0):
    """The constants of the unit-scaled LSTM: derived once per forget-gate bias.

    Rule (derived in the mean field; the module notes give the derivation
    and its check against simulation): with unit-normal inputs and weights,
    the plain hidden state `o·tanh(c)` has RMS `hidden_rms` (0.225 with
    forget bias 1, 0.194 with 0), so the output is scaled by
    `output_scale = 1 / hidden_rms`; the gradient of the gate pre-activations
    has RMS `preactivation_grad_rms` (≈ 0.65) when a unit-normal gradient
    arrives at every output, and the recurrent-kernel and bias gradients are
    `recurrent_grad_correlation` (1.35) and `bias_grad_correlation` (1.83)
    times larger than independent sums would be.

    The mean field was checked against simulation at forget biases 0 and 1
    (the two the layers use). With a large forget bias the cell state needs
    about `1 / (1 - E[f])` steps to reach its stationary RMS, so a shorter
    sequence comes out smaller than the rule assumes.

    Args:
        forget_bias: the forget-gate bias at initialisation (1 for Keras's
            `unit_forget_bias=True`, else 0), in [-2, 4].

    Returns:
        An `LSTMRule`.

    Examples:
        >>> rule = lstm_rule(1.0)
        >>> round(rule.hidden_rms, 3), round(rule.output_scale, 2)
        (0.225, 4.44)
    """
    if (
        not isinstance(forget_bias, (int, float))
        or isinstance(forget_bias, bool)
        or not -2.0 <= forget_bias <= 4.0
    ):
        raise ValueError(
            f"`forget_bias` must be a number in [-2, 4]. Received: forget_bias={forget_bias!r}"
        )
    forget_bias = float(forget_bias)
    if forget_bias not in _RULES:
        _RULES[forget_bias] = _mean_field(forget_bias)
    return _RULES[forget_bias]


class WeightScales(NamedTuple):
    forward: float
    backward: float | None  # None where the batch was not given


class RecurrentWeightScales(NamedTuple):
    """The scales of a recurrent layer's three weights (the LSTM's and the GRU's)."""

    kernel: WeightScales
    recurrent_kernel: WeightScales
    bias: WeightScales


LSTMWeightScales = RecurrentWeightScales


def weights(features, units, batch=None, steps=1, return_sequences=True, forget_bias=1.0):
    """The forward and backward scales of the kernel, recurrent kernel and bias.

    With `n = batch·m`, `m = steps` if the upstream gradient reaches every
    step (`return_sequences`) else 1, and `ĝ`, `r_h`, `κ_U`, `κ_b` from
    `lstm_rule`: kernel × `D^-1/2` forward and `1/(√n·ĝ)` backward;
    recurrent kernel × `H^-1/2` forward (on the plain hidden state h̃) and
    `1/(√n·ĝ·r_h·κ_U)` backward; bias × 1 forward and `1/(√n·ĝ·κ_b)`
    backward. `batch` counts every replica's rows.

    Examples:
        >>> scales = weights(features=64, units=32)
        >>> scales.kernel.forward, scales.recurrent_kernel.backward
        (0.125, None)
    """
    rule = lstm_rule(forget_bias)
    base = None
    if batch is not None:
        base = power(at_least_one(batch * (steps if return_sequences else 1)), -0.5) / rule.preactivation_grad_rms
    recurrent = None if base is None else base / (rule.hidden_rms * rule.recurrent_grad_correlation)
    return RecurrentWeightScales(
        WeightScales(power(features, -0.5), base),
        WeightScales(power(units, -0.5), recurrent),
        WeightScales(1.0, None if base is None else base / rule.bias_grad_correlation),
    )


def input_grad(features, units, steps=1, return_sequences=True, forget_bias=1.0):
    """The gradient scale of the input sequence, `√(D/4H)·√(T/m)/ĝ` (a cut edge).

    The gradient `D^-1/2·∂z W^T` of unit-normal weights has RMS
    `√(4H/D)·ĝ·√(m/T)` over the T steps.

    Examples:
        >>> round(input_grad(features=16, units=4), 3)
        1.543
    """
    rule = lstm_rule(forget_bias)
    ratio = as_float(features) / (4.0 * units) * (1.0 if return_sequences else as_float(steps))
    return power(ratio, 0.5) / rule.preactivation_grad_rms
