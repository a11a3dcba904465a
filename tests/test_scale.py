"""The scaling primitive on every backend, dtype policy and execution mode."""

import keras
import numpy as np
import pytest
from helpers import BACKEND
from helpers import unit_normal
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale import scale_bwd
from keras_unitscale import scale_fwd
from keras_unitscale import scaled
from keras_unitscale.scale import with_gradient
from keras_unitscale.autodiff import vjp


@pytest.mark.parametrize(
    "fn, fwd, bwd",
    [
        (lambda x: scaled(x, 3.0, 0.25), 3.0, 0.25),
        (lambda x: scaled(x, 0.5, 0.5), 0.5, 0.5),
        (lambda x: scale_fwd(x, 7.0), 7.0, 1.0),
        (lambda x: scale_bwd(x, 1 / 64), 1.0, 1 / 64),
        (lambda x: scaled(x), 1.0, 1.0),
    ],
)
def test_forward_and_backward_scales(fn, fwd, bwd):
    x = unit_normal(5, 3)
    upstream = unit_normal(5, 3, seed=1)
    out, (grad,) = vjp(fn, [x], upstream)
    np.testing.assert_allclose(out, x * fwd, rtol=1e-6)
    np.testing.assert_allclose(grad, upstream * bwd, rtol=1e-6)


@pytest.mark.parametrize("tensor_scales", [False, True])
def test_scaled_equals_the_generic_custom_gradient(tensor_scales):
    # On PyTorch `scaled` has its own autograd function; everywhere it computes what `with_gradient` does.
    fwd, bwd = (ops.convert_to_tensor(3.0), ops.convert_to_tensor(0.25)) if tensor_scales else (3.0, 0.25)
    x, upstream = unit_normal(5, 3), unit_normal(5, 3, seed=1)
    out, (grad,) = vjp(lambda t: scaled(t, fwd, bwd), [x], upstream)
    reference, (reference_grad,) = vjp(lambda t: with_gradient(t, lambda v: v * fwd, lambda g: g * bwd), [x], upstream)
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(grad, reference_grad)


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's autograd graph")
def test_on_pytorch_a_scale_is_one_autograd_node_that_holds_no_tensor():
    import torch

    x = torch.ones(4, requires_grad=True)
    y = scaled(x * 1.0, 2.0, 0.5)
    assert type(y.grad_fn).__name__ == "ScaledBackward"
    assert y.grad_fn.saved_tensors == ()  # Keras's generic custom gradient keeps its input until the backward pass
    y.sum().backward()
    assert x.grad.tolist() == [0.5] * 4


def test_scaled_together_is_one_scaled_per_tensor_and_one_autograd_node_on_pytorch():
    from keras_unitscale.scale import scaled_together

    gain, bias, upstream = unit_normal(6), unit_normal(6, seed=1), unit_normal(6, seed=2)
    scales = ([2.0, 1.0], [0.25, 0.5])
    # Each output's vjp: the upstream on that output, zero on the other.
    for i in range(2):
        out, grads = vjp(lambda g, b: scaled_together([g, None, b], [scales[0][0], 3.0, scales[0][1]],
                                                       [scales[1][0], 3.0, scales[1][1]])[::2][i], [gain, bias], upstream)
        np.testing.assert_allclose(out, [gain, bias][i] * scales[0][i], rtol=1e-6)
        np.testing.assert_allclose(grads[i], upstream * scales[1][i], rtol=1e-6)
        np.testing.assert_array_equal(grads[1 - i], np.zeros_like(upstream))
    variables = [keras.Variable(gain), keras.Variable(bias)]
    outputs = scaled_together([variables[0], None, variables[1]], [2.0, 1.0, 1.0], [0.25, 1.0, 0.5])
    assert outputs[1] is None
    if BACKEND == "torch":
        assert type(outputs[0].grad_fn).__name__ == type(outputs[2].grad_fn).__name__ == "ScaledTogetherBackward"
    with pytest.raises(ValueError, match="`bwd` must be a finite number. Received: bwd=nan"):
        scaled_together(variables, [1.0, 1.0], [0.5, float("nan")])


def test_unit_scales_return_the_input_itself():
    x = ops.convert_to_tensor(unit_normal(2))
    assert scaled(x) is x


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_scale_applies_in_the_tensors_own_dtype(dtype):
    x = ops.cast(unit_normal(4, 4), dtype)
    upstream = ops.cast(unit_normal(4, 4, seed=1), dtype)

    out, (grad,) = vjp(lambda t: scaled(t, 8.0, 0.125), [x], upstream)

    assert str(out.dtype) == dtype
    assert str(grad.dtype) == dtype
    # Powers of two are exact in every float format.
    np.testing.assert_array_equal(
        out.astype("float32"), ops.convert_to_numpy(ops.cast(x, "float32")) * 8.0
    )
    np.testing.assert_array_equal(
        grad.astype("float32"), ops.convert_to_numpy(ops.cast(upstream, "float32")) * 0.125
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "2", True, None])
def test_bad_scale_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match="Received: fwd="):
        scaled(np.ones(2, "float32"), fwd=bad)
    with pytest.raises(ValueError, match="Received: bwd="):
        scaled(np.ones(2, "float32"), bwd=bad)


class _ScaledWeight(keras.layers.Layer):
    """`x * scaled(w, fwd, bwd)` with one trainable weight: the primitive on a Variable."""

    def __init__(self, fwd, bwd, **kwargs):
        super().__init__(**kwargs)
        self.fwd, self.bwd = fwd, bwd

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * scaled(self.w, self.fwd, self.bwd)


def _mean_prediction(y_true, y_pred):
    return ops.mean(ops.cast(y_pred, "float32"))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_primitive_on_a_variable_inside_fit(policy, jit_compile):
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch.compile takes ~30 s a model on CPU (CI time); XLA is what jit means elsewhere")
    keras.config.set_dtype_policy(policy)
    layer = _ScaledWeight(fwd=2.0, bwd=0.25)
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=1.0),
        loss=_mean_prediction,
        jit_compile=jit_compile,
        auto_scale_loss=False,
    )
    x = np.ones((8, 4), "float32")

    prediction = ops.convert_to_numpy(model(x))
    assert str(prediction.dtype) == keras.DTypePolicy(policy).compute_dtype
    np.testing.assert_allclose(prediction.astype("float32"), 2.0)

    model.fit(x, np.zeros((8, 4)), batch_size=8, epochs=1, verbose=0, shuffle=False)

    # d loss / d scaled(w) = mean over the batch and units of x = 1/4 per unit;
    # the backward scale multiplies it by 0.25; SGD with lr 1 subtracts it.
    assert layer.w.dtype == "float32"
    np.testing.assert_allclose(ops.convert_to_numpy(layer.w), 1.0 - 0.25 / 4, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function is TensorFlow's")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function_with_an_unknown_batch_dimension(jit_compile):
    import tensorflow as tf

    kernel = tf.constant(unit_normal(16, 8, seed=2))

    @tf.function(
        input_signature=[tf.TensorSpec([None, 16]), tf.TensorSpec([None, 8])],
        jit_compile=jit_compile,
    )
    def forward_backward(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = U.dense(x, kernel)
        return (y,) + tuple(tape.gradient(y, [x, kernel], output_gradients=upstream))

    x = unit_normal(32, 16)
    upstream = unit_normal(32, 8, seed=1)
    y, grad_x, grad_kernel = (t.numpy() for t in forward_backward(x, upstream))

    np.testing.assert_allclose(y, x @ kernel.numpy() / 4.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_x, upstream @ kernel.numpy().T / 4.0, rtol=1e-5, atol=1e-6)
    # The batch (32) is known only at run time; the weight-gradient scale follows it.
    np.testing.assert_allclose(grad_kernel, x.T @ upstream / 32**0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="only TensorFlow traces with unknown dimensions")
def test_ops_trace_with_every_dimension_unknown():
    import tensorflow as tf

    spec = tf.TensorSpec([None, None, None])

    @tf.function(input_signature=[spec, tf.TensorSpec([None, None], tf.int32)])
    def forward(x, labels):
        kernel = tf.ones((8, 12)) / 8.0
        h = U.layer_norm(U.add(x, x[:1]))
        h = U.dense(h, kernel)
        q = tf.reshape(h, (tf.shape(h)[0], tf.shape(h)[1], 3, -1))
        h = U.dot_product_attention(q, q, q, is_causal=True)
        logits = U.dense_readout(tf.reshape(h, (tf.shape(h)[0], tf.shape(h)[1], 12)), tf.ones((12, 5)))
        return U.cross_entropy(logits, labels) + U.mse(logits, logits)

    x = unit_normal(2, 6, 8)
    labels = np.zeros((2, 6), "int32")
    eager = forward.python_function(tf.constant(x), tf.constant(labels))
    np.testing.assert_allclose(forward(x, labels).numpy(), eager.numpy(), rtol=1e-5)


def test_scaling_disabled_removes_every_scale_op_and_restores_them():
    x, w = unit_normal(4, 8), unit_normal(8, 3, seed=1)
    from keras_unitscale import scaling_disabled

    with scaling_disabled():
        out, (grad_x, grad_w) = vjp(U.dense, [x, w], np.ones((4, 3), "float32"))
    np.testing.assert_allclose(out, x @ w, rtol=1e-5)
    np.testing.assert_allclose(grad_x, np.ones((4, 3)) @ w.T, rtol=1e-5)
    np.testing.assert_allclose(grad_w, x.T @ np.ones((4, 3)), rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(U.dense(x, w)), x @ w / 8**0.5, rtol=1e-5)
