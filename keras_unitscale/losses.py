"""Unit-scaled losses for `model.compile`.

Each is the Keras loss of the same name: it reports the same value (the usual
mean), but its gradient follows the unit-scaled rule of
`keras_unitscale.rules.losses`: it is *not* divided by the number of examples
averaged over, and it carries the loss's own backward scale (`V/sqrt(V-1)`
on the logits of a `V`-class cross-entropy, 2 for a binary one, `8^-1/2` for
the squared error). With unit-scaled layers, whose weight-gradient rules
divide by `sqrt(batch)`, that keeps every gradient in the model near unit
scale. With SGD on a model of plain Keras layers it multiplies the effective
learning rate by the batch size.

Only the averaging reductions are supported (`"sum_over_batch_size"`, the
default, `"mean"` and `"mean_with_sample_weight"`): the rule undoes their
division.
"""

import warnings

import keras
from keras import ops
from keras.src import backend as keras_backend

from keras_unitscale import rules
from keras_unitscale.ops.common import LOW_PRECISION
from keras_unitscale.ops.common import dtype
from keras_unitscale.scale import scale_bwd
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import numel
from keras_unitscale.sizes import replicas
from keras_unitscale.sizes import shape

__all__ = [
    "SparseCategoricalCrossentropy",
    "CategoricalCrossentropy",
    "BinaryCrossentropy",
    "MeanSquaredError",
]

_AVERAGING = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _check_averaging(reduction):
    if reduction not in _AVERAGING:
        raise ValueError(
            f"Unit-scaled losses support the averaging reductions {list(_AVERAGING)}. "
            f"Received: reduction={reduction!r}"
        )


class _UnitScaledLoss:
    """Mixin: scales `y_pred`'s gradient by `grad_scale(y_pred)` before the Keras loss."""

    def grad_scale(self, y_pred):
        raise NotImplementedError

    def __call__(self, y_true, y_pred, sample_weight=None):
        logits = self._carried_logits(y_pred)
        if logits is None:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        mask = keras_backend.get_keras_mask(y_pred)
        if mask is not None:
            keras_backend.set_keras_mask(logits, mask)
        return self._on_logits()(y_true, logits, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        # float32 first: the scale can exceed float16's range; the gradient it
        # produces is unit-scaled and casts back to the model's dtype safely.
        y_pred = ops.cast(y_pred, "float32")
        # grad_scale undoes the mean over the local batch; under tf.distribute
        # Keras also divides by the replica count, so undo the global mean.
        # It scales the per-example losses' gradient, which reaches `y_pred`
        # linearly: the same gradient, from a pass over V times fewer numbers
        # for a V-class cross-entropy.
        losses = super().call(y_true, y_pred)
        scaled_losses = scale_bwd(losses, self.grad_scale(y_pred) * replicas())
        mask = keras_backend.get_keras_mask(losses)
        if mask is not None:
            keras_backend.set_keras_mask(scaled_losses, mask)
        return scaled_losses

    def _carried_logits(self, y_pred):
        """The logits behind a softmax or sigmoid output, where the output carries them; else None.

        A cross-entropy of probabilities has the gradient `-1/p` at the true
        class, times this loss's backward scale (the batch size, and more):
        beyond float16's range once `p` falls to about 1e-4. Of the logits, its
        gradient is `p - target`, bounded. Keras's softmax and sigmoid attach
        their logits to their output (`_keras_logits`, on TensorFlow and
        PyTorch tensors; a JAX array traced in a training step cannot carry
        them), and Keras's TensorFlow losses read them there; these read them on every backend
        (before Keras's `Loss.__call__` casts the output to float32, which
        drops them). Where an output carries none (JAX), a float32 output
        keeps its gradient in float32, and a float16 one is warned about once:
        keeping Keras's contract, a float16 layer returns float16, so the head
        is made float32 by its `dtype`, as Keras's mixed-precision guide advises.
        """
        if self._fn_kwargs.get("from_logits", True):  # logits already, or no such argument (MSE)
            return None
        logits = getattr(y_pred, "_keras_logits", None)
        if logits is None and hasattr(y_pred, "dtype") and dtype(y_pred) in LOW_PRECISION:
            _warn_low_precision_probabilities(type(self).__name__, y_pred.dtype)
        return logits

    def _on_logits(self):
        """This loss with `from_logits=True`, built once."""
        if getattr(self, "_logits_twin", None) is None:
            self._logits_twin = type(self).from_config({**self.get_config(), "from_logits": True})
        return self._logits_twin


def _warn_low_precision_probabilities(loss_name, dtype):
    # Python's default warning filter shows it once per place it is raised from.
    dtype = keras.backend.standardize_dtype(dtype)
    warnings.warn(
        f"{loss_name} received {dtype} probabilities (from_logits=False) that carry no logits: their gradient, "
        "-1/p times the unit-scaled loss's backward scale, overflows float16 once the true class's probability "
        "is small. Compute the prediction head in float32 (`dtype='float32'` on its layer, as Keras's mixed "
        f"precision guide advises) or give the loss logits (from_logits=True). Received: y_pred.dtype={dtype}",
        stacklevel=4,
    )


@keras.saving.register_keras_serializable(package="keras_unitscale")
class SparseCategoricalCrossentropy(_UnitScaledLoss, keras.losses.SparseCategoricalCrossentropy):
    """Unit-scaled `keras.losses.SparseCategoricalCrossentropy` (integer labels).

    Examples:
        >>> loss = SparseCategoricalCrossentropy(from_logits=True)
        >>> round(float(loss(np.array([0, 3]), np.zeros((2, 4), "float32"))), 4)  # ln 4
        1.3863
    """

    def __init__(self, from_logits=False, reduction="sum_over_batch_size", **kwargs):
        _check_averaging(reduction)
        super().__init__(from_logits=from_logits, reduction=reduction, **kwargs)

    def grad_scale(self, y_pred):
        classes = shape(y_pred)[-1]
        return numel(y_pred) / as_float(classes) * rules.losses.cross_entropy_grad(classes)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class CategoricalCrossentropy(_UnitScaledLoss, keras.losses.CategoricalCrossentropy):
    """Unit-scaled `keras.losses.CategoricalCrossentropy` (one-hot or probability targets).

    Its value is Keras's; only its gradient is scaled.

    Examples:
        >>> y, logits = np.eye(4, dtype="float32")[[0, 2]], np.zeros((2, 4), "float32")
        >>> loss = CategoricalCrossentropy(from_logits=True)
        >>> round(float(loss(y, logits)), 4)  # ln 4
        1.3863
    """

    def __init__(self, from_logits=False, label_smoothing=0.0, reduction="sum_over_batch_size", **kwargs):
        _check_averaging(reduction)
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction, **kwargs)

    grad_scale = SparseCategoricalCrossentropy.grad_scale


def _binary_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """`keras.losses.binary_crossentropy`, which `torch.compile` traces whole from logits.

    On PyTorch, Keras's op asks `torch.backends.mps.is_available()` on every
    call, and `torch.compile` cannot trace that question: the compiled
    training step breaks there into pieces, one more in front of and behind
    every frame that called it (the unit-scaled loss adds two). On the seed
    000 MLP that cost 10% of a compiled step (`benchmarks/layers.py`). From
    logits on a device other than Apple's, the answer changes nothing (Keras
    squeezes a last axis of 1 on MPS only), so this computes what Keras's op
    computes then, PyTorch's `binary_cross_entropy_with_logits` (tested equal
    bit for bit), without asking. Elsewhere it is Keras's function.
    """
    if from_logits and keras.backend.backend() == "torch":
        import torch

        y_pred = ops.convert_to_tensor(y_pred)
        if isinstance(y_pred, torch.Tensor) and y_pred.device.type != "mps":  # not symbolic, not Apple's
            return _torch_binary_crossentropy_from_logits(y_true, y_pred, label_smoothing, axis)
    return keras.losses.binary_crossentropy(
        y_true, y_pred, from_logits=from_logits, label_smoothing=label_smoothing, axis=axis)


def _torch_binary_crossentropy_from_logits(y_true, logits, label_smoothing, axis):
    import torch

    y_true = ops.cast(y_true, logits.dtype)
    if label_smoothing:  # as Keras's `binary_crossentropy` smooths
        y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
    if y_true.shape != logits.shape:
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same shape. "
            f"Received: y_true.shape={tuple(y_true.shape)}, y_pred.shape={tuple(logits.shape)}"
        )
    per_element = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_true, reduction="none")
    return ops.mean(per_element, axis=axis)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class BinaryCrossentropy(_UnitScaledLoss, keras.losses.BinaryCrossentropy):
    """Unit-scaled `keras.losses.BinaryCrossentropy`: the two-class rule, gradient × 2.

    Examples:
        >>> loss = BinaryCrossentropy()
        >>> round(float(loss(np.array([[1.0]]), np.array([[0.5]], "float32"))), 4)  # ln 2
        0.6931
    """

    def __init__(self, from_logits=False, label_smoothing=0.0, reduction="sum_over_batch_size", **kwargs):
        _check_averaging(reduction)
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, reduction=reduction, **kwargs)
        self.fn = _binary_crossentropy  # Keras's, without its graph break under torch.compile

    def grad_scale(self, y_pred):
        # Keras's `binary_crossentropy` averages over every element (the last axis, then the batch).
        return as_float(numel(y_pred)) * rules.losses.cross_entropy_grad(2)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class MeanSquaredError(_UnitScaledLoss, keras.losses.MeanSquaredError):
    """Unit-scaled `keras.losses.MeanSquaredError`: the gradient `2(p - t) · 8^-1/2`.

    Examples:
        >>> loss = MeanSquaredError()
        >>> float(loss(np.zeros((1, 2)), np.array([[1.0, 3.0]], "float32")))
        5.0
    """

    def __init__(self, reduction="sum_over_batch_size", **kwargs):
        _check_averaging(reduction)
        super().__init__(reduction=reduction, **kwargs)

    def grad_scale(self, y_pred):
        return as_float(numel(y_pred)) * rules.losses.MSE_GRAD
