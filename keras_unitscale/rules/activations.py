"""Rules of the elementwise ops: the activations and dropout.

Each returns `ElementwiseScales(output, grad)`: the forward scale of the
output and the backward scale of the input's gradient, tied by the
constraint where the edge needs it. The reference package `unit-scaling`
calibrates gelu, silu and softmax between two analytic limits; relu, tanh and
sigmoid, which it lacks, follow the general rule for an elementwise `f` on
x ~ N(0, 1): output × `1/RMS(f(x))`, gradient × `1/RMS(f'(x))`, so that both
have unit RMS for a unit-normal input and upstream gradient.
"""

import math
from typing import NamedTuple

import numpy as np

from keras_unitscale import checks
from keras_unitscale.rules.common import gaussian_rms
from keras_unitscale.rules.common import logarithmic_interpolation
from keras_unitscale.rules.common import tie
from keras_unitscale.sizes import power

__all__ = [
    "ElementwiseScales", "quadrature", "relu", "gelu", "silu", "silu_glu", "tanh", "sigmoid", "softmax",
    "dropout", "NAMES", "WITH_MULT", "by_name",
]


class ElementwiseScales(NamedTuple):
    output: float
    grad: float


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def quadrature(fn, derivative, constraint="to_output_scale"):
    """The general rule for an elementwise `fn`: `1/RMS(fn(z))` and `1/RMS(fn'(z))`, z ~ N(0, 1).

    Computed by `rules.common.gaussian_rms`, so a kink or a step (relu6,
    hard_sigmoid) is integrated as well as a smooth function.

    Args:
        fn: the function, on numpy arrays.
        derivative: its derivative, on numpy arrays.
        constraint: see `keras_unitscale.constraints`.

    Example:

    >>> [round(s, 4) for s in quadrature(np.tanh, lambda z: 1 - np.tanh(z) ** 2, constraint=None)]
    [1.5925, 1.4674]
    """
    return ElementwiseScales(*tie(constraint, 1.0 / gaussian_rms(fn), 1.0 / gaussian_rms(derivative)))


# Exact for relu: RMS(relu(z)) = RMS(relu'(z)) = 1/sqrt(2), He initialisation's factor.
_RELU = math.sqrt(2.0)
# Computed once, when the module loads.
_TANH = quadrature(np.tanh, lambda z: 1.0 - np.tanh(z) ** 2, constraint=None)
_SIGMOID = quadrature(_sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z)), constraint=None)
# The mult → ∞ limit of gelu's and silu's output rule: relu's standard deviation.
_RELU_STD_SCALE = (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5


def relu(constraint="to_output_scale"):
    """Output and gradient × `sqrt(2)` (exact; both scales are equal).

    This normalises the RMS, which decides what a low-precision format
    holds; the `mult → ∞` limit of the reference's gelu rule,
    `sqrt(2 / (1 - 1/π)) ≈ 1.713`, normalises the standard deviation.

    Example:

    >>> relu().output == 2**0.5
    True
    """
    return ElementwiseScales(*tie(constraint, _RELU, _RELU))


def _gelu_alpha(mult):
    return 1.0 / (1.0 + 0.25 / mult**2)  # = sigmoid(ln(4 mult²))


def gelu(mult=1.0, constraint="to_output_scale"):
    """The reference's calibrated rule: with `a = sigmoid(ln 4m²)`, output × `L(a, 2, sqrt(2/(1-1/π)))`, gradient × `L(a, 2, sqrt(2))`.

    `L` is `logarithmic_interpolation`; at `mult = 1`, ≈ 1.767 and 1.516.

    Example:

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

    Example:

    >>> round(silu(constraint=None).grad, 4)
    1.6818
    """
    checks.positive("mult", mult)
    output = logarithmic_interpolation(_gelu_alpha(mult), 2.0, _RELU_STD_SCALE)
    return ElementwiseScales(*tie(constraint, output, _silu_grad(mult)))


def silu_glu(mult=1.0):
    """`x * silu(gate)`: the output and both inputs' gradients × `L(sigmoid(ln m²), 2, sqrt(2))` (the reference's).

    Example:

    >>> round(silu_glu(), 4)
    1.6818
    """
    checks.positive("mult", mult)
    return _silu_grad(mult)


def tanh(constraint="to_output_scale"):
    """The general rule: output × ≈ 1.593, gradient × ≈ 1.467 (tied: 1.593).

    Example:

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

    Example:

    >>> [round(s, 3) for s in sigmoid(constraint=None)]
    [1.846, 4.723]
    """
    return ElementwiseScales(*tie(constraint, *_SIGMOID))


def softmax(n, mult=1.0, constraint="to_output_scale"):
    """The reference's, over `n` classes: with `a = 1/(1 + 4/m²)`, output × `L(a, n, sqrt(n))`, gradient × `L(a, n/m, sqrt(n/m))`.

    The output lies in [0, n]: from the flat limit, where each output is
    1/n, to the one-hot limit.

    Example:

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

    Example:

    >>> dropout(0.75)
    0.5
    """
    checks.rate("rate", rate)
    return (1.0 - rate) ** 0.5


# The activations a layer can name, and those taking u-μP's `mult`.
WITH_MULT = ("gelu", "silu", "swish", "softmax")
NAMES = ("linear", "gelu", "silu", "softmax", "swish", "relu", "sigmoid", "tanh")


def by_name(name, mult=1.0, constraint="to_output_scale", size=None):
    """The rule of the activation called `name` (one of `NAMES`); `size` is softmax's class count.

    Example:

    >>> by_name("relu").output == relu().output
    True
    """
    checks.one_of("activation", name, NAMES)
    if name == "linear":
        return ElementwiseScales(1.0, 1.0)
    if name in ("gelu", "silu", "swish"):
        return (gelu if name == "gelu" else silu)(mult, constraint)
    if name == "softmax":
        return softmax(size, mult, constraint)
    return {"relu": relu, "sigmoid": sigmoid, "tanh": tanh}[name](constraint)
