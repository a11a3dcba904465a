"""The unit-scaled losses on probability outputs: no backward scale reaches float16's range.

A cross-entropy of probabilities has the gradient -1/p at the true class,
and the unit-scaled loss multiplies it by its backward scale (the batch size
and more): in float16 that is inf once p is small. The losses take the
logits a softmax or sigmoid output carries (TensorFlow, PyTorch); a JAX array
traced in a training step carries none, and a float16 probability output
without them is warned about.
"""

import warnings

import keras
import numpy as np
import pytest

from helpers import BACKEND
from keras_unitscale import layers
from keras_unitscale import losses
from keras_unitscale.autodiff import vjp

CLASSES, BATCH = 8, 64


def _logit_for(probability, classes):
    """The true class's logit, the others 0, that gives it `probability`."""
    return float(np.log(probability * (classes - 1) / (1 - probability)))


def _head_and_data(head_cls, activation, classes, probability, dtype):
    """A one-input head whose output gives the true class `probability` on every example, and its labels."""
    units = 1 if activation == "sigmoid" else classes
    kwargs = {"role": "output"} if head_cls is layers.Dense else {}
    head = head_cls(units, activation=activation, use_bias=False, dtype=dtype, **kwargs)
    x = np.ones((BATCH, 1), "float32")
    head.build(x.shape)
    if activation == "sigmoid":
        # The true label is 1 throughout: its probability is sigmoid(logit).
        kernel = np.full((1, 1), np.log(probability / (1 - probability)), "float32")
        y = np.ones((BATCH, 1), "float32")
        loss = losses.BinaryCrossentropy()
    else:
        kernel = np.zeros((1, classes), "float32")
        kernel[0, 0] = _logit_for(probability, classes)
        y = np.eye(classes, dtype="float32")[np.zeros(BATCH, int)]
        loss = losses.CategoricalCrossentropy()
    head.kernel.assign(kernel)
    return head, x, y, loss


def _kernel_grad(head, x, y, loss):
    """The loss and its gradient with respect to the kernel, computed in the head's compute dtype.

    `stateless_call` skips the autocasting of `__call__`: the input and the
    kernel are cast here, so a float16 head computes, and differentiates, in float16.
    """
    dtype = head.compute_dtype
    x = keras.ops.cast(x, dtype)

    def fn(kernel):
        output, _ = head.stateless_call([kernel], [], x)
        return loss(y, output)

    value, (grad,) = vjp(fn, [keras.ops.cast(head.kernel.value, dtype)], np.float32(1.0))
    assert keras.backend.standardize_dtype(grad.dtype) == dtype
    return float(value), np.asarray(grad, "float64")


NO_LOGITS_ON_JAX = pytest.mark.skipif(
    BACKEND == "jax", reason="a traced JAX array cannot carry its logits (Keras's softmax tries and fails)"
)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
@pytest.mark.parametrize("probability", [1e-2, 1e-4, 1e-6])
def test_a_float16_head_gives_the_float32_gradient_at_small_probabilities(activation, probability):
    # Our head gives its probabilities in float32 (on JAX, where they cannot carry their logits, too).
    head_and_data = _head_and_data(layers.Dense, activation, CLASSES, probability, "mixed_float16")
    assert keras.backend.standardize_dtype(head_and_data[0](head_and_data[1]).dtype) == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the head gives what the loss needs: no warning
        low_value, low_grad = _kernel_grad(*head_and_data)
    value, grad = _kernel_grad(*_head_and_data(layers.Dense, activation, CLASSES, probability, "float32"))
    assert np.isfinite(low_grad).all(), low_grad
    # The true class's logit is rounded to float16 (3 significant digits).
    np.testing.assert_allclose(low_value, value, rtol=1e-2)
    np.testing.assert_allclose(low_grad, grad, rtol=2e-2, atol=1e-3 * np.abs(grad).max())
    # The gradient is unit-scaled on the logits: (p - 1) × batch × the class rule, not divided by p.
    assert np.abs(grad).max() < 10 * BATCH


@pytest.mark.skipif(BACKEND != "jax", reason="TensorFlow's and PyTorch's outputs carry their logits")
@pytest.mark.parametrize("ours", [True, False], ids=["ours", "plain"])
def test_on_jax_our_float16_head_trains_where_a_plain_one_is_warned_about_and_overflows(ours):
    # A jit-compiled `fit` step: the traced output cannot carry its logits. Ours gives float32
    # probabilities; Keras's gives float16 ones, whose gradient -1/p × the loss's scale overflows.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        head = (layers.Dense(CLASSES, activation="softmax", use_bias=False) if ours
                else keras.layers.Dense(CLASSES, activation="softmax", use_bias=False))
        model = keras.Sequential([keras.Input((1,)), head])
        kernel = np.zeros((1, CLASSES), "float32")
        kernel[0, 0] = _logit_for(1e-6, CLASSES)
        head.kernel.assign(kernel)
        model.compile(keras.optimizers.SGD(1e-3), losses.CategoricalCrossentropy(), auto_scale_loss=False,
                      jit_compile=True)
        y = np.eye(CLASSES, dtype="float32")[np.zeros(BATCH, int)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(np.ones((BATCH, 1), "float32"), y, batch_size=BATCH, epochs=1, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    warned = any("float16 probabilities" in str(w.message) for w in caught)
    finite = bool(np.isfinite(keras.ops.convert_to_numpy(head.kernel)).all())
    assert (warned, finite) == ((False, True) if ours else (True, False))


@NO_LOGITS_ON_JAX
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_a_plain_float16_keras_head_is_read_through_its_logits(activation):
    # A head kept as Keras wrote it, float16 throughout: Keras's softmax and
    # sigmoid attach their logits, which the loss differentiates instead.
    plain = _head_and_data(keras.layers.Dense, activation, CLASSES, 1e-6, "mixed_float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        value, grad = _kernel_grad(*plain)
    assert np.isfinite(grad).all(), grad
    reference = _head_and_data(keras.layers.Dense, activation, CLASSES, 1e-6, "float32")
    np.testing.assert_allclose(grad, _kernel_grad(*reference)[1], rtol=2e-2)


def test_float16_probabilities_without_logits_are_warned_about():
    probabilities = keras.ops.cast(keras.ops.softmax(np.zeros((2, 4), "float32")), "float16")  # carries no logits
    with pytest.warns(UserWarning, match="float16 probabilities"):
        losses.CategoricalCrossentropy()(np.eye(4, dtype="float32")[[0, 1]], probabilities)


@pytest.mark.parametrize("loss_cls, keras_cls", [
    (losses.CategoricalCrossentropy, keras.losses.CategoricalCrossentropy),
    (losses.SparseCategoricalCrossentropy, keras.losses.SparseCategoricalCrossentropy),
])
def test_the_value_from_a_softmax_output_is_keras_value_on_its_logits(loss_cls, keras_cls):
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    labels = np.arange(6) % 5
    y = labels if loss_cls is losses.SparseCategoricalCrossentropy else np.eye(5, dtype="float32")[labels]
    probabilities = keras.activations.softmax(keras.ops.convert_to_tensor(logits))
    expected = float(keras_cls(from_logits=True)(y, logits))
    assert float(loss_cls()(y, probabilities)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(6, 1), (4, 3), (2, 3, 5)])
def test_binary_crossentropy_per_example_is_keras_function_bit_for_bit(from_logits, label_smoothing, shape):
    # The unit-scaled loss's own `fn` (PyTorch's kernel called without Keras's MPS question) gives
    # Keras's function's numbers exactly, and so the value Keras's loss reports.
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, size=shape).astype("float32")
    y_pred = rng.normal(size=shape).astype("float32") if from_logits else rng.uniform(0.01, 0.99, size=shape)
    y_pred = keras.ops.convert_to_tensor(y_pred.astype("float32"))
    ours = losses.BinaryCrossentropy(from_logits=from_logits, label_smoothing=label_smoothing)
    per_example = ours.fn(y_true, y_pred, **ours._fn_kwargs)
    expected = keras.losses.binary_crossentropy(y_true, y_pred, from_logits=from_logits,
                                                label_smoothing=label_smoothing)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(per_example), keras.ops.convert_to_numpy(expected))
    plain = keras.losses.BinaryCrossentropy(from_logits=from_logits, label_smoothing=label_smoothing)
    assert float(ours(y_true, y_pred)) == float(plain(y_true, y_pred))


def test_binary_crossentropy_of_mismatched_shapes_says_so():
    loss = losses.BinaryCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match=r"same shape.*Received"):
        loss.fn(np.zeros((4, 3), "float32"), keras.ops.zeros((4, 2)), from_logits=True)


_COMPILED_CASES = {  # name: (loss, labels from a rng, head on the logits)
    "binary, logits": (lambda: losses.BinaryCrossentropy(from_logits=True),
                       lambda rng: rng.integers(0, 2, size=(8, 1)).astype("float32"), None),
    "binary, sigmoid": (losses.BinaryCrossentropy, lambda rng: rng.integers(0, 2, size=(8, 1)).astype("float32"),
                        "sigmoid"),
    "sparse, softmax": (losses.SparseCategoricalCrossentropy, lambda rng: rng.integers(0, 4, size=(8,)), "softmax"),
    "categorical, softmax": (losses.CategoricalCrossentropy,
                             lambda rng: np.eye(4, dtype="float32")[rng.integers(0, 4, size=(8,))], "softmax"),
    "squared error": (losses.MeanSquaredError, lambda rng: rng.normal(size=(8, 4)).astype("float32"), None),
}


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile")
@pytest.mark.parametrize("case", list(_COMPILED_CASES))
def test_every_loss_compiles_whole_under_torch_compile(case):
    # Keras's binary cross-entropy asks torch.backends.mps.is_available(), which breaks a
    # compiled graph; a training step around the loss then compiles in pieces. `fullgraph=True`
    # raises at any break.
    import torch

    make_loss, make_labels, head = _COMPILED_CASES[case]
    rng = np.random.default_rng(0)
    y_true = torch.tensor(make_labels(rng))
    units = 1 if case.startswith("binary") else 4
    logits = torch.tensor(rng.normal(size=(8, units)).astype("float32"), requires_grad=True)
    loss = make_loss()

    def step(y_true, logits):
        return loss(y_true, logits if head is None else getattr(keras.activations, head)(logits))

    # The first call, eager, makes the scale's autograd function: Dynamo cannot trace a class
    # definition (in `fit`, Keras's symbolic build makes it first).
    eager_value = step(y_true, logits)
    (eager_grad,) = torch.autograd.grad(eager_value, [logits])
    compiled_value = torch.compile(step, fullgraph=True)(y_true, logits)
    (compiled_grad,) = torch.autograd.grad(compiled_value, [logits])
    np.testing.assert_allclose(compiled_value.detach().numpy(), eager_value.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(compiled_grad.numpy(), eager_grad.numpy(), rtol=1e-6)
