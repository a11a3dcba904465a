"""What several rules share: tying scales, logarithmic interpolation, Gaussian quadrature."""

import math

import numpy as np

from keras_unitscale import constraints as constraints_lib
from keras_unitscale.sizes import exp
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import log

__all__ = [
    "Constants", "sigmoid", "geometric_tail", "tie", "logarithmic_interpolation", "gaussian_mean", "gaussian_rms", "gaussian_nodes", "gaussian_grid",
    "gaussian_grid_rms",
]

# 201 Gauss-Hermite nodes integrate the smooth functions of a unit normal
# that the LSTM's mean field needs (products of tanh, sigmoid and their
# derivatives) to about 1e-12, in a few hundred evaluations.
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(201)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()
# An activation may have a kink or a step (relu, relu6, hard_sigmoid), where
# Gauss-Hermite is off by percents (relu's derivative: 5%). Gaussian-weighted
# sums on a fine uniform grid are as exact for smooth functions (1e-15 for
# tanh and sigmoid) and within 1e-4 at a step.
_GRID = np.linspace(-10.0, 10.0, 100_001)
_GRID_WEIGHTS = np.exp(-0.5 * _GRID**2)
_GRID_WEIGHTS = _GRID_WEIGHTS / _GRID_WEIGHTS.sum()


def tie(constraint, *scales):
    """The scales an op applies: its ideal `(output, *gradients)` tied by `constraint`.

    See `keras_unitscale.constraints`: a name, a callable, or None (each
    scale kept, on a cut edge).

    Examples:
        >>> tie("to_output_scale", 0.5, 0.25)
        (0.5, 0.5)
        >>> tie(None, 0.5, 0.25)
        (0.5, 0.25)
    """
    return constraints_lib.apply_constraint(constraint, *scales)


def logarithmic_interpolation(alpha, lower, upper):
    """Interpolates between `lower` and `upper` at a constant ratio.

    `exp(alpha * ln(upper) + (1 - alpha) * ln(lower))`: `lower` at
    `alpha = 0`, `upper` at `alpha = 1`. The calibrated rules of `gelu`,
    `silu`, `softmax` and attention use it to move between two analytic
    limits as their `mult` changes.

    Args:
        alpha: interpolation weight in [0, 1].
        lower: the value at `alpha = 0`, > 0.
        upper: the value at `alpha = 1`, > 0.

    Returns:
        The interpolated value (a float, or a scalar tensor when an input is
        one: a size known only at run time).

    Examples:
        >>> round(logarithmic_interpolation(0.5, 1 / 1000, 1 / 10), 6)
        0.01
    """
    if is_static(alpha, lower, upper):
        return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))
    return exp(alpha * log(upper) + (1 - alpha) * log(lower))


def gaussian_nodes():
    """Gauss-Hermite nodes `z` for expectations of smooth functions over z ~ N(0, 1) (see `gaussian_mean`)."""
    return _NODES


def gaussian_mean(values):
    """E[v(z)] for z ~ N(0, 1), given `values = v(gaussian_nodes())`.

    Examples:
        >>> z = gaussian_nodes()
        >>> round(gaussian_mean(z**2), 10)
        1.0
    """
    return float(np.sum(_WEIGHTS * values))


def gaussian_grid():
    """The fine uniform grid of `gaussian_rms`: a function sampled here is integrated by `gaussian_grid_rms`.

    For a function computed elsewhere (a Keras activation, evaluated by
    `keras_unitscale.ops.activations`) the values come in as an array.
    """
    return _GRID


def gaussian_grid_rms(values):
    """RMS of `v(z)` for z ~ N(0, 1), given `values = v(gaussian_grid())` (a scalar broadcasts).

    Examples:
        >>> round(gaussian_grid_rms(np.abs(gaussian_grid())) ** 2, 10)
        1.0
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size != 1 and values.shape != _GRID.shape:
        raise ValueError(
            f"`values` must be sampled on `gaussian_grid()`, shape {_GRID.shape}. Received: values.shape={values.shape}"
        )
    return math.sqrt(float(np.sum(_GRID_WEIGHTS * values**2)))


def gaussian_rms(fn):
    """RMS of `fn(z)` for z ~ N(0, 1), on a fine grid (exact to 1e-15 for smooth `fn`, 1e-4 at a step).

    Examples:
        >>> round(gaussian_rms(lambda z: np.maximum(z, 0.0)) ** 2, 10)  # relu: 1/2
        0.5
    """
    return gaussian_grid_rms(fn(_GRID))


class Constants:
    """Read-only named constants of a derived rule (`LSTMRule`, `GRURule`): a subclass lists them in `__slots__`."""

    __slots__ = ()

    def __init__(self, **values):
        for name in self.__slots__:
            object.__setattr__(self, name, float(values.pop(name)))
        if values:
            raise TypeError(f"Unknown {type(self).__name__} fields: {sorted(values)}")

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only.")

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name):.4g}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


def sigmoid(x):
    """The logistic function on NumPy arrays (the gates of the recurrent rules' mean fields)."""
    return 1.0 / (1.0 + np.exp(-x))


def geometric_tail(ratio):
    """Σ_{d ≥ 1} ratio^d, for |ratio| < 1: a lag correlation summed over every lag."""
    return ratio / (1.0 - ratio)
