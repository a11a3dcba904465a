"""Unit-scaled losses on tensors: cross-entropy and mean squared error (rules: `keras_unitscale.rules.losses`)."""

from keras import ops

from keras_unitscale import checks
from keras_unitscale import rules
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import check_same_shape
from keras_unitscale.ops.common import dtype
from keras_unitscale.ops.common import in_float32
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import numel
from keras_unitscale.sizes import shape as shape_of

__all__ = ["cross_entropy", "cross_entropy_grad_scale", "mse", "MSE_GRAD_SCALE"]

REDUCTIONS = ("mean", "sum")
MSE_GRAD_SCALE = rules.losses.MSE_GRAD
cross_entropy_grad_scale = rules.losses.cross_entropy_grad


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be 'mean' or 'sum'. Received: reduction={reduction!r}"
        )


def cross_entropy(logits, labels, mult=1.0, reduction="mean"):
    """Unit-scaled softmax cross-entropy, for integer labels or probability targets.

    Rule (`rules.losses`, the reference's): logits × `mult` in the forward
    pass only; their gradient × `V / sqrt(V - 1)` for `V` classes (the
    gradient `softmax - target` has RMS about `sqrt(V-1)/V` per example). The
    loss is summed, then × `1/batch` in the forward pass only: the reported
    value is the usual mean, but its gradient is not divided by the batch
    size (the weight-gradient rules divide by `sqrt(batch)` instead).

    Args:
        logits: `(..., V)`, V >= 2.
        labels: integer class ids of shape `logits.shape[:-1]`, or targets
            (one-hot or probabilities) of shape `logits.shape`.
        mult: the u-μP multiplier of the logits, > 0.
        reduction: `"mean"` (over all positions) or `"sum"`.

    Returns:
        A scalar loss in float32 (float64 for float64 logits).

    Examples:
        >>> import numpy as np
        >>> loss = cross_entropy(np.zeros((2, 4), "float32"), np.array([0, 3]))
        >>> round(float(keras.ops.convert_to_numpy(loss)), 4)  # ln 4
        1.3863
    """
    checks.positive("mult", mult)
    _check_reduction(reduction)
    logits = to_tensor(logits, "logits")
    labels = to_tensor(labels, "labels")
    check_rank("logits", logits, 1)
    vocab = shape_of(logits)[-1]
    if is_static(vocab) and vocab < 2:
        raise ValueError(
            "`logits` must have at least 2 classes on its last axis. "
            f"Received: logits.shape={tuple(shape_of(logits))}"
        )
    logits = scale_fwd(scale_bwd(logits, rules.losses.cross_entropy_grad(vocab)), mult)
    log_probs = ops.log_softmax(in_float32(logits), axis=-1)
    if "int" in dtype(labels):
        label_shape, logit_shape = shape_of(labels), shape_of(logits)
        if is_static(*label_shape, *logit_shape) and label_shape != logit_shape[:-1]:
            raise ValueError(
                "Integer `labels` must have shape logits.shape[:-1]. Received: "
                f"labels.shape={label_shape}, logits.shape={logit_shape}"
            )
        loss = -ops.sum(ops.take_along_axis(log_probs, ops.expand_dims(labels, -1), axis=-1))
    else:
        check_same_shape(
            "Target `labels` (probabilities) must have the shape of `logits`",
            "labels", labels, "logits", logits,
        )
        loss = -ops.sum(ops.cast(labels, log_probs.dtype) * log_probs)
    if reduction == "sum":
        return loss
    return scale_fwd(loss, rules.losses.mean(numel(logits) / as_float(vocab)))


def mse(y_pred, y_true, reduction="mean"):
    """Unit-scaled mean squared error.

    Rule (`rules.losses.MSE_GRAD`, the reference's): the gradients of both
    inputs × `8^-1/2` (the gradient `2(p - t)` of unit-scaled, independent
    `p` and `t` has RMS `sqrt(8)`); the loss is summed, then × `1/size` in
    the forward pass only.

    Args:
        y_pred: predictions.
        y_true: targets, the same shape.
        reduction: `"mean"` or `"sum"`.

    Returns:
        A scalar loss.

    Examples:
        >>> import numpy as np
        >>> loss = mse(np.array([1.0, 3.0], "float32"), np.zeros((2,), "float32"))
        >>> float(keras.ops.convert_to_numpy(loss))
        5.0
    """
    _check_reduction(reduction)
    y_pred = to_tensor(y_pred, "y_pred")
    y_true = to_tensor(y_true, "y_true")
    check_same_shape(
        "`y_pred` and `y_true` must have the same shape", "y_pred", y_pred, "y_true", y_true
    )
    y_pred = scale_bwd(y_pred, rules.losses.MSE_GRAD)
    y_true = scale_bwd(ops.cast(y_true, y_pred.dtype), rules.losses.MSE_GRAD)
    loss = ops.sum(ops.square(y_pred - y_true))
    if reduction == "sum":
        return loss
    return scale_fwd(loss, rules.losses.mean(numel(y_pred)))
