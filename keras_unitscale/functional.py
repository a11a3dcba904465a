"""Unit-scaled ops: each keeps its output and its gradients near unit scale.

Every op here follows one pattern: compute the ideal forward scale and the
ideal backward scale(s) for unit-scaled inputs, tie them with a constraint
where the edge needs it (`keras_unitscale.constraints`), then wrap the plain
`keras.ops` computation in `scale_bwd` on its inputs and `scale_fwd` on its
output. Each docstring states its rule; the rules and the u-μP paper's
reasoning behind them are tabulated in the README.

Tensors use Keras layouts: a dense kernel is `(fan_in, fan_out)`, attention
tensors are `(batch, seq, heads, head_dim)`.

Where the reference package `unit-scaling` 0.3.5 defines an op, the forward
values and gradients here are the same (the parity tests check it). The ops it
lacks (`relu`, `tanh`, `sigmoid`) have rules derived for unit-normal inputs;
see their docstrings.
"""

import math

import numpy as np
from keras import backend
from keras import ops
from keras import random

from keras_unitscale import constraints as constraints_lib
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled

__all__ = [
    "matmul",
    "dense",
    "dense_readout",
    "add",
    "dropout",
    "relu",
    "gelu",
    "silu",
    "silu_glu",
    "tanh",
    "sigmoid",
    "softmax",
    "embedding",
    "layer_norm",
    "rms_norm",
    "dot_product_attention",
    "cross_entropy",
    "mse",
    "residual_split",
    "residual_add",
    "residual_apply",
    "transformer_residual_scaling_rule",
    "logarithmic_interpolation",
]

_LOW_PRECISION = ("float16", "bfloat16")


# --- sizes and scale arithmetic -------------------------------------------
# A size is a Python int when the shape is static, and a scalar tensor only
# where TensorFlow traces with an unknown (None) dimension. The helpers below
# keep Python arithmetic whenever they can, so that scales stay constants.


def _is_static(*values):
    return all(isinstance(v, (int, float)) for v in values)


def _shape(x):
    """`x`'s shape: ints where static, float32 scalar tensors where not."""
    return tuple(
        dim if isinstance(dim, int) else ops.cast(dim, "float32") for dim in ops.shape(x)
    )


def _numel(x, axes=None):
    shape = _shape(x)
    dims = shape if axes is None else [shape[a] for a in axes]
    if _is_static(*dims):
        return math.prod(dims)
    size = 1
    for dim in dims:
        size = size * ops.cast(dim, "float32")
    return size


def _as_float(size):
    return float(size) if _is_static(size) else ops.cast(size, "float32")


def _power(size, exponent):
    if _is_static(size):
        return float(size) ** exponent
    return ops.power(ops.cast(size, "float32"), exponent)


def _log(value):
    return math.log(value) if _is_static(value) else ops.log(ops.cast(value, "float32"))


def logarithmic_interpolation(alpha, lower, upper):
    """Interpolates between `lower` and `upper` at a constant ratio.

    `exp(alpha * ln(upper) + (1 - alpha) * ln(lower))`: `lower` at
    `alpha = 0`, `upper` at `alpha = 1`. The calibrated rules of `gelu`,
    `silu`, `softmax` and `dot_product_attention` use it to move between two
    analytic limits as their `mult` changes.

    Args:
        alpha: interpolation weight in [0, 1].
        lower: the value at `alpha = 0`, > 0.
        upper: the value at `alpha = 1`, > 0.

    Returns:
        The interpolated value (a float, or a scalar tensor when an input is
        one).

    Example:

    >>> round(logarithmic_interpolation(0.5, 1 / 1000, 1 / 10), 6)
    0.01
    """
    if _is_static(alpha, lower, upper):
        return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))
    return ops.exp(alpha * _log(upper) + (1 - alpha) * _log(lower))


def _gaussian_rms(fn):
    """RMS of `fn(x)` for x ~ N(0, 1), by Gauss-Hermite quadrature (exact to ~1e-12)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(201)
    weights = weights / weights.sum()
    return float(np.sqrt(np.sum(weights * fn(nodes) ** 2)))


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# Rules for the activations the reference lacks, derived for x ~ N(0, 1):
# forward scale = 1 / RMS(f(x)), backward scale = 1 / RMS(f'(x)), so that both
# the output and the input gradient (for a unit-normal upstream gradient)
# have unit RMS. relu's are exact: RMS(relu(x)) = RMS(relu'(x)) = 1/sqrt(2).
_RELU_SCALE = math.sqrt(2.0)
_TANH_OUTPUT_SCALE = 1.0 / _gaussian_rms(np.tanh)
_TANH_GRAD_SCALE = 1.0 / _gaussian_rms(lambda x: 1.0 - np.tanh(x) ** 2)
_SIGMOID_OUTPUT_SCALE = 1.0 / _gaussian_rms(_np_sigmoid)
_SIGMOID_GRAD_SCALE = 1.0 / _gaussian_rms(
    lambda x: _np_sigmoid(x) * (1.0 - _np_sigmoid(x))
)


# --- argument checks --------------------------------------------------------


def _check_rank(name, x, min_rank, max_rank=None):
    rank = len(x.shape)
    if rank < min_rank or (max_rank is not None and rank > max_rank):
        if max_rank is None:
            expected = f"rank >= {min_rank}"
        elif max_rank == min_rank:
            expected = f"rank {min_rank}"
        else:
            expected = f"rank in [{min_rank}, {max_rank}]"
        raise ValueError(
            f"`{name}` must have {expected}. Received: {name}.shape={tuple(x.shape)}"
        )


def _check_dims_match(what, left_name, left_dim, right_name, right_dim):
    if _is_static(left_dim, right_dim) and left_dim != right_dim:
        raise ValueError(
            f"{what} do not match: {left_name}={left_dim} but {right_name}="
            f"{right_dim}."
        )


def _check_same_shape(what, left_name, left, right_name, right):
    left_shape, right_shape = _shape(left), _shape(right)
    if _is_static(*left_shape, *right_shape) and left_shape != right_shape:
        raise ValueError(
            f"{what}. Received: {left_name}.shape={left_shape}, "
            f"{right_name}.shape={right_shape}"
        )


def _check_non_negative(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
        value >= 0 and math.isfinite(value)
    ):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value!r}"
        )


def _check_positive(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
        value > 0 and math.isfinite(value)
    ):
        raise ValueError(
            f"`{name}` must be a finite number > 0. Received: {name}={value!r}"
        )


def _check_rate(rate):
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (
        0.0 <= rate < 1.0
    ):
        raise ValueError(f"`rate` must be in [0, 1). Received: rate={rate!r}")


def _to_tensor(x, name):
    if x is None:
        raise ValueError(f"`{name}` must be a tensor. Received: {name}=None")
    return ops.convert_to_tensor(x)


def _as_compute_dtype(weight, x):
    """Casts a weight to `x`'s dtype, as Keras autocasting would inside a layer."""
    weight = ops.convert_to_tensor(weight)
    if weight.dtype != x.dtype:
        weight = ops.cast(weight, x.dtype)
    return weight


def _elementwise(fn, x, output_scale, grad_scale, constraint):
    """Wraps an element-wise `fn` in its (constrained) forward and backward scales."""
    output_scale, grad_scale = constraints_lib.apply_constraint(
        constraint, output_scale, grad_scale
    )
    x = scale_bwd(x, grad_scale)
    return scale_fwd(fn(x), output_scale)


# --- linear ops -------------------------------------------------------------


def matmul(a, b, constraint="to_output_scale"):
    """A unit-scaled matrix product `a @ b`.

    Rule, for `a` of shape `(..., m, k)` and `b` of shape `(..., k, n)`:
    output × `k^-1/2`; gradient of `a` × `n^-1/2`; gradient of `b` ×
    `m^-1/2`. The constraint ties the three (by default all take `k^-1/2`).

    Args:
        a: left operand, rank >= 2.
        b: right operand, rank >= 2.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled product, shape `(..., m, n)`.

    Example:

    >>> import numpy as np
    >>> a = np.random.default_rng(0).normal(size=(64, 256)).astype("float32")
    >>> b = np.random.default_rng(1).normal(size=(256, 64)).astype("float32")
    >>> y = keras.ops.convert_to_numpy(matmul(a, b))
    >>> bool(0.9 < y.std() < 1.1)
    True
    """
    a = _to_tensor(a, "a")
    b = _to_tensor(b, "b")
    _check_rank("a", a, 2)
    _check_rank("b", b, 2)
    m, k = _shape(a)[-2:]
    k_b, n = _shape(b)[-2:]
    _check_dims_match("Inner dimensions", "a.shape[-1]", k, "b.shape[-2]", k_b)
    output_scale, a_grad_scale, b_grad_scale = constraints_lib.apply_constraint(
        constraint, _power(k, -0.5), _power(n, -0.5), _power(m, -0.5)
    )
    a = scale_bwd(a, a_grad_scale)
    b = scale_bwd(b, b_grad_scale)
    return scale_fwd(ops.matmul(a, b), output_scale)


def _check_scale_power(scale_power):
    if (
        not isinstance(scale_power, (tuple, list))
        or len(scale_power) != 3
        or not all(isinstance(p, (int, float)) for p in scale_power)
    ):
        raise ValueError(
            "`scale_power` must be three numbers (output, grad input, grad "
            f"weight). Received: scale_power={scale_power!r}"
        )


def dense(x, kernel, bias=None, constraint="to_output_scale", scale_power=(0.5, 0.5, 0.5)):
    """A unit-scaled dense (linear) layer: `(x @ kernel + bias) * scale`.

    Rule, for a kernel of shape `(fan_in, fan_out)` and
    `batch = size(x) / fan_in`: output × `fan_in^-p0`; gradient of `x` ×
    `fan_out^-p1`; gradients of `kernel` and `bias` × `batch^-p2`, where
    `(p0, p1, p2) = scale_power` (default 1/2 each). The constraint ties the
    output and input-gradient scales only: the weight gradients never meet
    another path, so their scale is free.

    Args:
        x: inputs, shape `(..., fan_in)`.
        kernel: weights, shape `(fan_in, fan_out)` (Keras's layout). Cast to
            `x`'s dtype when it differs.
        bias: optional, shape `(fan_out,)`.
        constraint: see `keras_unitscale.constraints`.
        scale_power: the powers `(p0, p1, p2)` above.

    Returns:
        The output, shape `(..., fan_out)`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(128, 512)).astype("float32")
    >>> w = np.random.default_rng(1).normal(size=(512, 64)).astype("float32")
    >>> y = keras.ops.convert_to_numpy(dense(x, w))
    >>> y.shape, bool(0.9 < y.std() < 1.1)
    ((128, 64), True)
    """
    x = _to_tensor(x, "x")
    kernel = _to_tensor(kernel, "kernel")
    _check_rank("x", x, 1)
    _check_rank("kernel", kernel, 2, 2)
    _check_scale_power(scale_power)
    fan_in, fan_out = _shape(kernel)
    _check_dims_match("Input and kernel", "x.shape[-1]", _shape(x)[-1], "kernel.shape[0]", fan_in)
    if bias is not None:
        bias = _to_tensor(bias, "bias")
        _check_rank("bias", bias, 1, 1)
        _check_dims_match("Bias and kernel", "bias.shape[0]", _shape(bias)[0], "kernel.shape[1]", fan_out)

    batch = _numel(x) / _as_float(fan_in)
    output_scale, grad_input_scale = constraints_lib.apply_constraint(
        constraint,
        _power(fan_in, -scale_power[0]),
        _power(fan_out, -scale_power[1]),
    )
    grad_weight_scale = _power(batch, -scale_power[2])

    x = scale_bwd(x, grad_input_scale)
    kernel = scale_bwd(_as_compute_dtype(kernel, x), grad_weight_scale)
    y = ops.matmul(x, kernel)
    if bias is not None:
        y = ops.add(y, scale_bwd(_as_compute_dtype(bias, x), grad_weight_scale))
    return scale_fwd(y, output_scale)


def dense_readout(x, kernel, bias=None, constraint=None):
    """A unit-scaled readout: the final dense layer, scaled by `1/fan_in`.

    Rule: as `dense` with `scale_power=(1, 1/2, 1/2)`: output × `fan_in^-1`
    (u-μP's readout multiplier, which keeps the logits from growing with
    width as training aligns the weights with their input); gradient of `x` ×
    `fan_out^-1/2`; weight gradients × `batch^-1/2`. Unconstrained by
    default: nothing follows the readout but the loss, so its edge is cut.

    Args:
        x: inputs, shape `(..., fan_in)`.
        kernel: weights, shape `(fan_in, fan_out)`.
        bias: optional, shape `(fan_out,)`.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The output, shape `(..., fan_out)`.

    Example:

    >>> import numpy as np
    >>> x = np.ones((2, 4), "float32")
    >>> keras.ops.convert_to_numpy(dense_readout(x, np.ones((4, 1), "float32"))).tolist()
    [[1.0], [1.0]]
    """
    return dense(x, kernel, bias, constraint=constraint, scale_power=(1.0, 0.5, 0.5))


def _broadcast_factor(shape, other_shape):
    """How many times each element of a `shape` tensor is reused when broadcast."""
    rank = max(len(shape), len(other_shape))
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    other_shape = (1,) * (rank - len(other_shape)) + tuple(other_shape)
    factor = 1
    for dim, other_dim in zip(shape, other_shape):
        if _is_static(dim) and dim == 1 and not (_is_static(other_dim) and other_dim == 1):
            factor = factor * (other_dim if _is_static(other_dim) else ops.cast(other_dim, "float32"))
    return factor


def add(a, b, constraint="to_output_scale"):
    """A unit-scaled sum `a + b` of two independent unit-scaled tensors.

    Rule: output × `2^-1/2` (× 1 when either operand is a scalar or has one
    element); the gradient of each operand × `1/sqrt(f)`, where `f` is how many
    times broadcasting reuses each of its elements (the gradient sums `f`
    terms). A Python number operand gives the plain sum.

    For a residual connection use `residual_split` / `residual_add`, which
    weight the two branches.

    Args:
        a: a tensor or a Python number.
        b: a tensor or a Python number.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled sum, with the broadcast shape.

    Example:

    >>> import numpy as np
    >>> y = add(np.ones((2,), "float32"), np.ones((2,), "float32"))
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
    [1.4142, 1.4142]
    """
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return ops.add(a, b)
    a = _to_tensor(a, "a")
    b = _to_tensor(b, "b")
    a_shape, b_shape = _shape(a), _shape(b)
    try:
        if _is_static(*a_shape, *b_shape):
            np.broadcast_shapes(a_shape, b_shape)
    except ValueError:
        raise ValueError(
            "`a` and `b` cannot be broadcast together. Received: "
            f"a.shape={a_shape}, b.shape={b_shape}"
        ) from None
    scalar_operand = any(
        _is_static(*shape) and math.prod(shape) == 1 for shape in (a_shape, b_shape)
    )
    output_scale = 1.0 if scalar_operand else 2**-0.5
    output_scale, a_grad_scale, b_grad_scale = constraints_lib.apply_constraint(
        constraint,
        output_scale,
        _power(_broadcast_factor(a_shape, b_shape), -0.5),
        _power(_broadcast_factor(b_shape, a_shape), -0.5),
    )
    a = scale_bwd(a, a_grad_scale)
    b = scale_bwd(b, b_grad_scale)
    return scale_fwd(ops.add(a, b), output_scale)


# --- element-wise ops -------------------------------------------------------


def dropout(x, rate, training=True, seed=None, noise_shape=None):
    """Unit-scaled dropout: the kept elements are scaled so the output stays at unit scale.

    Rule: plain (inverted) dropout, which divides by `1 - rate`, then ×
    `(1 - rate)^1/2` in both passes, so that the output and gradient keep unit
    variance rather than unit mean.

    Args:
        x: inputs.
        rate: the fraction dropped, in [0, 1).
        training: apply dropout (`True`) or return `x` unchanged.
        seed: a `keras.random.SeedGenerator` or an int, as for
            `keras.random.dropout`.
        noise_shape: as for `keras.random.dropout`.

    Returns:
        The tensor with dropped elements zeroed and the rest rescaled.

    Example:

    >>> import numpy as np
    >>> y = dropout(np.ones((4,), "float32"), 0.5, training=False)
    >>> keras.ops.convert_to_numpy(y).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    _check_rate(rate)
    x = _to_tensor(x, "x")
    if not training or rate == 0:
        return x
    scale = (1.0 - rate) ** 0.5
    return scaled(
        random.dropout(x, rate, noise_shape=noise_shape, seed=seed), scale, scale
    )


def relu(x, constraint="to_output_scale"):
    """A unit-scaled ReLU.

    Rule (derived; the reference has no relu): output × `sqrt(2)` and
    gradient × `sqrt(2)`. For x ~ N(0, 1), `RMS(relu(x)) = RMS(relu'(x)) =
    1/sqrt(2)`, so both come out at unit RMS — He initialisation's factor.
    This normalises the RMS, the quantity that decides what a low-precision
    format can hold. (The `mult → ∞` limit of the reference's gelu rule,
    `sqrt(2 / (1 - 1/π)) ≈ 1.713`, normalises the standard deviation instead
    and leaves the RMS at 1.21.)

    Args:
        x: inputs.
        constraint: see `keras_unitscale.constraints` (both scales are equal,
            so every constraint gives the same result).

    Returns:
        `sqrt(2) * relu(x)`.

    Example:

    >>> import numpy as np
    >>> y = relu(np.array([-1.0, 2.0], "float32"))
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
    [0.0, 2.8284]
    """
    return _elementwise(ops.relu, _to_tensor(x, "x"), _RELU_SCALE, _RELU_SCALE, constraint)


def _gelu_alpha(mult):
    return 1.0 / (1.0 + 0.25 / mult**2)  # = sigmoid(ln(4 mult^2))


def gelu(x, mult=1.0, constraint="to_output_scale", approximate=False):
    """A unit-scaled GELU, `gelu(mult * x) / mult`.

    Rule (the reference's, calibrated): with `a = sigmoid(ln(4 mult²))`,
    output × `L(a, 2, sqrt(2 / (1 - 1/π)))` and gradient ×
    `L(a, 2, sqrt(2))`, where `L` is `logarithmic_interpolation`. At
    `mult = 1` these are ≈ 1.767 and 1.516.

    Args:
        x: inputs.
        mult: the u-μP multiplier inside the nonlinearity, > 0.
        constraint: see `keras_unitscale.constraints`.
        approximate: use the tanh approximation (the reference's default is
            the exact form, as here).

    Returns:
        The scaled activation.

    Example:

    >>> import numpy as np
    >>> y = gelu(np.array([0.0], "float32"))
    >>> keras.ops.convert_to_numpy(y).tolist()
    [0.0]
    """
    _check_positive("mult", mult)
    alpha = _gelu_alpha(mult)
    output_scale = logarithmic_interpolation(alpha, 2.0, (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5)
    grad_scale = logarithmic_interpolation(alpha, 2.0, 2.0**0.5)

    def _gelu(inputs):
        if mult == 1:
            return ops.gelu(inputs, approximate=approximate)
        return ops.gelu(inputs * mult, approximate=approximate) / mult

    return _elementwise(_gelu, _to_tensor(x, "x"), output_scale, grad_scale, constraint)


def _silu(x, mult):
    return x * ops.sigmoid(x * mult) if mult != 1 else ops.silu(x)


def silu(x, mult=1.0, constraint="to_output_scale"):
    """A unit-scaled SiLU (swish), `x * sigmoid(mult * x)`.

    Rule (the reference's, calibrated): output × `L(sigmoid(ln 4m²), 2,
    sqrt(2 / (1 - 1/π)))`, gradient × `L(sigmoid(ln m²), 2, sqrt(2))`.

    Args:
        x: inputs.
        mult: the u-μP multiplier inside the nonlinearity, > 0.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled activation.

    Example:

    >>> import numpy as np
    >>> keras.ops.convert_to_numpy(silu(np.array([0.0], "float32"))).tolist()
    [0.0]
    """
    _check_positive("mult", mult)
    output_scale = logarithmic_interpolation(
        _gelu_alpha(mult), 2.0, (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5
    )
    grad_scale = logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)
    return _elementwise(
        lambda inputs: _silu(inputs, mult), _to_tensor(x, "x"), output_scale, grad_scale, constraint
    )


def silu_glu(x, gate, mult=1.0):
    """A unit-scaled gated linear unit `x * silu(gate)` (SwiGLU's nonlinearity).

    Rule (the reference's): with `s = L(sigmoid(ln m²), 2, sqrt(2))`, both
    inputs' gradients × `s` and the output × `s`.

    Args:
        x: the linear input.
        gate: the gate, same shape as `x`.
        mult: the u-μP multiplier inside the sigmoid, > 0.

    Returns:
        The scaled product, shape of `x`.

    Example:

    >>> import numpy as np
    >>> y = silu_glu(np.ones((1,), "float32"), np.zeros((1,), "float32"))
    >>> keras.ops.convert_to_numpy(y).tolist()
    [0.0]
    """
    _check_positive("mult", mult)
    x = _to_tensor(x, "x")
    gate = _to_tensor(gate, "gate")
    scale = logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)
    x = scale_bwd(x, scale)
    gate = scale_bwd(gate, scale)
    return scale_fwd(x * _silu(gate, mult), scale)


def tanh(x, constraint="to_output_scale"):
    """A unit-scaled tanh.

    Rule (derived; the reference has no tanh): output × `1/RMS(tanh(z))` ≈
    1.593 and gradient × `1/RMS(1 - tanh²(z))` ≈ 1.467, for z ~ N(0, 1),
    both computed by Gauss-Hermite quadrature when the module loads. With
    the default constraint both are 1.593, and the gradient's RMS is ≈ 1.09.

    Args:
        x: inputs.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled activation.

    Example:

    >>> import numpy as np
    >>> keras.ops.convert_to_numpy(tanh(np.array([0.0], "float32"))).tolist()
    [0.0]
    """
    return _elementwise(
        ops.tanh, _to_tensor(x, "x"), _TANH_OUTPUT_SCALE, _TANH_GRAD_SCALE, constraint
    )


def sigmoid(x, constraint="to_output_scale"):
    """A unit-scaled logistic sigmoid.

    Rule (derived; the reference has no sigmoid): output × `1/RMS(σ(z))` ≈
    1.846 and gradient × `1/RMS(σ'(z))` ≈ 4.723 for z ~ N(0, 1), by
    Gauss-Hermite quadrature. The output's RMS includes its mean of 1/2: a
    sigmoid's output is positive, and it is the RMS that decides whether a
    low-precision format holds it. With the default constraint both scales
    are 1.846 and the gradient's RMS is ≈ 0.39: σ' is at most 1/4, so a
    sigmoid on a non-cut edge cannot have both at unit scale. Pass
    `constraint=None` where the edge is cut (an LSTM's gates).

    Args:
        x: inputs.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled activation.

    Example:

    >>> import numpy as np
    >>> y = sigmoid(np.array([0.0], "float32"))
    >>> [round(v, 3) for v in keras.ops.convert_to_numpy(y).tolist()]
    [0.923]
    """
    return _elementwise(
        ops.sigmoid, _to_tensor(x, "x"), _SIGMOID_OUTPUT_SCALE, _SIGMOID_GRAD_SCALE, constraint
    )


def softmax(x, axis=-1, mult=1.0, constraint="to_output_scale"):
    """A unit-scaled softmax, `softmax(mult * x)`, whose output lies in [0, n].

    Rule (the reference's, calibrated), with `n = x.shape[axis]` and
    `a = 1 / (1 + 4/mult²)`: output × `L(a, n, sqrt(n))` (from the flat
    limit, where each output is 1/n, to the one-hot limit); gradient ×
    `L(a, n/mult, sqrt(n/mult))`.

    Args:
        x: logits.
        axis: the axis to normalise over.
        mult: the u-μP multiplier of the logits, > 0.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled probabilities.

    Example:

    >>> import numpy as np
    >>> y = softmax(np.zeros((4,), "float32"))  # 1/4 each, × 4^0.9
    >>> [round(v, 3) for v in keras.ops.convert_to_numpy(y).tolist()]
    [0.871, 0.871, 0.871, 0.871]
    """
    _check_positive("mult", mult)
    x = _to_tensor(x, "x")
    _check_rank("x", x, 1)
    n = _shape(x)[axis]
    alpha = 1.0 / (1.0 + 4.0 / mult**2)
    output_scale = logarithmic_interpolation(alpha, n, _power(n, 0.5))
    grad_scale = logarithmic_interpolation(alpha, n / mult, _power(n / mult, 0.5))
    return _elementwise(
        lambda logits: ops.softmax(logits * mult if mult != 1 else logits, axis=axis),
        x,
        output_scale,
        grad_scale,
        constraint,
    )


# --- embedding and normalisation --------------------------------------------


def embedding(ids, table):
    """A unit-scaled embedding lookup.

    Rule (the reference's): output × 1 (rows of a unit-variance table are
    already unit scale); gradient of `table` × `sqrt(vocab / num_tokens)`,
    since the gradient of a row sums over the tokens that chose it, about
    `num_tokens / vocab` of them.

    Args:
        ids: integer token ids, any shape.
        table: the embedding table, shape `(vocab, dim)`.

    Returns:
        The rows of `table`, shape `ids.shape + (dim,)`.

    Example:

    >>> import numpy as np
    >>> table = np.arange(6, dtype="float32").reshape(3, 2)
    >>> keras.ops.convert_to_numpy(embedding(np.array([2, 0]), table)).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """
    ids = _to_tensor(ids, "ids")
    table = _to_tensor(table, "table")
    _check_rank("table", table, 2, 2)
    if "int" not in _dtype(ids):
        raise ValueError(
            f"`ids` must have an integer dtype. Received: ids.dtype={_dtype(ids)}"
        )
    vocab = _shape(table)[0]
    grad_scale = _power(_as_float(vocab) / _as_float(_numel(ids)), 0.5)
    return ops.take(scale_bwd(table, grad_scale), ids, axis=0)


def _normalized_axes(x, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    rank = len(x.shape)
    normalized = []
    for a in axes:
        if not isinstance(a, int) or not -rank <= a < rank:
            raise ValueError(
                f"`axis` must name axes of `x` (rank {rank}). Received: axis={axis!r}"
            )
        normalized.append(a % rank)
    return tuple(sorted(set(normalized)))


def _affine_param(param, name, x, axes, grad_scale):
    """Scales an affine gain/bias's gradient and reshapes it to broadcast over `x`."""
    param = _to_tensor(param, name)
    shape = _shape(x)
    expected = tuple(shape[a] for a in axes)
    if _is_static(*expected) and math.prod(_shape(param)) != math.prod(expected):
        raise ValueError(
            f"`{name}` must have shape {expected} (the normalised axes of `x`). "
            f"Received: {name}.shape={tuple(_shape(param))}"
        )
    param = scale_bwd(param, grad_scale)
    dims = ops.shape(x)
    return ops.reshape(param, [dims[a] if a in axes else 1 for a in range(len(dims))])


def _dtype(x):
    return backend.standardize_dtype(x.dtype)


def _in_float32(x):
    return ops.cast(x, "float32") if _dtype(x) in _LOW_PRECISION else x


def layer_norm(x, gamma=None, beta=None, axis=-1, epsilon=1e-5):
    """Unit-scaled layer normalisation.

    Rule (the reference's): the output is normalised already (× 1); the
    gradients of the gain `gamma` and bias `beta` × `sqrt(norm_size / size(x))`
    = `1/sqrt(batch)`, as each sums over the batch. Statistics are computed
    in float32 when `x` is float16 or bfloat16.

    Args:
        x: inputs.
        gamma: optional gain, shape of the normalised axes.
        beta: optional bias, shape of the normalised axes.
        axis: an axis or a tuple of axes to normalise over.
        epsilon: added to the variance, >= 0.

    Returns:
        The normalised tensor, `x`'s shape and dtype.

    Example:

    >>> import numpy as np
    >>> y = layer_norm(np.array([[1.0, 3.0]], "float32"))
    >>> [round(v, 3) for v in keras.ops.convert_to_numpy(y)[0].tolist()]
    [-1.0, 1.0]
    """
    _check_non_negative("epsilon", epsilon)
    x = _to_tensor(x, "x")
    axes = _normalized_axes(x, axis)
    grad_scale = _power(_as_float(_numel(x, axes)) / _as_float(_numel(x)), 0.5)
    x32 = _in_float32(x)
    mean, variance = ops.moments(x32, axes=axes, keepdims=True)
    y = ops.cast((x32 - mean) * ops.rsqrt(variance + epsilon), x.dtype)
    if gamma is not None:
        y = y * _as_compute_dtype(_affine_param(gamma, "gamma", x, axes, grad_scale), y)
    if beta is not None:
        y = y + _as_compute_dtype(_affine_param(beta, "beta", x, axes, grad_scale), y)
    return y


def rms_norm(x, gamma=None, axis=-1, epsilon=1e-5):
    """Unit-scaled RMS normalisation, `x / sqrt(mean(x²) + epsilon) * gamma`.

    Rule (the reference's): output × 1; gradient of `gamma` ×
    `sqrt(norm_size / size(x))`. The RMS is computed in float32 when `x` is
    float16 or bfloat16.

    Args:
        x: inputs.
        gamma: optional gain, shape of the normalised axes.
        axis: an axis or a tuple of axes to normalise over.
        epsilon: added to the mean square, >= 0.

    Returns:
        The normalised tensor, `x`'s shape and dtype.

    Example:

    >>> import numpy as np
    >>> y = rms_norm(np.array([[3.0, 4.0]], "float32"), epsilon=0.0)
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y)[0].tolist()]
    [0.8485, 1.1314]
    """
    _check_non_negative("epsilon", epsilon)
    x = _to_tensor(x, "x")
    axes = _normalized_axes(x, axis)
    x32 = _in_float32(x)
    mean_square = ops.mean(ops.square(x32), axis=axes, keepdims=True)
    y = ops.cast(x32 * ops.rsqrt(mean_square + epsilon), x.dtype)
    if gamma is not None:
        grad_scale = _power(_as_float(_numel(x, axes)) / _as_float(_numel(x)), 0.5)
        y = y * _as_compute_dtype(_affine_param(gamma, "gamma", x, axes, grad_scale), y)
    return y


# --- attention --------------------------------------------------------------


def _attention_scale(head_dim, seq_len, mult, is_causal, dropout_rate):
    """The output/gradient scale of unit-scaled attention (the reference's rule)."""
    if is_causal:
        # Flat causal attention averages t values at position t: its output RMS
        # is about sqrt(ln(S) / S). One key is the exact case RMS = 1.
        if _is_static(seq_len):
            flat_mean_square = math.log(seq_len) / seq_len if seq_len > 1 else 1.0
        else:
            seq = ops.cast(seq_len, "float32")
            flat_mean_square = ops.where(seq > 1, ops.log(seq) / seq, 1.0)
    else:
        flat_mean_square = 1.0 / _as_float(seq_len)
    alpha = 1.0 / (1.0 + 4.0 * head_dim / mult**2)
    lower = (
        flat_mean_square**0.5
        if _is_static(flat_mean_square)
        else ops.sqrt(flat_mean_square)
    )
    return (1.0 - dropout_rate) ** 0.5 / logarithmic_interpolation(alpha, lower, 1.0)


def dot_product_attention(
    query,
    key,
    value,
    mask=None,
    is_causal=False,
    dropout_rate=0.0,
    mult=1.0,
    training=True,
    seed=None,
):
    """Unit-scaled dot-product attention, in Keras's `(batch, seq, heads, head_dim)` layout.

    Rule (the reference's, calibrated): logits are `mult / head_dim · q·k`
    (u-μP's `1/d`, not `1/sqrt(d)`, so that the logits do not grow as
    queries and keys align during training); the output and the gradients
    of `query`, `key` and `value` × `s`, with
    `s = sqrt(1 - p) / L(1 / (1 + 4·head_dim/mult²), sqrt(c / S), 1)`, where
    `S` is the key length, `c = ln S` for causal attention and 1 otherwise,
    and `p` the dropout rate. The fused `keras.ops.dot_product_attention` is
    used when no dropout applies.

    Args:
        query: `(batch, T, heads, head_dim)`.
        key: `(batch, S, heads, head_dim)`.
        value: `(batch, S, heads, value_dim)`.
        mask: optional boolean mask broadcastable to `(batch, heads, T, S)`;
            `True` attends.
        is_causal: apply a causal mask (and the causal scale).
        dropout_rate: dropout on the attention probabilities, in [0, 1).
        mult: the u-μP multiplier of the logits, > 0.
        training: whether dropout applies.
        seed: for the dropout, as for `keras.random.dropout`.

    Returns:
        `(batch, T, heads, value_dim)`.

    Example:

    >>> import numpy as np
    >>> q = np.random.default_rng(0).normal(size=(2, 8, 2, 16)).astype("float32")
    >>> tuple(dot_product_attention(q, q, q, is_causal=True).shape)
    (2, 8, 2, 16)
    """
    _check_positive("mult", mult)
    _check_rate(dropout_rate)
    query = _to_tensor(query, "query")
    key = _to_tensor(key, "key")
    value = _to_tensor(value, "value")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, tensor, 4, 4)
    _check_dims_match("Head sizes", "query.shape[-1]", _shape(query)[-1], "key.shape[-1]", _shape(key)[-1])
    _check_dims_match("Key and value lengths", "key.shape[1]", _shape(key)[1], "value.shape[1]", _shape(value)[1])
    head_dim = _shape(query)[-1]
    seq_len = _shape(key)[1]
    applies_dropout = bool(training) and dropout_rate > 0
    scale = _attention_scale(
        head_dim, seq_len, mult, is_causal, dropout_rate if applies_dropout else 0.0
    )
    query, key, value = (scale_bwd(t, scale) for t in (query, key, value))
    logit_scale = mult / head_dim
    if not applies_dropout:
        out = ops.dot_product_attention(
            query, key, value, mask=mask, scale=logit_scale, is_causal=is_causal
        )
    else:
        out = _attention_with_dropout(
            query, key, value, mask, is_causal, logit_scale, dropout_rate, seed
        )
    return scale_fwd(out, scale)


def _attention_with_dropout(query, key, value, mask, is_causal, logit_scale, rate, seed):
    logits = ops.einsum("btnh,bsnh->bnts", query, key) * ops.cast(logit_scale, query.dtype)
    if is_causal:
        t, s = ops.shape(query)[1], ops.shape(key)[1]
        causal = ops.tril(ops.ones((t, s), dtype="bool"), s - t if _is_static(s, t) else 0)
        mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)
    if mask is not None:
        neg = ops.cast(-3e4 if _dtype(logits) == "float16" else -1e9, logits.dtype)
        logits = ops.where(ops.cast(mask, "bool"), logits, neg)
    probs = ops.cast(ops.softmax(_in_float32(logits), axis=-1), value.dtype)
    probs = random.dropout(probs, rate, seed=seed)
    return ops.einsum("bnts,bsnh->btnh", probs, value)


# --- losses -----------------------------------------------------------------


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"`reduction` must be 'mean' or 'sum'. Received: reduction={reduction!r}"
        )


def cross_entropy(logits, labels, mult=1.0, reduction="mean"):
    """Unit-scaled softmax cross-entropy, for integer labels or probability targets.

    Rule (the reference's): logits × `mult` in the forward pass only; their
    gradient × `V / sqrt(V - 1)` for `V` classes (the gradient
    `softmax - target` has RMS about `sqrt(V-1)/V` per example). The loss is
    summed, then × `1/batch` in the forward pass only: the reported value is
    the usual mean, but its gradient is not divided by the batch size (the
    weight-gradient rules divide by `sqrt(batch)` instead).

    Args:
        logits: `(..., V)`, V >= 2.
        labels: integer class ids of shape `logits.shape[:-1]`, or targets
            (one-hot or probabilities) of shape `logits.shape`.
        mult: the u-μP multiplier of the logits, > 0.
        reduction: `"mean"` (over all positions) or `"sum"`.

    Returns:
        A scalar loss in float32 (float64 for float64 logits).

    Example:

    >>> import numpy as np
    >>> loss = cross_entropy(np.zeros((2, 4), "float32"), np.array([0, 3]))
    >>> round(float(keras.ops.convert_to_numpy(loss)), 4)  # ln 4
    1.3863
    """
    _check_positive("mult", mult)
    _check_reduction(reduction)
    logits = _to_tensor(logits, "logits")
    labels = _to_tensor(labels, "labels")
    _check_rank("logits", logits, 1)
    vocab = _shape(logits)[-1]
    if _is_static(vocab) and vocab < 2:
        raise ValueError(
            "`logits` must have at least 2 classes on its last axis. "
            f"Received: logits.shape={tuple(_shape(logits))}"
        )
    logits = scale_bwd(logits, _as_float(vocab) * _power(_as_float(vocab) - 1.0, -0.5))
    logits = scale_fwd(logits, mult)
    log_probs = ops.log_softmax(_in_float32(logits), axis=-1)
    if "int" in _dtype(labels):
        label_shape, logit_shape = _shape(labels), _shape(logits)
        if _is_static(*label_shape, *logit_shape) and label_shape != logit_shape[:-1]:
            raise ValueError(
                "Integer `labels` must have shape logits.shape[:-1]. Received: "
                f"labels.shape={label_shape}, logits.shape={logit_shape}"
            )
        picked = ops.take_along_axis(log_probs, ops.expand_dims(labels, -1), axis=-1)
        loss = -ops.sum(picked)
    else:
        _check_same_shape(
            "Target `labels` (probabilities) must have the shape of `logits`",
            "labels", labels, "logits", logits,
        )
        loss = -ops.sum(ops.cast(labels, log_probs.dtype) * log_probs)
    if reduction == "sum":
        return loss
    return scale_fwd(loss, 1.0 / (_numel(logits) / _as_float(vocab)))


def mse(y_pred, y_true, reduction="mean"):
    """Unit-scaled mean squared error.

    Rule (the reference's): the gradients of both inputs × `8^-1/2` (the
    gradient `2(p - t)` of unit-scaled, independent `p` and `t` has RMS
    `sqrt(8)`); the loss is summed, then × `1/size` in the forward pass only.

    Args:
        y_pred: predictions.
        y_true: targets, the same shape.
        reduction: `"mean"` or `"sum"`.

    Returns:
        A scalar loss.

    Example:

    >>> import numpy as np
    >>> loss = mse(np.array([1.0, 3.0], "float32"), np.zeros((2,), "float32"))
    >>> float(keras.ops.convert_to_numpy(loss))
    5.0
    """
    _check_reduction(reduction)
    y_pred = _to_tensor(y_pred, "y_pred")
    y_true = _to_tensor(y_true, "y_true")
    _check_same_shape(
        "`y_pred` and `y_true` must have the same shape", "y_pred", y_pred, "y_true", y_true
    )
    grad_scale = 8**-0.5
    y_pred = scale_bwd(y_pred, grad_scale)
    y_true = scale_bwd(ops.cast(y_true, y_pred.dtype), grad_scale)
    loss = ops.sum(ops.square(y_pred - y_true))
    if reduction == "sum":
        return loss
    return scale_fwd(loss, 1.0 / _as_float(_numel(y_pred)))


# --- residual connections ---------------------------------------------------


def _tau_weights(tau):
    _check_non_negative("tau", tau)
    denominator = (1.0 + tau**2) ** 0.5
    return tau / denominator, 1.0 / denominator


def residual_split(x, tau=1.0):
    """Splits `x` into a residual-branch input and a skip input, before a residual block.

    Rule: forward × 1 for both; backward × `tau / sqrt(1 + tau²)` on the
    residual branch and × `1 / sqrt(1 + tau²)` on the skip, so that the
    gradient arriving at `x` (the sum of the two) has unit scale. Pair it with
    `residual_add` and the same `tau`.

    Args:
        x: the block's input.
        tau: the weight of the residual branch relative to the skip, >= 0.

    Returns:
        `(residual, skip)`, both equal to `x` in the forward pass.

    Example:

    >>> import numpy as np
    >>> residual, skip = residual_split(np.ones((1,), "float32"), tau=0.5)
    >>> keras.ops.convert_to_numpy(residual).tolist()
    [1.0]
    """
    residual_weight, skip_weight = _tau_weights(tau)
    x = _to_tensor(x, "x")
    return scale_bwd(x, residual_weight), scale_bwd(x, skip_weight)


def residual_add(residual, skip, tau=1.0):
    """Joins a residual branch and its skip: `(tau·residual + skip) / sqrt(1 + tau²)`.

    Rule: forward × `tau / sqrt(1 + tau²)` on the residual and ×
    `1 / sqrt(1 + tau²)` on the skip (unit scale out for unit scale in);
    backward × 1, since `residual_split` applied the backward weights.

    Args:
        residual: the output of the residual branch.
        skip: the skip tensor from `residual_split`.
        tau: the weight of the residual branch relative to the skip, >= 0.

    Returns:
        The joined tensor.

    Example:

    >>> import numpy as np
    >>> y = residual_add(np.ones((1,), "float32"), np.ones((1,), "float32"), tau=1.0)
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
    [1.4142]
    """
    residual_weight, skip_weight = _tau_weights(tau)
    residual = _to_tensor(residual, "residual")
    skip = _to_tensor(skip, "skip")
    return ops.add(scale_fwd(residual, residual_weight), scale_fwd(skip, skip_weight))


def residual_apply(fn, x, tau=1.0):
    """Applies a residual block: `residual_add(fn(residual), skip, tau)`.

    Args:
        fn: the residual branch, a callable on one tensor.
        x: the block's input.
        tau: the weight of the residual branch relative to the skip, >= 0.

    Returns:
        The block's output.

    Example:

    >>> import numpy as np
    >>> y = residual_apply(lambda t: t * 0.0, np.ones((1,), "float32"), tau=1.0)
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
    [0.7071]
    """
    if not callable(fn):
        raise ValueError(f"`fn` must be callable. Received: fn={fn!r}")
    residual, skip = residual_split(x, tau)
    return residual_add(fn(residual), skip, tau)


def transformer_residual_scaling_rule(residual_mult=1.0, residual_attn_ratio=1.0):
    """u-μP's depth rule: the `tau` of each residual branch of a pre-norm transformer.

    For a stack that starts with an embedding and alternates attention and
    MLP branches (branch `index` 0, 2, 4, … attention; 1, 3, 5, … MLP; `layers`
    branches, two per block), it makes every attention branch contribute the
    same variance, every MLP branch the same, their totals relative to the
    embedding `residual_mult`, and attention relative to MLP
    `residual_attn_ratio`. With `α_mlp = residual_mult·sqrt(2 / (1 + ratio²))`,
    `α_attn = ratio·α_mlp` and `n_attn`, `n_mlp` the branches before `index`:
    `tau = α / sqrt(layers/2 + n_attn·α_attn² + n_mlp·α_mlp²)`.

    Args:
        residual_mult: contribution of the residual branches relative to the
            embedding, > 0.
        residual_attn_ratio: contribution of attention relative to MLP, > 0.

    Returns:
        `tau(index, layers)`, for `0 <= index < layers`.

    Example:

    >>> rule = transformer_residual_scaling_rule()
    >>> [round(rule(i, 8), 3) for i in range(3)]
    [0.5, 0.447, 0.408]
    """
    _check_positive("residual_mult", residual_mult)
    _check_positive("residual_attn_ratio", residual_attn_ratio)
    alpha_mlp = residual_mult * (2.0 / (1.0 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp

    def tau(index, layers):
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"`layers` must be an integer >= 1. Received: layers={layers!r}")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < layers:
            raise ValueError(
                f"`index` must be an integer in [0, layers={layers}). Received: index={index!r}"
            )
        n_attn = (index + 1) // 2
        n_mlp = index // 2
        alpha = alpha_attn if index % 2 == 0 else alpha_mlp
        return alpha / (layers / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5

    return tau
