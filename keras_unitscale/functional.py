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

from keras_unitscale import checks
from keras_unitscale import constraints as constraints_lib
from keras_unitscale import precision
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import log
from keras_unitscale.sizes import numel
from keras_unitscale.sizes import power
from keras_unitscale.sizes import replicas
from keras_unitscale.sizes import shape as shape_of

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
    "cross_entropy_grad_scale",
    "mse",
    "MSE_GRAD_SCALE",
    "residual_split",
    "residual_add",
    "residual_apply",
    "transformer_residual_scaling_rule",
    "logarithmic_interpolation",
    # recurrent
    "LSTMRule",
    "lstm_rule",
    "lstm_weights",
    "lstm_inputs",
    "lstm_hidden_in",
    "lstm_hidden_out",
    "lstm_dropout",
    "lstm_cell",
]

_LOW_PRECISION = ("float16", "bfloat16")


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
    if is_static(alpha, lower, upper):
        return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))
    return ops.exp(alpha * log(upper) + (1 - alpha) * log(lower))


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
    if is_static(left_dim, right_dim) and left_dim != right_dim:
        raise ValueError(
            f"{what} do not match: {left_name}={left_dim} but {right_name}="
            f"{right_dim}."
        )


def _check_same_shape(what, left_name, left, right_name, right):
    left_shape, right_shape = shape_of(left), shape_of(right)
    if is_static(*left_shape, *right_shape) and left_shape != right_shape:
        raise ValueError(
            f"{what}. Received: {left_name}.shape={left_shape}, "
            f"{right_name}.shape={right_shape}"
        )


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
    if output_scale is grad_scale or (is_static(output_scale, grad_scale) and output_scale == grad_scale):
        # One scale for both passes is an ordinary multiplication of the
        # output: the same values and gradients, without two custom gradients.
        return scaled(fn(x), output_scale, output_scale)
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
    m, k = shape_of(a)[-2:]
    k_b, n = shape_of(b)[-2:]
    _check_dims_match("Inner dimensions", "a.shape[-1]", k, "b.shape[-2]", k_b)
    output_scale, a_grad_scale, b_grad_scale = constraints_lib.apply_constraint(
        constraint, power(k, -0.5), power(n, -0.5), power(m, -0.5)
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


def dense(x, kernel, bias=None, constraint="to_output_scale", scale_power=(0.5, 0.5, 0.5), fp8=False):
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
        fp8: a scale-free FP8 matmul: `x` and `kernel` cast to E4M3, the
            gradient of the product to E5M2 (`keras_unitscale.precision`).

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
    fan_in, fan_out = shape_of(kernel)
    _check_dims_match("Input and kernel", "x.shape[-1]", shape_of(x)[-1], "kernel.shape[0]", fan_in)
    if bias is not None:
        bias = _to_tensor(bias, "bias")
        _check_rank("bias", bias, 1, 1)
        _check_dims_match("Bias and kernel", "bias.shape[0]", shape_of(bias)[0], "kernel.shape[1]", fan_out)

    batch = numel(x) / as_float(fan_in) * replicas()  # the global batch (see `sizes.replicas`)
    output_scale, grad_input_scale = constraints_lib.apply_constraint(
        constraint,
        power(fan_in, -scale_power[0]),
        power(fan_out, -scale_power[1]),
    )
    grad_weight_scale = power(batch, -scale_power[2])

    x = scale_bwd(x, grad_input_scale)
    kernel = scale_bwd(_as_compute_dtype(kernel, x), grad_weight_scale)
    y = _matmul(x, kernel, fp8)
    if bias is not None:
        y = ops.add(y, scale_bwd(_as_compute_dtype(bias, x), grad_weight_scale))
    return scale_fwd(y, output_scale)


def _matmul(a, b, fp8):
    """`a @ b`; with `fp8`, on E4M3 inputs and with an E5M2 output gradient (no scales: the ops keep unit scale)."""
    if not fp8:
        return ops.matmul(a, b)
    a, b = precision.cast_inputs(a, b)
    return precision.cast_output_gradient(ops.matmul(a, b))


def dense_readout(x, kernel, bias=None, constraint=None, fp8=False):
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
        fp8: as for `dense`.

    Returns:
        The output, shape `(..., fan_out)`.

    Example:

    >>> import numpy as np
    >>> x = np.ones((2, 4), "float32")
    >>> keras.ops.convert_to_numpy(dense_readout(x, np.ones((4, 1), "float32"))).tolist()
    [[1.0], [1.0]]
    """
    return dense(x, kernel, bias, constraint=constraint, scale_power=(1.0, 0.5, 0.5), fp8=fp8)


def _broadcast_factor(shape, other_shape):
    """How many times each element of a `shape` tensor is reused when broadcast."""
    rank = max(len(shape), len(other_shape))
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    other_shape = (1,) * (rank - len(other_shape)) + tuple(other_shape)
    factor = 1
    for dim, other_dim in zip(shape, other_shape):
        if is_static(dim) and dim == 1 and not (is_static(other_dim) and other_dim == 1):
            factor = factor * (other_dim if is_static(other_dim) else ops.cast(other_dim, "float32"))
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
    a_shape, b_shape = shape_of(a), shape_of(b)
    try:
        if is_static(*a_shape, *b_shape):
            np.broadcast_shapes(a_shape, b_shape)
    except ValueError:
        raise ValueError(
            "`a` and `b` cannot be broadcast together. Received: "
            f"a.shape={a_shape}, b.shape={b_shape}"
        ) from None
    scalar_operand = any(
        is_static(*shape) and math.prod(shape) == 1 for shape in (a_shape, b_shape)
    )
    output_scale = 1.0 if scalar_operand else 2**-0.5
    output_scale, a_grad_scale, b_grad_scale = constraints_lib.apply_constraint(
        constraint,
        output_scale,
        power(_broadcast_factor(a_shape, b_shape), -0.5),
        power(_broadcast_factor(b_shape, a_shape), -0.5),
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
    checks.rate("rate", rate)
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
    checks.positive("mult", mult)
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
    checks.positive("mult", mult)
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
    checks.positive("mult", mult)
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
    checks.positive("mult", mult)
    x = _to_tensor(x, "x")
    _check_rank("x", x, 1)
    n = shape_of(x)[axis]
    alpha = 1.0 / (1.0 + 4.0 / mult**2)
    output_scale = logarithmic_interpolation(alpha, n, power(n, 0.5))
    grad_scale = logarithmic_interpolation(alpha, n / mult, power(n / mult, 0.5))
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
    vocab = shape_of(table)[0]
    grad_scale = power(as_float(vocab) / as_float(numel(ids) * replicas()), 0.5)
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
    shape = shape_of(x)
    expected = tuple(shape[a] for a in axes)
    if is_static(*expected) and math.prod(shape_of(param)) != math.prod(expected):
        raise ValueError(
            f"`{name}` must have shape {expected} (the normalised axes of `x`). "
            f"Received: {name}.shape={tuple(shape_of(param))}"
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
    checks.non_negative("epsilon", epsilon)
    x = _to_tensor(x, "x")
    axes = _normalized_axes(x, axis)
    grad_scale = power(as_float(numel(x, axes)) / as_float(numel(x) * replicas()), 0.5)
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
    checks.non_negative("epsilon", epsilon)
    x = _to_tensor(x, "x")
    axes = _normalized_axes(x, axis)
    x32 = _in_float32(x)
    mean_square = ops.mean(ops.square(x32), axis=axes, keepdims=True)
    y = ops.cast(x32 * ops.rsqrt(mean_square + epsilon), x.dtype)
    if gamma is not None:
        grad_scale = power(as_float(numel(x, axes)) / as_float(numel(x) * replicas()), 0.5)
        y = y * _as_compute_dtype(_affine_param(gamma, "gamma", x, axes, grad_scale), y)
    return y


# --- attention --------------------------------------------------------------


def _attention_scale(head_dim, seq_len, mult, is_causal, dropout_rate):
    """The output/gradient scale of unit-scaled attention (the reference's rule)."""
    if is_causal:
        # Flat causal attention averages t values at position t: its output RMS
        # is about sqrt(ln(S) / S). One key is the exact case RMS = 1.
        if is_static(seq_len):
            flat_mean_square = math.log(seq_len) / seq_len if seq_len > 1 else 1.0
        else:
            seq = ops.cast(seq_len, "float32")
            flat_mean_square = ops.where(seq > 1, ops.log(seq) / seq, 1.0)
    else:
        flat_mean_square = 1.0 / as_float(seq_len)
    alpha = 1.0 / (1.0 + 4.0 * head_dim / mult**2)
    lower = (
        flat_mean_square**0.5
        if is_static(flat_mean_square)
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
    return_attention_scores=False,
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
        return_attention_scores: also return the attention probabilities
            (runs the unfused computation).

    Returns:
        `(batch, T, heads, value_dim)`; with `return_attention_scores`, a
        tuple of it and the probabilities `(batch, heads, T, S)`.

    Example:

    >>> import numpy as np
    >>> q = np.random.default_rng(0).normal(size=(2, 8, 2, 16)).astype("float32")
    >>> tuple(dot_product_attention(q, q, q, is_causal=True).shape)
    (2, 8, 2, 16)
    """
    checks.positive("mult", mult)
    checks.rate("dropout_rate", dropout_rate)
    query = _to_tensor(query, "query")
    key = _to_tensor(key, "key")
    value = _to_tensor(value, "value")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        _check_rank(name, tensor, 4, 4)
    _check_dims_match("Head sizes", "query.shape[-1]", shape_of(query)[-1], "key.shape[-1]", shape_of(key)[-1])
    _check_dims_match("Key and value lengths", "key.shape[1]", shape_of(key)[1], "value.shape[1]", shape_of(value)[1])
    head_dim = shape_of(query)[-1]
    seq_len = shape_of(key)[1]
    applies_dropout = bool(training) and dropout_rate > 0
    scale = _attention_scale(
        head_dim, seq_len, mult, is_causal, dropout_rate if applies_dropout else 0.0
    )
    query, key, value = (scale_bwd(t, scale) for t in (query, key, value))
    logit_scale = mult / head_dim
    if applies_dropout or return_attention_scores:
        out, probs = _attention_unfused(
            query, key, value, mask, is_causal, logit_scale,
            dropout_rate if applies_dropout else 0.0, seed,
        )
        if return_attention_scores:
            return scale_fwd(out, scale), probs
    else:
        out = ops.dot_product_attention(
            query, key, value, mask=mask, scale=logit_scale, is_causal=is_causal
        )
    return scale_fwd(out, scale)


def _attention_unfused(query, key, value, mask, is_causal, logit_scale, rate, seed):
    """Attention with its probabilities exposed (and dropout on them where `rate > 0`)."""
    logits = ops.einsum("btnh,bsnh->bnts", query, key) * ops.cast(logit_scale, query.dtype)
    if is_causal:
        # Aligned at the top left, as keras.ops.dot_product_attention does.
        causal = ops.tril(ops.ones((ops.shape(query)[1], ops.shape(key)[1]), dtype="bool"))
        mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)
    if mask is not None:
        neg = ops.cast(-3e4 if _dtype(logits) == "float16" else -1e9, logits.dtype)
        logits = ops.where(ops.cast(mask, "bool"), logits, neg)
    probs = ops.cast(ops.softmax(_in_float32(logits), axis=-1), value.dtype)
    kept = random.dropout(probs, rate, seed=seed) if rate > 0 else probs
    return ops.einsum("bnts,bsnh->btnh", kept, value), probs


# --- losses -----------------------------------------------------------------


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"`reduction` must be 'mean' or 'sum'. Received: reduction={reduction!r}"
        )


MSE_GRAD_SCALE = 8**-0.5
"""The backward scale of both inputs of `mse`: `2(p - t)` for unit `p`, `t` has RMS `sqrt(8)`."""


def cross_entropy_grad_scale(num_classes):
    """The backward scale of cross-entropy's logits, `V / sqrt(V - 1)` for `V` classes.

    The gradient `softmax - target` of one example has RMS `sqrt(V - 1) / V`
    when the softmax is flat.

    Example:

    >>> cross_entropy_grad_scale(2)
    2.0
    """
    return as_float(num_classes) * power(as_float(num_classes) - 1.0, -0.5)


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
    checks.positive("mult", mult)
    _check_reduction(reduction)
    logits = _to_tensor(logits, "logits")
    labels = _to_tensor(labels, "labels")
    _check_rank("logits", logits, 1)
    vocab = shape_of(logits)[-1]
    if is_static(vocab) and vocab < 2:
        raise ValueError(
            "`logits` must have at least 2 classes on its last axis. "
            f"Received: logits.shape={tuple(shape_of(logits))}"
        )
    logits = scale_bwd(logits, cross_entropy_grad_scale(vocab))
    logits = scale_fwd(logits, mult)
    log_probs = ops.log_softmax(_in_float32(logits), axis=-1)
    if "int" in _dtype(labels):
        label_shape, logit_shape = shape_of(labels), shape_of(logits)
        if is_static(*label_shape, *logit_shape) and label_shape != logit_shape[:-1]:
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
    return scale_fwd(loss, 1.0 / (numel(logits) / as_float(vocab)))


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
    y_pred = scale_bwd(y_pred, MSE_GRAD_SCALE)
    y_true = scale_bwd(ops.cast(y_true, y_pred.dtype), MSE_GRAD_SCALE)
    loss = ops.sum(ops.square(y_pred - y_true))
    if reduction == "sum":
        return loss
    return scale_fwd(loss, 1.0 / as_float(numel(y_pred)))


# --- residual connections ---------------------------------------------------


def _tau_weights(tau):
    checks.non_negative("tau", tau)
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
    checks.positive("residual_mult", residual_mult)
    checks.positive("residual_attn_ratio", residual_attn_ratio)
    alpha_mlp = residual_mult * (2.0 / (1.0 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp

    def tau(index, layers):
        checks.positive_int("layers", layers)
        checks.index("index", index, layers, "layers")
        n_attn = (index + 1) // 2
        n_mlp = index // 2
        alpha = alpha_attn if index % 2 == 0 else alpha_mlp
        return alpha / (layers / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5

    return tau


# --- recurrent: the unit-scaled LSTM ----------------------------------------
#
# The reference package has no recurrent layer; this rule is ours. Notation,
# for inputs x_t of width D (`input_dim`), H units and a unit-normal kernel W
# (D, 4H), recurrent kernel U (H, 4H) and bias b (4H,) (gate order i, f, g, o
# as in Keras):
#
#   z_t = D^-1/2 · x_t W  +  H^-1/2 · h̃_{t-1} U  +  b
#   i, f, o = sigmoid(z_i, z_f, z_o),   g = tanh(z_g)      (plain gates)
#   c_t = f·c_{t-1} + i·g,   h̃_t = o·tanh(c_t),   h_t = s·h̃_t
#
# h̃ is the hidden state of a plain LSTM with these pre-activations; the layer
# outputs (and carries as its state) the unit-scaled h = s·h̃. Both forward
# multipliers are the dense rule on the tensor they multiply: x is unit
# scale, so its term is unit; h̃ is not (RMS ≈ 0.23), and feeding back s·h̃
# at unit scale instead makes the recurrence chaotic (measured: gradients
# grow ×10⁷ over 256 steps), whereas H^-1/2 on h̃ matches the gain of Keras's
# orthogonal recurrent initialiser and keeps the gradient stationary in time.
#
# Everything else follows from a mean-field calculation (`_lstm_mean_field`):
# pre-activations Gaussian with variance q² = 1 + r_h², gates independent of
# each other and of the past, the cell state at its stationary RMS. That gives
# the hidden RMS r_h (hence s = 1/r_h) and the RMS ĝ of the gradient of the
# pre-activations when a unit-normal gradient arrives at every output h_t.
# The weight gradients then follow: ∂L/∂W_eff = Σ_{batch,t} x_t^T ∂z_t sums
# n = batch·m terms, where m is the number of steps the upstream gradient
# reaches (T with return_sequences, else 1; a single injected gradient
# spreads over ~1/(1 - E[f²]) ≈ 2 steps, so its energy equals one step of
# the stationary sum). Terms of the recurrent-kernel and bias sums are
# correlated in time through the cell state; the factors κ_U and κ_b for
# that are derived in the same mean field, from the lag-d correlation
# E[f]^d of the cell-state gradient. Gauss-Hermite quadrature evaluates it
# all for the given forget-gate bias (1 with Keras's `unit_forget_bias`).
#
# Calibration: a JAX simulation of exactly this recurrence (batch 32, T in
# {16, 64, 256}, (D, H) in {(32, 64), (128, 256)}, unit-normal x, weights
# and upstream gradients) measured r_h = 0.221-0.229 (mean field 0.225),
# ĝ/s = 0.145-0.151 (0.146), κ_b = 1.71-2.24 (1.83) and κ_U = 1.25-1.44
# (1.35) with forget bias 1; r_h = 0.193-0.196 (0.194), ĝ/s = 0.124-0.126
# (0.124), κ_b ≈ 1.5 (1.43), κ_U = 1.08-1.17 (1.14) with forget bias 0. The
# mean field is used as is: no fitted correction was needed.
#
# Scales, with n = batch·m:
#   forward: kernel × D^-1/2, recurrent kernel × H^-1/2 (on h̃), output × s
#   backward: kernel × 1/(√n·ĝ), recurrent kernel × 1/(√n·ĝ·r_h·κ_U),
#             bias × 1/(√n·ĝ·κ_b), input x × √(D/4H)·√(T/m)/ĝ.
#
# Cut edges: the weights are leaves, so their backward scales are free. The
# input x_t feeds exactly one place in the op (step t's input projection), so
# its gradient has one route through the op and a backward-only scale on it
# is a cut; it is correct for the model as long as x has no other consumer
# whose gradient is added to this one (a residual around the LSTM would need
# the plain gradient). Every edge inside the recurrence (h̃ and c feed the
# next step and the output) is non-cut: s and 1/s are ordinary
# multiplications (the same factor in both passes), and D^-1/2 and H^-1/2
# scale the weights' forward values, which the gradients of x and h̃ see as
# they are. So every gradient is the true gradient of the function computed,
# times one constant per weight and one for x (`tests/test_lstm.py` checks
# this against autodiff of a plain LSTM).


class LSTMRule:
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

    def __init__(self, **values):
        for name in self.__slots__:
            object.__setattr__(self, name, float(values.pop(name)))
        if values:
            raise TypeError(f"Unknown LSTMRule fields: {sorted(values)}")

    def __setattr__(self, name, value):
        raise AttributeError("LSTMRule is read-only.")

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name):.4g}" for name in self.__slots__)
        return f"LSTMRule({fields})"


def _lstm_mean_field(forget_bias):
    """Derives `LSTMRule` for unit-normal inputs and weights (see the section notes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(201)
    weights = weights / weights.sum()

    def mean(values):
        return float(np.sum(weights * values))

    hidden_ms = 0.0
    for _ in range(200):
        # The input term has unit variance; the recurrent one H^-1/2·h̃U
        # has the variance of h̃.
        q = math.sqrt(1.0 + hidden_ms)
        z = q * nodes
        i_gate, f_gate, g_gate = _np_sigmoid(z), _np_sigmoid(z + forget_bias), np.tanh(z)
        i_ms, f_ms, g_ms = mean(i_gate**2), mean(f_gate**2), mean(g_gate**2)
        cell_ms = i_ms * g_ms / (1.0 - f_ms)  # c = f·c + i·g, stationary
        tanh_c = np.tanh(math.sqrt(cell_ms) * nodes)
        new_hidden_ms = i_ms * mean(tanh_c**2)  # h̃ = o·tanh(c); o as i
        converged = abs(new_hidden_ms - hidden_ms) < 1e-13
        hidden_ms = new_hidden_ms
        if converged:
            break
    f_mean = mean(f_gate)
    d_i = i_gate * (1.0 - i_gate)
    d_f = f_gate * (1.0 - f_gate)
    d_g = 1.0 - g_gate**2
    d_tanh_c = 1.0 - tanh_c**2

    # Backward, per unit mean-square gradient on h̃: dc_t = dh̃_t·o·tanh'(c)
    # + f·dc_{t+1}, stationary; then each gate's pre-activation gradient.
    cell_grad_ms = i_ms * mean(d_tanh_c**2) / (1.0 - f_ms)
    gate_grad_ms = np.array(
        [
            cell_grad_ms * g_ms * mean(d_i**2),  # i: dc·g·σ'
            cell_grad_ms * cell_ms * mean(d_f**2),  # f: dc·c·σ'
            cell_grad_ms * i_ms * mean(d_g**2),  # g: dc·i·tanh'
            mean(tanh_c**2) * mean(d_i**2),  # o: dh̃·tanh(c)·σ'
        ]
    )
    # The recurrent projection feeds Σ_gates ∂z back into ∂h̃ (H^-1/2·U^T,
    # unit gain per gate), a geometric series.
    feedback = float(gate_grad_ms.sum())
    if not feedback < 1.0:
        raise ValueError(
            "The LSTM's gradient is unstable for this forget-gate bias. "
            f"Received: forget_bias={forget_bias!r}"
        )
    gate_grad_ms = gate_grad_ms / (1.0 - feedback)
    output_scale = 1.0 / math.sqrt(hidden_ms)
    # ∂z for a unit gradient on h = s·h̃ is s times the above.
    grad_rms = output_scale * math.sqrt(gate_grad_ms.mean())

    # Time correlation. The g gate's gradient dc·i·tanh'(z_g) has lag-d
    # correlation λ_g·E[f]^d (λ_g = E[i·tanh']² / E[(i·tanh')²]); the f
    # gate's, dc·c·σ'(z_f), λ_f·E[f]^2d (c is correlated as well); i's and
    # o's have none. The hidden state's is (E[o]²/E[o²])·E[f]^d.
    lambda_g = (mean(i_gate) * mean(d_g)) ** 2 / (i_ms * mean(d_g**2))
    lambda_f = mean(d_f) ** 2 / mean(d_f**2)
    rho_h = mean(i_gate) ** 2 / i_ms

    def geometric(ratio):  # Σ_{d >= 1} ratio^d
        return ratio / (1.0 - ratio)

    bias_ms = np.array(
        [1.0, 1.0 + 2 * lambda_f * geometric(f_mean**2), 1.0 + 2 * lambda_g * geometric(f_mean), 1.0]
    )
    recurrent_ms = np.array(
        [
            1.0,
            1.0 + 2 * rho_h * lambda_f * geometric(f_mean**3),
            1.0 + 2 * rho_h * lambda_g * geometric(f_mean**2),
            1.0,
        ]
    )
    total = gate_grad_ms.sum()
    return LSTMRule(
        forget_bias=float(forget_bias),
        preactivation_rms=q,
        cell_rms=math.sqrt(cell_ms),
        hidden_rms=math.sqrt(hidden_ms),
        output_scale=output_scale,
        preactivation_grad_rms=grad_rms,
        recurrent_grad_correlation=math.sqrt(float((recurrent_ms * gate_grad_ms).sum() / total)),
        bias_grad_correlation=math.sqrt(float((bias_ms * gate_grad_ms).sum() / total)),
    )


_LSTM_RULES = {}  # forget bias -> LSTMRule, derived on first use


def lstm_rule(forget_bias=1.0):
    """The constants of the unit-scaled LSTM: derived once per forget-gate bias.

    Rule (derived in the mean field; the section notes above give the
    derivation and its check against simulation): with unit-normal inputs
    and weights, the plain hidden state `o·tanh(c)` has RMS `hidden_rms`
    (0.225 with forget bias 1, 0.194 with 0), so the output is scaled by
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

    Example:

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
    if forget_bias not in _LSTM_RULES:
        _LSTM_RULES[forget_bias] = _lstm_mean_field(forget_bias)
    return _LSTM_RULES[forget_bias]


def _lstm_sizes(x):
    """`(batch, steps, features)` of a sequence `(batch, T, D)` or a step `(batch, D)`."""
    _check_rank("x", x, 2, 3)
    dims = shape_of(x)
    if len(dims) == 2:
        return dims[0], 1, dims[1]
    return dims


def _check_units(kernel_name, kernel, rows, rows_name):
    dims = shape_of(kernel)
    _check_dims_match(f"`{kernel_name}` rows and {rows_name}", f"{kernel_name}.shape[0]", dims[0], rows_name, rows)
    if is_static(dims[1]) and dims[1] % 4:
        raise ValueError(
            f"`{kernel_name}` must have 4·units columns (gates i, f, g, o). "
            f"Received: {kernel_name}.shape={tuple(dims)}"
        )
    return dims[1] // 4 if is_static(dims[1]) else dims[1] / 4.0


def lstm_weights(kernel, recurrent_kernel, bias, x, return_sequences=True, forget_bias=1.0, fp8=False):
    """The LSTM's weights with their unit-scaling factors, for one sequence `x`.

    Rule (see `lstm_rule`), with `n = batch·m`, `m = T` if the upstream
    gradient reaches every step (`return_sequences`) else 1, and
    `ĝ = rule.preactivation_grad_rms`: kernel × `D^-1/2` forward and
    `1/(√n·ĝ)` backward; recurrent kernel × `H^-1/2` forward (it multiplies
    the plain hidden state h̃, see `lstm_hidden_in`) and `1/(√n·ĝ·r_h·κ_U)`
    backward; bias × 1 forward and `1/(√n·ĝ·κ_b)` backward. The weights are
    leaves, so forward and backward scales may differ. These are the tensors
    to hand to a fused LSTM kernel (cuDNN) in place of the raw weights.

    Args:
        kernel: `(D, 4H)`, unit-variance at initialisation.
        recurrent_kernel: `(H, 4H)`, unit-variance at initialisation.
        bias: `(4H,)` or `None`.
        x: the input sequence `(batch, T, D)` (or one step `(batch, D)`,
            counted as T = 1); only its sizes and dtype are used.
        return_sequences: whether the upstream gradient reaches every step.
        forget_bias: the forget-gate bias the rule is derived for.
        fp8: cast the two kernels to E4M3 at unit scale, before their
            scales (for `lstm_cell(..., fp8=True)`).

    Returns:
        `(kernel, recurrent_kernel, bias)`, scaled, in `x`'s dtype (`bias`
        stays `None` if it was).

    Example:

    >>> import numpy as np
    >>> k, r, b = lstm_weights(np.ones((4, 8), "float32"), np.ones((2, 8), "float32"),
    ...                        None, np.zeros((3, 5, 4), "float32"))
    >>> float(keras.ops.convert_to_numpy(k)[0, 0]), b is None
    (0.5, True)
    """
    x = _to_tensor(x, "x")
    kernel = _to_tensor(kernel, "kernel")
    recurrent_kernel = _to_tensor(recurrent_kernel, "recurrent_kernel")
    _check_rank("kernel", kernel, 2, 2)
    _check_rank("recurrent_kernel", recurrent_kernel, 2, 2)
    batch, steps, features = _lstm_sizes(x)
    units = _check_units("kernel", kernel, features, "x.shape[-1]")
    _check_units("recurrent_kernel", recurrent_kernel, units, "units")
    rule = lstm_rule(forget_bias)
    grad_steps = steps if return_sequences else 1
    base = power(batch * replicas() * grad_steps, -0.5) / rule.preactivation_grad_rms
    kernel, recurrent_kernel = _as_compute_dtype(kernel, x), _as_compute_dtype(recurrent_kernel, x)
    if fp8:
        kernel, recurrent_kernel = precision.cast_inputs(kernel, recurrent_kernel)
    kernel = scaled(kernel, power(features, -0.5), base)
    recurrent_kernel = scaled(
        recurrent_kernel,
        power(units, -0.5),
        base / (rule.hidden_rms * rule.recurrent_grad_correlation),
    )
    if bias is not None:
        bias = _to_tensor(bias, "bias")
        _check_rank("bias", bias, 1, 1)
        bias = scaled(_as_compute_dtype(bias, x), 1.0, base / rule.bias_grad_correlation)
    return kernel, recurrent_kernel, bias


def lstm_inputs(x, units, return_sequences=True, forget_bias=1.0):
    """Scales the gradient of an LSTM's input sequence (a cut edge): `x` unchanged.

    Rule: gradient × `√(D/4H)·√(T/m)/ĝ` (`m` as in `lstm_weights`): the
    gradient `D^-1/2·∂z W^T` of unit-normal weights has RMS
    `√(4H/D)·ĝ·√(m/T)` over the T steps. `x_t` feeds only step t's input
    projection, so this backward-only scale is a cut; it is right unless `x`
    also feeds something else whose gradient is added to this one.

    Args:
        x: `(batch, T, D)`, or one step `(batch, D)`.
        units: H, the LSTM's units.
        return_sequences: whether the upstream gradient reaches every step.
        forget_bias: the forget-gate bias the rule is derived for.

    Returns:
        `x`, with its gradient scaled.

    Example:

    >>> import numpy as np
    >>> y = lstm_inputs(np.ones((2, 3, 4), "float32"), units=8)
    >>> keras.ops.convert_to_numpy(y).shape
    (2, 3, 4)
    """
    x = _to_tensor(x, "x")
    if not isinstance(units, int) or isinstance(units, bool) or units <= 0:
        raise ValueError(f"`units` must be a positive integer. Received: units={units!r}")
    _, steps, features = _lstm_sizes(x)
    rule = lstm_rule(forget_bias)
    ratio = as_float(features) / (4.0 * units) * (1.0 if return_sequences else as_float(steps))
    return scale_bwd(x, power(ratio, 0.5) / rule.preactivation_grad_rms)


def lstm_hidden_in(h, forget_bias=1.0):
    """The unit-scaled state h → the plain hidden state h̃ = h·r_h (both passes).

    Example:

    >>> import numpy as np
    >>> y = lstm_hidden_in(np.ones((1,), "float32"))
    >>> round(float(keras.ops.convert_to_numpy(y)[0]), 3)
    0.225
    """
    return scaled(_to_tensor(h, "h"), *(lstm_rule(forget_bias).hidden_rms,) * 2)


def lstm_hidden_out(h, forget_bias=1.0):
    """The plain hidden state h̃ → the unit-scaled output and state s·h̃ (both passes).

    Example:

    >>> import numpy as np
    >>> y = lstm_hidden_out(np.ones((1,), "float32"))
    >>> round(float(keras.ops.convert_to_numpy(y)[0]), 2)
    4.44
    """
    return scaled(_to_tensor(h, "h"), *(lstm_rule(forget_bias).output_scale,) * 2)


def lstm_dropout(x, mask, rate):
    """Applies a cached inverted-dropout mask (values 0 or `1/(1-rate)`), unit-scaled.

    Rule: as `dropout`, × `(1 - rate)^1/2` in both passes, so that the
    output keeps unit RMS. An RNN draws one mask per sequence and reuses it
    at every step; this applies it.

    Args:
        x: the step's inputs or the recurrent state.
        mask: the mask, `x`'s shape, or `None` (no dropout).
        rate: the dropout rate, in [0, 1).

    Returns:
        The masked, rescaled tensor.

    Example:

    >>> import numpy as np
    >>> y = lstm_dropout(np.ones((2,), "float32"), np.array([0.0, 2.0], "float32"), 0.5)
    >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
    [0.0, 1.4142]
    """
    checks.rate("rate", rate)
    x = _to_tensor(x, "x")
    if mask is None or rate == 0:
        return x
    scale = (1.0 - rate) ** 0.5
    return scaled(x * ops.cast(mask, x.dtype), scale, scale)


def lstm_cell(x, h, c, kernel, recurrent_kernel, bias=None, forget_bias=1.0, fp8=False):
    """One step of the unit-scaled LSTM, given the weights from `lstm_weights`.

    `z = x·kernel + h̃·recurrent_kernel + bias` with `h̃ = lstm_hidden_in(h)`;
    plain sigmoid gates i, f, o and tanh candidate g (gate order i, f, g, o,
    as in Keras); `c' = f·c + i·g`; `h' = lstm_hidden_out(o·tanh(c'))`. The
    scaling lives in the weights and in `lstm_hidden_in` / `lstm_hidden_out`;
    a fused kernel computes the same recurrence on h̃.

    Args:
        x: `(batch, D)`, the step's input.
        h: `(batch, H)`, the unit-scaled hidden state.
        c: `(batch, H)`, the cell state.
        kernel, recurrent_kernel, bias: from `lstm_weights`.
        forget_bias: the forget-gate bias the rule is derived for.
        fp8: the two matmuls in scale-free FP8: `x` and h̃ cast to E4M3, the
            gradient of `z` to E5M2 (the kernels come cast from
            `lstm_weights(..., fp8=True)`).

    Returns:
        `(h', c')`.

    Example:

    >>> import numpy as np
    >>> x, h = np.ones((2, 4), "float32"), np.zeros((2, 3), "float32")
    >>> weights = lstm_weights(np.ones((4, 12), "float32"), np.ones((3, 12), "float32"),
    ...                        np.zeros((12,), "float32"), x)
    >>> h, c = lstm_cell(x, h, h, *weights)
    >>> tuple(h.shape), tuple(c.shape)
    ((2, 3), (2, 3))
    """
    x = _to_tensor(x, "x")
    h_plain = lstm_hidden_in(_to_tensor(h, "h"), forget_bias)
    if fp8:
        x, h_plain = precision.cast_inputs(x, h_plain)
    z = ops.add(ops.matmul(x, kernel), ops.matmul(h_plain, recurrent_kernel))
    if fp8:
        z = precision.cast_output_gradient(z)
    if bias is not None:
        z = ops.add(z, bias)
    z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)
    c = ops.add(ops.sigmoid(z_f) * ops.cast(c, z.dtype), ops.sigmoid(z_i) * ops.tanh(z_g))
    return lstm_hidden_out(ops.sigmoid(z_o) * ops.tanh(c), forget_bias), c
