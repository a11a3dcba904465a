"""The rule of the unit-scaled GRU (ours: the reference package has no recurrent layer).

Derived as the LSTM's is (`keras_unitscale.rules.lstm`), for inputs x_t of
width D (`features`), H units and a unit-normal kernel W (D, 3H), recurrent
kernel U (H, 3H) and bias (gate order z, r, h as in Keras):

    x_z, x_r, x_h = D^-1/2 · x_t W  (+ input bias)
    u_z, u_r, u_h = H^-1/2 · h̃_{t-1} U  (+ recurrent bias)      reset_after=True
    z = sigmoid(x_z + u_z),   r = sigmoid(x_r + u_r)
    ĥ = tanh(x_h + r·u_h)      (reset_after=False: x_h + H^-1/2 (r·h̃_{t-1}) U_h)
    h̃_t = z·h̃_{t-1} + (1 - z)·ĥ,   h_t = s·h̃_t

h̃ is the state of a plain GRU with these pre-activations; the layer outputs
(and carries as its state) the unit-scaled h = s·h̃. As for the LSTM, the
recurrent projection multiplies h̃, not h: H^-1/2 on h̃ keeps the recurrence
where Keras's orthogonal initialiser keeps it.

Mean field (pre-activations Gaussian, the gates independent of each other
and of the past, h̃ at its stationary mean square m = r_h²): z and r have
pre-activation variance 1 + m, the candidate 1 + E[r²]·m (for reset_after
the candidate's pre-activation is a scale mixture; its recurrent part is
small beside x_h, and the Gaussian with the same variance is used for both
conventions), and

    m = E[(1-z)²]·E[ĥ²] / (1 - E[z²]).

Backward, with δ_t the gradient of h̃_t and Δ = E[δ²] when a unit gradient
arrives at every step: per unit Δ the pre-activation gradients have mean
squares g_z = (m + E[ĥ²])·E[σ'²] (∂z = δ·(h̃_{t-1} - ĥ)·σ'),
g_h = E[(1-z)²]·E[tanh'²] (∂a = δ·(1-z)·tanh') and g_r = g_h·m·E[σ'²]
(∂r's pre-activation = ∂a·u_h·σ'); δ_{t-1} gets z·δ_t directly and, through
the recurrent projection, g_z + g_r + E[r²]·g_h, so
Δ = 1 / (1 - E[z²] - g_z - g_r - E[r²]·g_h). ĝ, the RMS of the pre-activation
gradients for a unit gradient on h, is s·√(Δ·mean(g)). The recurrent kernel's
gradient sums h̃_{t-1}·∂z over the n terms (its candidate third sees r·∂a);
the bias's, ∂z (with reset_after the recurrent row's candidate third sees r·∂a
too). Terms are correlated in time: δ and h̃ both decay by E[z] per lag, and
h̃_{t-1} - ĥ_t by E[z]·m - E[1-z]·E[ĥ²] relative to its mean square; κ_U and
κ_b are the resulting growth of the recurrent-kernel and bias gradients over
independent sums, derived per gate as for the LSTM. n = batch·m_steps with
m_steps = T with return_sequences, else 1 (a gradient injected at one step
spreads over the past with the energy of one step of the stationary sum).

Calibration: `tests/test_gru.py::test_scale` runs the layer at (D, H) in
{(32, 64), (128, 256)} and T in {16, 64, 256}, with and without
return_sequences and in both reset conventions: output, input gradient and
the three weight gradients land within [2/3, 1.5] of unit RMS. The mean field
is used as is.

Scales, with n = batch·m_steps:
  forward: kernel × D^-1/2, recurrent kernel × H^-1/2 (on h̃), output × s
  backward: kernel × 1/(√n·ĝ), recurrent kernel × 1/(√n·ĝ·r_h·ρ_U·κ_U),
            bias × 1/(√n·ĝ·ρ_b·κ_b), input x × √(D/3H)·√(T/m_steps)/ĝ,
with ρ_U and ρ_b the RMS of the recurrent-kernel's and bias's gate gradients
relative to ĝ (below 1: their candidate parts carry the reset gate r).

Cut edges are the LSTM's: the weights are leaves; x_t feeds only step t's
input projection; every edge inside the recurrence is an ordinary
multiplication, the same factor in both passes.
"""

import math

import numpy as np

from keras_unitscale.rules.common import Constants
from keras_unitscale.rules.common import gaussian_mean as mean
from keras_unitscale.rules.common import gaussian_nodes
from keras_unitscale.rules.common import geometric_tail
from keras_unitscale.rules.common import sigmoid
from keras_unitscale.rules.lstm import RecurrentWeightScales
from keras_unitscale.rules.lstm import WeightScales
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import at_least_one
from keras_unitscale.sizes import power

__all__ = ["GRURule", "gru_rule", "weights", "input_grad"]

GATES = 3


class GRURule(Constants):
    """The constants of the unit-scaled GRU for one reset convention (read-only).

    Attributes:
        reset_after: 1.0 if the reset gate multiplies the recurrent
            projection (Keras's default), else 0.0.
        hidden_rms: r_h, the RMS of the plain state h̃.
        output_scale: s = 1 / r_h, applied to the state.
        preactivation_grad_rms: ĝ, the RMS of the gradient of the gate
            pre-activations for a unit-normal gradient on every output.
        recurrent_grad_ratio: ρ_U, the RMS of the gate gradients the
            recurrent kernel sees, relative to ĝ.
        bias_grad_ratio: ρ_b, the same for the bias.
        recurrent_grad_correlation: κ_U, by how much time correlation grows
            the recurrent kernel's gradient.
        bias_grad_correlation: κ_b, the same for the bias.
    """

    __slots__ = (
        "reset_after",
        "hidden_rms",
        "output_scale",
        "preactivation_grad_rms",
        "recurrent_grad_ratio",
        "bias_grad_ratio",
        "recurrent_grad_correlation",
        "bias_grad_correlation",
    )


def _forward():
    """Iterates the state's mean square m to its fixed point: the gate and candidate values on the quadrature nodes."""
    nodes = gaussian_nodes()
    hidden_ms = 0.0
    for _ in range(200):
        gate = sigmoid(math.sqrt(1.0 + hidden_ms) * nodes)  # z and r alike
        z_ms = mean(gate**2)
        candidate = np.tanh(math.sqrt(1.0 + z_ms * hidden_ms) * nodes)  # E[r²] = E[z²]
        new_hidden_ms = mean((1.0 - gate) ** 2) * mean(candidate**2) / (1.0 - z_ms)
        converged = abs(new_hidden_ms - hidden_ms) < 1e-13
        hidden_ms = new_hidden_ms
        if converged:
            break
    return gate, candidate, hidden_ms


def _growth(factors, ms):
    """√ of the mean-square-weighted growth factors: one gradient's RMS over an independent sum's."""
    return math.sqrt(float((np.array(factors) * ms).sum() / ms.sum()))


def _mean_field(reset_after):
    """Derives `GRURule` for unit-normal inputs and weights (see the module notes)."""
    gate, candidate, hidden_ms = _forward()
    z_mean, r_ms, keep_ms, candidate_ms = mean(gate), mean(gate**2), mean((1.0 - gate) ** 2), mean(candidate**2)
    d_sigmoid, d_tanh = gate * (1.0 - gate), 1.0 - candidate**2
    sigmoid_grad_ms = mean(d_sigmoid**2)

    # Pre-activation gradient mean squares per unit mean square of δ.
    g_z = (hidden_ms + candidate_ms) * sigmoid_grad_ms
    g_h = keep_ms * mean(d_tanh**2)
    g_r = g_h * hidden_ms * sigmoid_grad_ms
    g_hr = r_ms * g_h  # the candidate's gradient through r (into U_h and back to h̃)
    feedback = r_ms + g_z + g_r + g_hr  # E[z²] = E[r²]: the direct path z·δ
    if not feedback < 1.0:
        raise ValueError(f"The GRU's mean-field gradient does not converge (feedback {feedback:.3f}).")
    delta_ms = 1.0 / (1.0 - feedback)
    output_scale = 1.0 / math.sqrt(hidden_ms)
    kernel_ms = np.array([g_z, g_r, g_h]) * delta_ms
    recurrent_ms = np.array([g_z, g_r, g_hr]) * delta_ms
    bias_ms = np.concatenate([kernel_ms, recurrent_ms]) if reset_after else kernel_ms

    # Lag correlations, each summed over every lag (see the module notes).
    lag = z_mean  # δ and h̃ both decay by E[z] per step
    lambda_sigmoid = mean(d_sigmoid) ** 2 / sigmoid_grad_ms
    lambda_h = (mean(1.0 - gate) * mean(d_tanh)) ** 2 / g_h
    lambda_hr = (z_mean * mean(1.0 - gate) * mean(d_tanh)) ** 2 / g_hr
    # h̃_{t-1} - ĥ_t at lag d: E[z]^(d-1)·(E[z]·m - E[1-z]·E[ĥ²]) / (m + E[ĥ²]).
    difference = (z_mean * hidden_ms - mean(1.0 - gate) * candidate_ms) / (hidden_ms + candidate_ms)
    bias_growth = [
        1.0 + 2 * lambda_sigmoid * difference * geometric_tail(lag**2) / lag,
        1.0 + 2 * lambda_h * lambda_sigmoid * geometric_tail(lag**2),
        1.0 + 2 * lambda_h * geometric_tail(lag),
    ]
    if reset_after:
        bias_growth += [*bias_growth[:2], 1.0 + 2 * lambda_hr * geometric_tail(lag)]
    recurrent_growth = [
        1.0 + 2 * lambda_sigmoid * difference * geometric_tail(lag**3) / lag,
        1.0 + 2 * lambda_h * lambda_sigmoid * geometric_tail(lag**3),
        1.0 + 2 * lambda_hr * geometric_tail(lag**2),
    ]
    return GRURule(
        reset_after=float(bool(reset_after)),
        hidden_rms=math.sqrt(hidden_ms),
        output_scale=output_scale,
        preactivation_grad_rms=output_scale * math.sqrt(kernel_ms.mean()),
        recurrent_grad_ratio=math.sqrt(recurrent_ms.mean() / kernel_ms.mean()),
        bias_grad_ratio=math.sqrt(bias_ms.mean() / kernel_ms.mean()),
        recurrent_grad_correlation=_growth(recurrent_growth, recurrent_ms),
        bias_grad_correlation=_growth(bias_growth, bias_ms),
    )


_RULES = {}  # reset_after -> GRURule, derived on first use


def gru_rule(reset_after=True):
    """The constants of the unit-scaled GRU: derived once per reset convention.

    Rule (derived in the mean field; the module notes give the derivation):
    with unit-normal inputs and weights, the plain state of the GRU has RMS
    `hidden_rms` (≈ 0.33), so the output is scaled by `output_scale =
    1 / hidden_rms`; the gate pre-activations' gradient has RMS
    `preactivation_grad_rms` when a unit-normal gradient arrives at every
    output; the recurrent kernel's and bias's gradients follow from it with
    the ratios and time correlations listed in `GRURule`.

    Args:
        reset_after: Keras's GRU convention: the reset gate applied after
            the recurrent projection (True, the default) or before.

    Returns:
        A `GRURule`.

    Examples:
        >>> rule = gru_rule()
        >>> round(rule.hidden_rms * rule.output_scale, 12)
        1.0
    """
    if not isinstance(reset_after, (bool, np.bool_)):
        raise ValueError(f"`reset_after` must be True or False. Received: reset_after={reset_after!r}")
    reset_after = bool(reset_after)
    if reset_after not in _RULES:
        _RULES[reset_after] = _mean_field(reset_after)
    return _RULES[reset_after]


def weights(features, units, batch=None, steps=1, return_sequences=True, reset_after=True):
    """The forward and backward scales of the kernel, recurrent kernel and bias.

    With `n = batch·m`, `m = steps` if the upstream gradient reaches every
    step (`return_sequences`) else 1, and the constants of `gru_rule`:
    kernel × `D^-1/2` forward and `1/(√n·ĝ)` backward; recurrent kernel ×
    `H^-1/2` forward (on the plain state h̃) and `1/(√n·ĝ·r_h·ρ_U·κ_U)`
    backward; bias × 1 forward and `1/(√n·ĝ·ρ_b·κ_b)` backward. `batch`
    counts every replica's rows.

    Examples:
        >>> scales = weights(features=64, units=16)
        >>> scales.kernel.forward, scales.recurrent_kernel.forward, scales.bias.backward
        (0.125, 0.25, None)
    """
    rule = gru_rule(reset_after)
    base = None
    if batch is not None:
        base = power(at_least_one(batch * (steps if return_sequences else 1)), -0.5) / rule.preactivation_grad_rms

    def times(divisor):
        return None if base is None else base / divisor

    return RecurrentWeightScales(
        WeightScales(power(features, -0.5), base),
        WeightScales(
            power(units, -0.5),
            times(rule.hidden_rms * rule.recurrent_grad_ratio * rule.recurrent_grad_correlation),
        ),
        WeightScales(1.0, times(rule.bias_grad_ratio * rule.bias_grad_correlation)),
    )


def input_grad(features, units, steps=1, return_sequences=True, reset_after=True):
    """The gradient scale of the input sequence, `√(D/3H)·√(T/m)/ĝ` (a cut edge).

    Examples:
        >>> round(input_grad(features=12, units=4) * gru_rule().preactivation_grad_rms, 6)
        1.0
    """
    rule = gru_rule(reset_after)
    ratio = as_float(features) / (GATES * units) * (1.0 if return_sequences else as_float(steps))
    return power(ratio, 0.5) / rule.preactivation_grad_rms
