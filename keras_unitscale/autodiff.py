"""Gradients of a function of tensors, on whichever backend Keras runs.

`keras.ops` has no gradient op: each backend differentiates in its own way.
This module is the one place that knows them, for the library's diagnostics
(scale reports, the demo) and its tests. Training itself goes through Keras's
trainers and never needs it.
"""

import inspect

import keras
from keras import ops

__all__ = ["vjp", "vjp_tensors", "compiled", "layer_vjp", "sequential_vjp"]


def vjp(fn, primals, cotangent):
    """Evaluates `fn(*primals)` and the vector-Jacobian product with `cotangent`.

    That is, the gradient of `sum(fn(*primals) * cotangent)` with respect to
    each primal: what backpropagation delivers to `primals` when `cotangent`
    arrives at the output.

    Args:
        fn: a function of tensors returning one tensor.
        primals: a sequence of arrays or tensors (floating point).
        cotangent: an array or tensor of the output's shape: the upstream
            gradient.

    Returns:
        `(output, grads)`: the output as a NumPy array and a tuple of NumPy
        arrays, one gradient per primal.

    Examples:
        >>> import numpy as np
        >>> out, (grad,) = vjp(lambda x: x * 3.0, [np.ones((2,), "float32")],
        ...                    np.ones((2,), "float32"))
        >>> grad.tolist()
        [3.0, 3.0]
    """
    output, grads = vjp_tensors(fn, primals, cotangent)
    return ops.convert_to_numpy(output), tuple(ops.convert_to_numpy(g) for g in grads)


def vjp_tensors(fn, primals, cotangent):
    """`vjp` returning backend tensors, so that it can run inside `compiled` functions."""
    backend = keras.backend.backend()
    primals = [ops.convert_to_tensor(p) for p in primals]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for primal in primals:
                tape.watch(primal)
            output = fn(*primals)
        grads = tape.gradient(
            output, primals, output_gradients=ops.convert_to_tensor(cotangent, output.dtype)
        )
        grads = [tf.zeros_like(p) if g is None else g for g, p in zip(grads, primals)]
    elif backend == "jax":
        import jax

        output, pullback = jax.vjp(fn, *primals)
        grads = pullback(ops.convert_to_tensor(cotangent, output.dtype))
    elif backend == "torch":
        import torch

        primals = [p.detach().clone().requires_grad_(True) for p in primals]
        output = fn(*primals)
        grads = torch.autograd.grad(
            output,
            primals,
            grad_outputs=ops.convert_to_tensor(cotangent, output.dtype),
            allow_unused=True,
        )
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, primals)]
    else:
        raise ValueError(
            "vjp supports the tensorflow, jax and torch backends. "
            f"Received: backend={backend!r}"
        )
    return output, tuple(grads)


def compiled(fn):
    """`fn` traced into a graph once and reused: `tf.function` or `jax.jit`; PyTorch runs it eagerly.

    `fn` must be a pure function of its tensor arguments: a model's variables
    are read through `keras.StatelessScope` from arguments, or the compiled
    function would keep the values they had when it was traced.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    if backend == "jax":
        import jax

        return jax.jit(fn)
    return fn


def layer_vjp(layer, inputs, cotangent, training=False):
    """Gradients of a built layer (or model) with respect to its inputs and trainable weights.

    Args:
        layer: a built Keras layer or model taking one tensor, or a structure
            of them (a KerasHub backbone's dict of token ids and mask).
        inputs: an array, or a structure of arrays; the gradient of one array
            is returned when it is floating point.
        cotangent: the upstream gradient, shaped like the output.
        training: passed to the call.

    Returns:
        `(output, input_grad, weight_grads)`: NumPy arrays; `input_grad` is
        `None` for integer inputs; `weight_grads` maps each trainable
        variable's path to its gradient.

    Examples:
        >>> layer = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones")
        >>> _, grad_x, grads = layer_vjp(layer, np.ones((1, 3), "float32"), np.ones((1, 2), "float32"))
        >>> grad_x.tolist(), grads[layer.kernel.path].tolist()
        ([[2.0, 2.0, 2.0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    """
    inputs = keras.tree.map_structure(ops.convert_to_tensor, inputs)
    if not layer.built:
        layer(inputs)
    differentiable_input = not keras.tree.is_nested(inputs) and "float" in keras.backend.standardize_dtype(
        inputs.dtype)
    trainable = layer.trainable_variables
    non_trainable = layer.non_trainable_variables

    call_kwargs = {"training": training} if "training" in inspect.signature(layer.call).parameters else {}

    def fn(x, *weights):
        output, _ = layer.stateless_call(
            list(weights), [v.value for v in non_trainable], x if differentiable_input else inputs,
            **call_kwargs,
        )
        return output

    output, grads = vjp(fn, [inputs if differentiable_input else ops.zeros(()), *[v.value for v in trainable]], cotangent)
    return (
        output,
        grads[0] if differentiable_input else None,
        {variable.path: grad for variable, grad in zip(trainable, grads[1:])},
    )


def sequential_vjp(model, inputs, cotangent):
    """Each layer's output and the gradient arriving at it, for a `keras.Sequential` model.

    Args:
        model: a built `keras.Sequential`.
        inputs: the model's input array.
        cotangent: the upstream gradient at the model's output.

    Returns:
        A list of `(layer name, output, gradient)` with NumPy arrays, in
        layer order; the last gradient is `cotangent` itself.

    Examples:
        >>> layer = keras.layers.Dense(2, kernel_initializer="ones", name="d")
        >>> model = keras.Sequential([keras.Input((2,)), layer])
        >>> [(name, grad.tolist()) for name, _, grad in
        ...  sequential_vjp(model, np.ones((1, 2), "float32"), np.ones((1, 2), "float32"))]
        [('d', [[1.0, 1.0]])]
    """
    if not isinstance(model, keras.Sequential):
        raise ValueError(f"`model` must be a keras.Sequential. Received: model={type(model).__name__}")
    rows = []
    activation = ops.convert_to_tensor(inputs)
    for index, layer in enumerate(model.layers):
        activation = layer(activation)
        output = ops.convert_to_numpy(activation)
        if index + 1 == len(model.layers):
            grad = ops.convert_to_numpy(ops.convert_to_tensor(cotangent))
        else:
            _, grad, _ = layer_vjp(keras.Sequential(model.layers[index + 1 :]), output, cotangent)
        rows.append((layer.name, output, grad))
    return rows
