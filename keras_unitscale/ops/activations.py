"""Unit-scaled elementwise ops: the activations and dropout (rules in `keras_unitscale.rules.activations`).

`apply` takes any activation Keras accepts: a name, Keras's function, or a
user's function of a tensor. relu, gelu, silu (swish), tanh, sigmoid and
softmax have derived rules; every other activation gets the general rule,
output × `1/RMS(f(z))` and input gradient × `1/RMS(f'(z))` for z ~ N(0, 1),
computed once per activation (`ops.any_activation.rule`).
"""

from keras import ops
from keras import random

from keras_unitscale import rules
from keras_unitscale.ops.any_activation import function_of
from keras_unitscale.ops.any_activation import is_elementwise
from keras_unitscale.ops.any_activation import keras_names
from keras_unitscale.ops.any_activation import resolve
from keras_unitscale.ops.any_activation import rule
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import elementwise
from keras_unitscale.ops.common import to_float
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import shape as shape_of

__all__ = [
    "relu", "gelu", "silu", "silu_glu", "tanh", "sigmoid", "softmax", "dropout", "apply", "resolve", "rule",
    "is_elementwise", "keras_names", "fusable", "relu_factor",
]


def dropout(x, rate, training=True, seed=None, noise_shape=None):
    """Unit-scaled dropout: the kept elements are scaled so the output stays at unit scale.

    Rule (`rules.activations.dropout`): plain (inverted) dropout, which
    divides by `1 - rate`, then × `(1 - rate)^1/2` in both passes, so that
    the output and gradient keep unit variance rather than unit mean.

    Args:
        x: inputs.
        rate: the fraction dropped, in [0, 1).
        training: apply dropout (`True`) or return `x` unchanged.
        seed: a `keras.random.SeedGenerator` or an int, as for
            `keras.random.dropout`.
        noise_shape: as for `keras.random.dropout`.

    Returns:
        The tensor with dropped elements zeroed and the rest rescaled.

    Examples:
        >>> import numpy as np
        >>> y = dropout(np.ones((4,), "float32"), 0.5, training=False)
        >>> keras.ops.convert_to_numpy(y).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    scale = rules.activations.dropout(rate)
    x = to_float(x, "x")
    if not training or rate == 0:
        return x
    return scaled(random.dropout(x, rate, noise_shape=noise_shape, seed=seed), scale, scale)


def relu(x, constraint="to_output_scale"):
    """A unit-scaled ReLU: `sqrt(2) * relu(x)` (`rules.activations.relu`).

    For x ~ N(0, 1), `RMS(relu(x)) = RMS(relu'(x)) = 1/sqrt(2)`, so both the
    output and the gradient come out at unit RMS: He initialisation's factor.

    Args:
        x: inputs.
        constraint: see `keras_unitscale.constraints` (both scales are equal,
            so every constraint gives the same result).

    Returns:
        `sqrt(2) * relu(x)`.

    Examples:
        >>> import numpy as np
        >>> y = relu(np.array([-1.0, 2.0], "float32"))
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
        [0.0, 2.8284]
    """
    scales, native = _rule_and_kernel("relu", 1.0, constraint)
    return elementwise(ops.relu, to_float(x, "x"), scales, native=native)


def gelu(x, mult=1.0, constraint="to_output_scale", approximate=False):
    """A unit-scaled GELU, `gelu(mult * x) / mult` (`rules.activations.gelu`, ≈ 1.767 and 1.516 at `mult = 1`).

    Args:
        x: inputs.
        mult: the u-μP multiplier inside the nonlinearity, > 0.
        constraint: see `keras_unitscale.constraints`.
        approximate: use the tanh approximation (the reference's default is
            the exact form, as here).

    Returns:
        The scaled activation.

    Examples:
        >>> import numpy as np
        >>> y = gelu(np.array([0.0], "float32"))
        >>> keras.ops.convert_to_numpy(y).tolist()
        [0.0]
    """
    scales, native = _rule_and_kernel("gelu_tanh" if approximate else "gelu", mult, constraint)

    def _gelu(inputs):
        if mult == 1:
            return ops.gelu(inputs, approximate=approximate)
        return ops.gelu(inputs * mult, approximate=approximate) / mult

    return elementwise(_gelu, to_float(x, "x"), scales, native=native)


def gelu_glu(x, gate, mult=1.0, approximate=False):
    """A unit-scaled gated linear unit `x * gelu(gate)` (GeGLU, Gemma's MLP).

    Rule: the unit-scaled `gelu` of the gate (`rules.activations.gelu`, its
    gradient tied to its output scale) times `x`, unscaled: two independent
    unit-scaled factors make a unit-scaled product, and each factor's
    gradient is the other factor times the output's, so both gradients are
    at unit scale too. `functional.silu_glu` keeps the reference's own rule
    for SwiGLU.

    Args:
        x: the linear input.
        gate: the gate, same shape as `x`.
        mult: the u-μP multiplier inside the GELU, > 0.
        approximate: the tanh approximation of GELU (Gemma's).

    Returns:
        The scaled product, shape of `x`.

    Examples:
        >>> import numpy as np
        >>> y = gelu_glu(np.ones((1,), "float32"), np.zeros((1,), "float32"))
        >>> keras.ops.convert_to_numpy(y).tolist()
        [0.0]
    """
    return to_float(x, "x") * gelu(gate, mult, approximate=approximate)


def _silu(x, mult):
    return x * ops.sigmoid(x * mult) if mult != 1 else ops.silu(x)


def silu(x, mult=1.0, constraint="to_output_scale"):
    """A unit-scaled SiLU (swish), `x * sigmoid(mult * x)` (`rules.activations.silu`).

    Args:
        x: inputs.
        mult: the u-μP multiplier inside the nonlinearity, > 0.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled activation.

    Examples:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(silu(np.array([0.0], "float32"))).tolist()
        [0.0]
    """
    scales, native = _rule_and_kernel("silu", mult, constraint)
    return elementwise(lambda inputs: _silu(inputs, mult), to_float(x, "x"), scales, native=native)


def _rule_and_kernel(name, mult, constraint):
    """The scales of the unit-scaled relu, gelu, gelu_tanh or silu, and the name of PyTorch's kernel for it.

    The kernel (one of `torch_fused.NATIVE_ACTIVATIONS`) is the plain
    function, so it is None where `mult` ≠ 1 changes the function.
    """
    if name == "relu":
        return rules.activations.relu(constraint), name
    rule = rules.activations.silu if name == "silu" else rules.activations.gelu
    return rule(mult, constraint), name if mult == 1 else None


def relu_factor(activation, mult=1.0, constraint="to_output_scale"):
    """relu's scale `c` where `activation` is relu, else None: the op before it may take `c` into its own scales.

    The unit-scaled relu is `c·relu` in both passes (its output and gradient
    scales are equal under every constraint), and relu is positively
    homogeneous: `c·relu(z) = relu(c·z)` for `c > 0`. An op whose scales are
    each × `c` (`rules.linear.DenseScales.times`), then plain relu, gives the
    same numbers with no scale pass of relu's own.

    Examples:
        >>> round(relu_factor("relu"), 4), relu_factor("gelu")
        (1.4142, None)
    """
    if resolve(activation) != "relu":
        return None
    scales, _ = _rule_and_kernel("relu", mult, constraint)
    return scales.output if scales.output == scales.grad else None


def fusable(activation, mult=1.0, constraint="to_output_scale"):
    """`(PyTorch's kernel, output scale, gradient scale)` of the unit-scaled `activation`, or None where it has none.

    What `apply` computes for gelu and silu (swish) in the form
    `torch_fused.dense` takes, to apply it inside the op before it (relu
    joins the op's scales instead: `relu_factor`).

    Examples:
        >>> fusable("gelu")[0], fusable("tanh"), fusable("gelu", mult=2.0)
        ('gelu', None, None)
    """
    name = resolve(activation)
    if name not in ("gelu", "silu"):
        return None
    scales, native = _rule_and_kernel(name, mult, constraint)
    return None if native is None else (native, *scales)


def silu_glu(x, gate, mult=1.0):
    """A unit-scaled gated linear unit `x * silu(gate)` (SwiGLU's nonlinearity).

    Rule (`rules.activations.silu_glu`, the reference's): both inputs'
    gradients and the output × `L(sigmoid(ln m²), 2, sqrt(2))`.

    Args:
        x: the linear input.
        gate: the gate, same shape as `x`.
        mult: the u-μP multiplier inside the sigmoid, > 0.

    Returns:
        The scaled product, shape of `x`.

    Examples:
        >>> import numpy as np
        >>> y = silu_glu(np.ones((1,), "float32"), np.zeros((1,), "float32"))
        >>> keras.ops.convert_to_numpy(y).tolist()
        [0.0]
    """
    scale = rules.activations.silu_glu(mult)
    x = scale_bwd(to_float(x, "x"), scale)
    gate = scale_bwd(to_float(gate, "gate"), scale)
    return scale_fwd(x * _silu(gate, mult), scale)


def tanh(x, constraint="to_output_scale"):
    """A unit-scaled tanh (`rules.activations.tanh`).

    Output × `1/RMS(tanh(z))` ≈ 1.593 and gradient × `1/RMS(1 - tanh²(z))`
    ≈ 1.467, for z ~ N(0, 1). With the default constraint both are 1.593,
    and the gradient's RMS is ≈ 1.09.

    Args:
        x: inputs.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled activation.

    Examples:
        >>> import numpy as np
        >>> keras.ops.convert_to_numpy(tanh(np.array([0.0], "float32"))).tolist()
        [0.0]
    """
    return elementwise(ops.tanh, to_float(x, "x"), rules.activations.tanh(constraint))


def sigmoid(x, constraint="to_output_scale"):
    """A unit-scaled logistic sigmoid (`rules.activations.sigmoid`).

    Output × `1/RMS(σ(z))` ≈ 1.846 and gradient × `1/RMS(σ'(z))` ≈ 4.723
    for z ~ N(0, 1). With the default constraint both are 1.846: pass
    `constraint=None` where the edge is cut (an LSTM's gates).

    Args:
        x: inputs.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled activation.

    Examples:
        >>> import numpy as np
        >>> y = sigmoid(np.array([0.0], "float32"))
        >>> [round(v, 3) for v in keras.ops.convert_to_numpy(y).tolist()]
        [0.923]
    """
    return elementwise(ops.sigmoid, to_float(x, "x"), rules.activations.sigmoid(constraint))


def softmax(x, axis=-1, mult=1.0, constraint="to_output_scale"):
    """A unit-scaled softmax, `softmax(mult * x)`, whose output lies in [0, n].

    Rule (`rules.activations.softmax`, the reference's), with
    `n = x.shape[axis]` and `a = 1 / (1 + 4/mult²)`: output ×
    `L(a, n, sqrt(n))`; gradient × `L(a, n/mult, sqrt(n/mult))`.

    Args:
        x: logits.
        axis: the axis to normalise over.
        mult: the u-μP multiplier of the logits, > 0.
        constraint: see `keras_unitscale.constraints`.

    Returns:
        The scaled probabilities.

    Examples:
        >>> import numpy as np
        >>> y = softmax(np.zeros((4,), "float32"))  # 1/4 each, × 4^0.9
        >>> [round(v, 3) for v in keras.ops.convert_to_numpy(y).tolist()]
        [0.871, 0.871, 0.871, 0.871]
    """
    x = to_float(x, "x")
    check_rank("x", x, 1)
    scales = rules.activations.softmax(shape_of(x)[axis], mult, constraint)
    return elementwise(lambda logits: ops.softmax(logits * mult if mult != 1 else logits, axis=axis), x, scales)


_BY_NAME = {"relu": relu, "tanh": tanh, "sigmoid": sigmoid}
_WITH_MULT = {"gelu": gelu, "silu": silu, "swish": silu, "softmax": softmax}


def apply(x, activation, mult=1.0, constraint="to_output_scale"):
    """Applies the unit-scaled `activation` to `x`: a name, Keras's function, a user's callable, or None.

    The derived ops of this module for relu, gelu, silu (swish), tanh,
    sigmoid and softmax (`mult` is theirs: gelu, silu, softmax); for any
    other activation `f`, `scales.output · f(x)` with input gradient
    `scales.grad · f'`, the general rule (`rule`) tied by `constraint`. An
    activation that is not elementwise (log_softmax, glu, sparsemax, ...)
    acts along the last axis, whose size must be static.

    With the default constraint the gradient's scale is the output's, so a
    function whose derivative is small where its value is not (sigmoid,
    softplus, log_sigmoid, ...) has a gradient RMS below 1:
    `rules.activations.tied_gradient_rms` says by how much.

    Examples:
        >>> import numpy as np
        >>> [round(v, 3) for v in keras.ops.convert_to_numpy(apply(np.array([4.0], "float32"), "relu")).tolist()]
        [5.657]
    """
    activation = resolve(activation)
    if activation == "linear":
        return x
    if isinstance(activation, str) and activation in _WITH_MULT:
        return _WITH_MULT[activation](x, mult=mult, constraint=constraint)
    if isinstance(activation, str) and activation in _BY_NAME:
        return _BY_NAME[activation](x, constraint=constraint)
    x = to_float(x, "x")
    size = None
    if not is_elementwise(activation):
        check_rank("x", x, 1)
        size = shape_of(x)[-1]
    return elementwise(function_of(activation), x, rule(activation, constraint=constraint, size=size))
