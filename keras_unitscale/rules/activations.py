"""Rules of the elementwise ops: the activations and dropout.

Each returns `ElementwiseScales(output, grad)`: the forward scale of the
output and the backward scale of the input's gradient, tied by the
constraint where the edge needs it. The reference package `unit-scaling`
calibrates gelu, silu and softmax between two analytic limits; relu, tanh and
sigmoid, which it lacks, follow the general rule for an elementwise `f` on
x ~ N(0, 1): output × `1/RMS(f(x))`, gradient × `1/RMS(f'(x))`, so that both
have unit RMS for a unit-normal input and upstream gradient.

Every other activation follows the general rule too (`general`): this
module integrates, and `keras_unitscale.ops.activations` evaluates Keras's
function (or a user's) on the grid, since rules do not import Keras. One that
acts along an axis (log_softmax, glu, sparsemax, or a user's function that is
not elementwise) gets the same two RMSs from a Monte-Carlo sample at its size
(`monte_carlo`): of the output for a unit-normal input, and of the
vector-Jacobian product of a unit-normal upstream gradient.
"""

import math
from typing import NamedTuple

import numpy as np

from keras_unitscale import checks
from keras_unitscale.rules.common import gaussian_grid
from keras_unitscale.rules.common import gaussian_grid_rms
from keras_unitscale.rules.common import logarithmic_interpolation
from keras_unitscale.rules.common import sigmoid as _logistic
from keras_unitscale.rules.common import tie
from keras_unitscale.sizes import power

__all__ = [
    "ElementwiseScales", "quadrature", "general", "monte_carlo", "relu", "gelu", "silu", "silu_glu", "tanh",
    "sigmoid", "softmax", "dropout", "NAMES", "DERIVED", "WITH_MULT", "by_name", "tied_gradient_rms",
    "tie_keeps_gradient", "TIE_TOLERANCE", "set_sampler",
]


class ElementwiseScales(NamedTuple):
    output: float
    grad: float


def _inverse_rms(rms, what):
    """`1/rms`; 1 where the RMS is 0 (a constant-zero output or gradient: nothing to normalise)."""
    if not math.isfinite(rms):
        raise ValueError(
            f"The activation's {what} has no finite RMS for a unit-normal input, so it has no unit-scaling "
            f"rule. Received: RMS={rms}"
        )
    return 1.0 / rms if rms > 0 else 1.0


def general(values, derivatives, constraint="to_output_scale"):
    """The general rule from an elementwise `f` sampled on `gaussian_grid()`: `1/RMS(f(z))`, `1/RMS(f'(z))`.

    The grid is fine and uniform, so a kink or a step (relu6, hard_sigmoid)
    is integrated as well as a smooth function. Where an RMS is 0 (a
    function whose gradient is 0 everywhere, as `sign`'s) the scale is 1.

    Args:
        values: `f` on the grid.
        derivatives: `f'` on the grid: what backpropagation computes.
        constraint: see `keras_unitscale.constraints`.

    Examples:
        >>> z = gaussian_grid()
        >>> [round(s, 4) for s in general(np.abs(z), np.sign(z), constraint=None)]
        [1.0, 1.0]
    """
    return ElementwiseScales(*tie(
        constraint,
        _inverse_rms(gaussian_grid_rms(values), "output"),
        _inverse_rms(gaussian_grid_rms(derivatives), "gradient"),
    ))


def quadrature(fn, derivative, constraint="to_output_scale"):
    """The general rule for an elementwise `fn`: `1/RMS(fn(z))` and `1/RMS(fn'(z))`, z ~ N(0, 1).

    `general` of `fn` and `derivative` on the grid of
    `rules.common.gaussian_rms`.

    Args:
        fn: the function, on numpy arrays.
        derivative: its derivative, on numpy arrays.
        constraint: see `keras_unitscale.constraints`.

    Examples:
        >>> [round(s, 4) for s in quadrature(np.tanh, lambda z: 1 - np.tanh(z) ** 2, constraint=None)]
        [1.5925, 1.4674]
    """
    grid = gaussian_grid()
    return general(fn(grid), derivative(grid), constraint)


def _rms(samples):
    samples = np.asarray(samples, dtype=np.float64)
    return math.sqrt(float(np.mean(samples**2))) if samples.size else 0.0


def monte_carlo(outputs, grads, constraint="to_output_scale"):
    """The general rule of an activation acting along an axis, from a sample: `1/RMS(outputs)`, `1/RMS(grads)`.

    Args:
        outputs: the activation of unit-normal inputs (at the size the rule
            is for).
        grads: the vector-Jacobian products of unit-normal upstream
            gradients at those inputs: the input gradients
            backpropagation delivers.
        constraint: see `keras_unitscale.constraints`.

    Examples:
        >>> [round(s, 4) for s in monte_carlo(np.full((4, 2), 0.5), np.full((4, 4), 2.0), constraint=None)]
        [2.0, 0.5]
    """
    return ElementwiseScales(*tie(
        constraint, _inverse_rms(_rms(outputs), "output"), _inverse_rms(_rms(grads), "gradient")
    ))


# A tie that leaves the input gradient's RMS within this of 1 is taken to keep it at unit scale.
TIE_TOLERANCE = 0.25


def tied_gradient_rms(untied):
    """The input gradient's RMS under the default tie, for a rule given untied (`constraint=None`).

    `"to_output_scale"` multiplies the gradient by the output scale instead
    of its own: for a unit-normal upstream gradient its RMS becomes
    `output / grad`, the ratio of the untied forward to backward scale.
    Exact where the backward scale is the general rule's `1/RMS(f')`; for
    the calibrated gelu, silu and softmax, as close as their calibration.

    Examples:
        >>> round(tied_gradient_rms(sigmoid(constraint=None)), 3)
        0.391
    """
    return untied.output / untied.grad


def tie_keeps_gradient(untied, tolerance=TIE_TOLERANCE):
    """Whether the default tie keeps the input gradient within `tolerance` of unit RMS (rule given untied).

    Examples:
        >>> tie_keeps_gradient(tanh(constraint=None)), tie_keeps_gradient(sigmoid(constraint=None))
        (True, False)
    """
    return abs(tied_gradient_rms(untied) - 1.0) <= tolerance


# Exact for relu: RMS(relu(z)) = RMS(relu'(z)) = 1/sqrt(2), He initialisation's factor.
_RELU = math.sqrt(2.0)
# Computed once, when the module loads.
_TANH = quadrature(np.tanh, lambda z: 1.0 - np.tanh(z) ** 2, constraint=None)
_SIGMOID = quadrature(_logistic, lambda z: _logistic(z) * (1.0 - _logistic(z)), constraint=None)
# The mult → ∞ limit of gelu's and silu's output rule: relu's standard deviation.
_RELU_STD_SCALE = (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5


def relu(constraint="to_output_scale"):
    """Output and gradient × `sqrt(2)` (exact; both scales are equal).

    This normalises the RMS, which decides what a low-precision format
    holds; the `mult → ∞` limit of the reference's gelu rule,
    `sqrt(2 / (1 - 1/π)) ≈ 1.713`, normalises the standard deviation.

    Examples:
        >>> relu().output == 2**0.5
        True
    """
    return ElementwiseScales(*tie(constraint, _RELU, _RELU))


def _gelu_alpha(mult):
    return 1.0 / (1.0 + 0.25 / mult**2)  # = sigmoid(ln(4 mult²))


def gelu(mult=1.0, constraint="to_output_scale"):
    """The reference's calibrated rule: with `a = sigmoid(ln 4m²)`, output × `L(a, 2, sqrt(2/(1-1/π)))`, gradient × `L(a, 2, sqrt(2))`.

    `L` is `logarithmic_interpolation`; at `mult = 1`, ≈ 1.767 and 1.516.

    Examples:
        >>> [round(s, 3) for s in gelu(constraint=None)]
        [1.767, 1.516]
    """
    checks.positive("mult", mult)
    alpha = _gelu_alpha(mult)
    return ElementwiseScales(*tie(
        constraint,
        logarithmic_interpolation(alpha, 2.0, _RELU_STD_SCALE),
        logarithmic_interpolation(alpha, 2.0, 2.0**0.5),
    ))


def _silu_grad(mult):
    return logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)  # sigmoid(ln m²)


def silu(mult=1.0, constraint="to_output_scale"):
    """The reference's: output as gelu's, gradient × `L(sigmoid(ln m²), 2, sqrt(2))`.

    Examples:
        >>> round(silu(constraint=None).grad, 4)
        1.6818
    """
    checks.positive("mult", mult)
    output = logarithmic_interpolation(_gelu_alpha(mult), 2.0, _RELU_STD_SCALE)
    return ElementwiseScales(*tie(constraint, output, _silu_grad(mult)))


def silu_glu(mult=1.0):
    """`x * silu(gate)`: the output and both inputs' gradients × `L(sigmoid(ln m²), 2, sqrt(2))` (the reference's).

    Examples:
        >>> round(silu_glu(), 4)
        1.6818
    """
    checks.positive("mult", mult)
    return _silu_grad(mult)


def tanh(constraint="to_output_scale"):
    """The general rule: output × ≈ 1.593, gradient × ≈ 1.467 (tied: 1.593).

    Examples:
        >>> round(tanh().grad, 3)
        1.593
    """
    return ElementwiseScales(*tie(constraint, *_TANH))


def sigmoid(constraint="to_output_scale"):
    """The general rule: output × ≈ 1.846 (its RMS includes the mean of 1/2), gradient × ≈ 4.723.

    With the default constraint both are 1.846 and the gradient's RMS is
    ≈ 0.39: σ' is at most 1/4, so a sigmoid on a non-cut edge cannot have
    both at unit scale. Pass `constraint=None` where the edge is cut (an
    LSTM's gates).

    Examples:
        >>> [round(s, 3) for s in sigmoid(constraint=None)]
        [1.846, 4.723]
    """
    return ElementwiseScales(*tie(constraint, *_SIGMOID))


def softmax(n, mult=1.0, constraint="to_output_scale"):
    """The reference's, over `n` classes: with `a = 1/(1 + 4/m²)`, output × `L(a, n, sqrt(n))`, gradient × `L(a, n/m, sqrt(n/m))`.

    The output lies in [0, n]: from the flat limit, where each output is
    1/n, to the one-hot limit.

    Examples:
        >>> round(softmax(4).output, 3)  # 4^0.9
        3.482
    """
    checks.positive("mult", mult)
    alpha = 1.0 / (1.0 + 4.0 / mult**2)
    return ElementwiseScales(*tie(
        constraint,
        logarithmic_interpolation(alpha, n, power(n, 0.5)),
        logarithmic_interpolation(alpha, n / mult, power(n / mult, 0.5)),
    ))


def dropout(rate):
    """After inverted dropout (which divides by `1 - rate`): × `(1 - rate)^1/2` both ways, for unit RMS rather than unit mean.

    Examples:
        >>> dropout(0.75)
        0.5
    """
    checks.rate("rate", rate)
    return (1.0 - rate) ** 0.5


# The activations with a rule of their own here, and those taking u-μP's `mult`.
DERIVED = ("linear", "gelu", "silu", "softmax", "swish", "relu", "sigmoid", "tanh")
WITH_MULT = ("gelu", "silu", "swish", "softmax")
# Every activation a layer can name: Keras's (`keras.activations`, 3.15) that take no argument but the
# input. `tests/test_activations.py` checks this against the installed Keras. "threshold", which needs
# two more, is refused: Keras accepts the name and fails at the first call.
NAMES = DERIVED + (
    "celu", "elu", "exponential", "glu", "hard_shrink", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh",
    "leaky_relu", "log_sigmoid", "log_softmax", "mish", "relu6", "selu", "soft_shrink", "softplus", "softsign",
    "sparse_plus", "sparse_sigmoid", "sparsemax", "squareplus", "tanh_shrink",
)

# What computes the untied general rule of a named activation: `keras_unitscale.ops.activations`
# evaluates Keras's function and registers it when it loads (the rules do not import Keras).
_sampler = None


def set_sampler(sampler):
    """Registers `sampler(name, size) -> ElementwiseScales`, the untied general rule of a named activation.

    `keras_unitscale.ops.activations` registers its evaluation of Keras's
    functions when it loads; `by_name` calls it for the names without a
    rule here. Returns the previous one.
    """
    global _sampler
    previous, _sampler = _sampler, sampler
    return previous


def by_name(name, mult=1.0, constraint="to_output_scale", size=None):
    """The rule of the activation called `name` (one of `NAMES`); `size` is the axis size of those acting along one.

    softmax (class count), log_softmax, glu and sparsemax need `size`.
    `mult` applies to the names in `WITH_MULT` and is ignored by the others.

    Examples:
        >>> by_name("relu").output == relu().output
        True
    """
    if name == "linear":
        return ElementwiseScales(1.0, 1.0)
    if name in ("gelu", "silu", "swish"):
        return (gelu if name == "gelu" else silu)(mult, constraint)
    if name == "softmax":
        return softmax(size, mult, constraint)
    if name in DERIVED:
        return {"relu": relu, "sigmoid": sigmoid, "tanh": tanh}[name](constraint)
    if _sampler is None:
        checks.one_of("activation", name, NAMES)
        raise ValueError(
            f"The rule of {name!r} is computed from Keras's function by `keras_unitscale.ops.activations`, "
            f"which is not loaded. Received: activation={name!r}"
        )
    return ElementwiseScales(*tie(constraint, *_sampler(name, size)))
