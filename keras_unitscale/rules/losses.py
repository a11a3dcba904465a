"""Rules of the losses: cross-entropy and mean squared error."""

from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import at_least_one
from keras_unitscale.sizes import power

__all__ = ["cross_entropy_grad", "MSE_GRAD", "mean"]

MSE_GRAD = 8**-0.5
"""Both inputs' gradient scale in a squared error: `2(p - t)` of unit, independent `p` and `t` has RMS `sqrt(8)`."""


def cross_entropy_grad(num_classes):
    """The logits' gradient scale in a `V`-class cross-entropy, `V / sqrt(V - 1)`.

    The gradient `softmax - target` of one example has RMS `sqrt(V - 1) / V`
    when the softmax is flat. (A sigmoid's binary cross-entropy is the
    two-class case: 2.)

    Examples:
        >>> cross_entropy_grad(2)
        2.0
    """
    return as_float(num_classes) * power(as_float(num_classes) - 1.0, -0.5)


def mean(count):
    """A reduction's forward-only scale: the loss is summed, then × `1/count` for the usual mean.

    Its gradient is not divided by the count: the weight-gradient rules
    divide by `sqrt(batch)` instead. An empty batch's mean is 0, as Keras's.

    Examples:
        >>> mean(4)
        0.25
    """
    return 1.0 / as_float(at_least_one(count))
