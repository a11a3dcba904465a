"""How an op's forward and backward scales are tied on edges that must agree.

A unit-scaled op computes an ideal scale for its output and one for each input
gradient. On a *cut edge* they may differ freely. Where the input's gradient is
combined with gradients that took other routes, the forward and backward scales
must be equal, or the combined gradient is no longer the gradient of the
function the model computes. A constraint picks that common scale.

A constraint is named by a string (`"to_output_scale"`, the default of every
constrained op, `"to_grad_input_scale"`, `"gmean"`, `"hmean"`, `"amean"`),
given as a callable `f(output_scale, *grad_scales) -> scale`, or `None` (each
scale kept; only correct on cut edges).

Scales may be Python floats or scalar tensors (sizes unknown until run time),
so the means are written with arithmetic operators only.
"""

__all__ = [
    "to_output_scale",
    "to_grad_input_scale",
    "to_left_grad_scale",
    "to_right_grad_scale",
    "gmean",
    "hmean",
    "amean",
    "apply_constraint",
    "CONSTRAINTS",
]


def gmean(*scales):
    """Geometric mean of the scales.

    Examples:
        >>> gmean(1.0, 4.0)
        2.0
    """
    return _product(scales) ** (1.0 / len(scales))


def _product(scales):
    product = scales[0]
    for scale in scales[1:]:
        product = product * scale
    return product


def hmean(*scales):
    """Harmonic mean of the scales (the choice of Glorot/Xavier initialisation).

    Examples:
        >>> hmean(1.0, 3.0)
        1.5
    """
    return len(scales) / sum(1.0 / s for s in scales)


def amean(*scales):
    """Arithmetic mean of the scales.

    Examples:
        >>> amean(1.0, 3.0)
        2.0
    """
    return sum(scales) / len(scales)


def to_output_scale(output_scale, *grad_input_scales):
    """Every slot takes the output (forward) scale: the default of every op.

    Examples:
        >>> to_output_scale(0.5, 0.25, 0.125)
        0.5
    """
    return output_scale


def to_grad_input_scale(output_scale, grad_input_scale):
    """Every slot takes the (single) input-gradient scale.

    Examples:
        >>> to_grad_input_scale(0.5, 0.25)
        0.25
    """
    return grad_input_scale


def to_left_grad_scale(output_scale, left_grad_scale, right_grad_scale):
    """For binary ops: every slot takes the left operand's gradient scale."""
    return left_grad_scale


def to_right_grad_scale(output_scale, left_grad_scale, right_grad_scale):
    """For binary ops: every slot takes the right operand's gradient scale."""
    return right_grad_scale


CONSTRAINTS = {
    fn.__name__: fn
    for fn in (
        to_output_scale,
        to_grad_input_scale,
        to_left_grad_scale,
        to_right_grad_scale,
        gmean,
        hmean,
        amean,
    )
}


def get(constraint):
    """Resolves a constraint given by name, as a callable, or as `None`.

    Raises:
        ValueError: for an unknown name or a value of the wrong type.
    """
    if constraint is None or callable(constraint):
        return constraint
    if isinstance(constraint, str):
        if constraint in CONSTRAINTS:
            return CONSTRAINTS[constraint]
        raise ValueError(
            f"Unknown constraint. Expected one of {sorted(CONSTRAINTS)} or None. "
            f"Received: constraint={constraint!r}"
        )
    raise ValueError(
        "`constraint` must be a name, a callable or None. "
        f"Received: constraint={constraint!r}"
    )


def apply_constraint(constraint, *scales):
    """Applies a constraint to `(output_scale, *grad_input_scales)`.

    Args:
        constraint: a name, a callable or `None`.
        *scales: the op's ideal output scale followed by its ideal gradient
            scales.

    Returns:
        A tuple with one scale per slot: all equal to the constrained scale,
        or the scales unchanged when `constraint` is `None`.

    Examples:
        >>> apply_constraint("gmean", 1.0, 0.25)
        (0.5, 0.5)
        >>> apply_constraint(None, 1.0, 0.25)
        (1.0, 0.25)
    """
    fn = get(constraint)
    if fn is None:
        return tuple(scales)
    chosen = fn(*scales)
    return tuple(chosen for _ in scales)
