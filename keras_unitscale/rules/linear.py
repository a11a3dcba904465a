"""Rules of the linear ops: matmul, dense and its readout, add, embedding.

Each rule takes static sizes (Python ints; a float32 scalar tensor only where
a size is known at run time alone, such as a traced batch) and returns the
scales its op applies: the forward scale of the output and the backward
scale of each input's gradient.
"""

from typing import NamedTuple

from keras_unitscale import checks
from keras_unitscale.rules.common import tie
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import at_least_one
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import power

__all__ = [
    "DENSE_POWERS", "READOUT_POWERS", "MatmulScales", "DenseScales", "AddScales",
    "matmul", "forward_scale", "dense", "readout", "add", "add_output", "broadcast_factor", "embedding_grad",
    "lora_alpha", "sum_of", "sum_output",
]

# (output, input gradient, weight gradient) exponents: each scale is
# `size^-power` of fan_in, fan_out and batch.
DENSE_POWERS = (0.5, 0.5, 0.5)
# u-μP's readout: output × 1/fan_in, which keeps the logits from growing
# with width as training aligns the weights with their input.
READOUT_POWERS = (1.0, 0.5, 0.5)


class MatmulScales(NamedTuple):
    output: float
    grad_left: float
    grad_right: float


class DenseScales(NamedTuple):
    output: float
    grad_input: float
    grad_weight: float | None  # None where the batch was not given

    def times(self, factor):
        """Every scale × `factor`: an activation's scale taken into the op's own (`ops.activations.relu_factor`)."""
        return DenseScales(self.output * factor, self.grad_input * factor,
                           None if self.grad_weight is None else self.grad_weight * factor)


class AddScales(NamedTuple):
    output: float
    grad_left: float
    grad_right: float


def matmul(m, k, n, constraint="to_output_scale"):
    """`(m, k) @ (k, n)`: output × `k^-1/2`, left gradient × `n^-1/2`, right × `m^-1/2`, tied.

    Examples:
        >>> matmul(4, 16, 64, constraint=None)
        MatmulScales(output=0.25, grad_left=0.125, grad_right=0.5)
    """
    return MatmulScales(*tie(constraint, power(k, -0.5), power(n, -0.5), power(m, -0.5)))


def _check_powers(powers):
    if (
        not isinstance(powers, (tuple, list))
        or len(powers) != 3
        or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in powers)
    ):
        raise ValueError(
            "`scale_power` must be three numbers (output, grad input, grad "
            f"weight). Received: scale_power={powers!r}"
        )


def forward_scale(fan_in, powers=DENSE_POWERS):
    """The untied forward scale of a dense op, `fan_in^-powers[0]`: u-μP's forward multiplier.

    Examples:
        >>> forward_scale(64), forward_scale(64, READOUT_POWERS)
        (0.125, 0.015625)
    """
    _check_powers(powers)
    return power(fan_in, -powers[0])


def dense(fan_in, fan_out, batch=None, constraint="to_output_scale", powers=DENSE_POWERS):
    """A dense op with a `(fan_in, fan_out)` kernel over `batch` rows.

    Output × `fan_in^-p0` and input gradient × `fan_out^-p1`, tied by the
    constraint; kernel and bias gradients × `batch^-p2` (free: the weights
    are leaves, their gradients meet no other path). `batch` is the global
    number of rows (`size(x) / fan_in` over all replicas); an empty batch
    counts as one row (`sizes.at_least_one`).

    Examples:
        >>> dense(256, 64, batch=16)
        DenseScales(output=0.0625, grad_input=0.0625, grad_weight=0.25)
        >>> dense(256, 64, batch=16, constraint=None)
        DenseScales(output=0.0625, grad_input=0.125, grad_weight=0.25)
    """
    output, grad_input = tie(constraint, forward_scale(fan_in, powers), power(fan_out, -powers[1]))
    grad_weight = None if batch is None else power(at_least_one(batch), -powers[2])
    return DenseScales(output, grad_input, grad_weight)


def readout(fan_in, fan_out, batch=None, constraint=None):
    """The final dense op: `dense` with `READOUT_POWERS`, unconstrained by default (a cut edge: only the loss follows).

    Examples:
        >>> readout(64, 10).output
        0.015625
    """
    return dense(fan_in, fan_out, batch, constraint, READOUT_POWERS)


def broadcast_factor(shape, other_shape):
    """How many times broadcasting against `other_shape` reuses each element of a `shape` tensor.

    Examples:
        >>> broadcast_factor((1, 8), (4, 8))
        4
    """
    rank = max(len(shape), len(other_shape))
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    other_shape = (1,) * (rank - len(other_shape)) + tuple(other_shape)
    factor = 1
    for dim, other_dim in zip(shape, other_shape):
        if is_static(dim) and dim == 1 and not (is_static(other_dim) and other_dim == 1):
            factor = factor * (other_dim if is_static(other_dim) else as_float(other_dim))
    return factor


def add(left_shape, right_shape, constraint="to_output_scale"):
    """The sum of two independent unit-scaled tensors of these shapes: `sum_of` for two.

    Output × `2^-1/2` (× 1 when either has one element); each gradient ×
    `1/sqrt(f)`, `f` its `broadcast_factor`, tied by the constraint.

    Examples:
        >>> add((4, 8), (4, 8), constraint=None).output == 2**-0.5
        True
    """
    return AddScales(*sum_of([left_shape, right_shape], constraint))


def sum_of(shapes, constraint="to_output_scale"):
    """The sum of independent unit-scaled tensors of these shapes: `(output, *gradients)`.

    Output × `k^-1/2`, `k` the number of operands with more than one element
    (at least 1: a one-element operand, a bias say, adds little variance);
    each operand's gradient × `1/sqrt(f)`, `f` how many times broadcasting
    reuses each of its elements (`broadcast_factor` against the others),
    tied by the constraint.

    Examples:
        >>> [round(s, 4) for s in sum_of([(4, 8), (4, 8), (1, 8)], constraint=None)]
        [0.5774, 1.0, 1.0, 0.5]
    """
    return tie(constraint, sum_output(shapes), *(power(_reuse(i, shapes), -0.5) for i in range(len(shapes))))


def _reuse(index, shapes):
    factor = 1
    others = [shape for i, shape in enumerate(shapes) if i != index]
    rank = max(len(shape) for shape in shapes)
    for axis in range(-rank, 0):
        # The largest known size among the others on this axis: what this operand broadcasts to.
        sizes = [shape[axis] for shape in others if len(shape) >= -axis]
        sizes = [size for size in sizes if not (is_static(size) and size == 1)]
        if sizes:
            factor = factor * broadcast_factor(_axis_shape(shapes[index], axis), (sizes[0],))
    return factor


def _axis_shape(shape, axis):
    return (shape[axis],) if len(shape) >= -axis else (1,)


def add_output(left_shape, right_shape):
    """The untied forward scale of `add`: `2^-1/2`, or 1 when either operand has one element (a `None` size is not 1).

    Examples:
        >>> add_output((None, 8), (1,))
        1.0
    """
    return sum_output([left_shape, right_shape])


def sum_output(shapes):
    """The untied forward scale of `sum_of`: `k^-1/2`, `k` the operands with more than one element (a `None` size is not 1).

    Examples:
        >>> sum_output([(None, 8), (1,)]), sum_output([(2,), (2,), (2,), (2,)])
        (1.0, 0.5)
    """
    many = [shape for shape in shapes if not (is_static(*shape) and _product(shape) == 1)]
    return max(len(many), 1) ** -0.5


def _product(shape):
    result = 1
    for dim in shape:
        result *= dim
    return result


def embedding_grad(vocab, tokens):
    """An embedding lookup's table gradient, × `sqrt(vocab / tokens)`; its output is × 1.

    A row's gradient sums over the tokens that chose it, about
    `tokens / vocab` of them (`tokens` over all replicas).

    Examples:
        >>> embedding_grad(100, 25)
        2.0
    """
    return power(as_float(vocab) / as_float(at_least_one(tokens)), 0.5)


def lora_alpha(rank):
    """The default `lora_alpha` of a unit-scaled layer's low-rank adapters: `rank^1/2`.

    Keras's LoRA adds `(lora_alpha / rank) · A·B` to the kernel. In a
    unit-scaled layer, whose op already applies the kernel's `fan_in^-1/2`,
    the low-rank path `x·A·B` is then two unit-scaled matmuls when the
    second is scaled by its own fan-in, `rank^-1/2` (`forward_scale(rank)`):
    so `lora_alpha / rank = rank^-1/2`. With unit-normal `A` (and `B`
    trained from zero) the update's scale does not depend on the rank.

    Examples:
        >>> lora_alpha(16)
        4.0
    """
    checks.positive("rank", rank)
    return float(rank * forward_scale(rank))
