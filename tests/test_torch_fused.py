"""Eager PyTorch's fused ops (`keras_unitscale.torch_fused`): the same numbers as the composed ops, fewer passes."""

import numpy as np
import pytest
from helpers import BACKEND

from keras_unitscale import scaling_disabled
from keras_unitscale.ops import torch_fused
from keras_unitscale.ops import activations
from keras_unitscale.ops import convolution
from keras_unitscale.ops import linear
from keras_unitscale.ops import norms
from keras_unitscale.ops import residual

on_torch = pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's eager fast path")


def test_the_fused_path_is_pytorchs_only():
    x = np.ones((2, 3), "float32")
    assert torch_fused.applies(keras_tensor(x), (1.0, 0.5)) is (BACKEND == "torch")


def keras_tensor(x):
    import keras

    return keras.ops.convert_to_tensor(x)


def _tensors(shapes, seed=0, dtype="float32"):
    import torch

    rng = np.random.default_rng(seed)
    return [None if shape is None else torch.tensor(rng.normal(size=shape).astype(dtype), requires_grad=True)
            for shape in shapes]


def _run(fn, inputs, seed=1):
    """fn's outputs and every input's gradient for a random upstream gradient of each output."""
    import torch

    for t in inputs:
        if t is not None:
            t.grad = None
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    rng = np.random.default_rng(seed)
    upstream = [torch.tensor(rng.normal(size=tuple(y.shape)).astype("float32")).to(y.dtype) for y in outputs]
    torch.autograd.backward(outputs, upstream, retain_graph=True)
    return [y.detach() for y in outputs] + [t.grad.clone() for t in inputs if t is not None], _graph_nodes(outputs)


def _graph_nodes(outputs):
    """The names of every autograd node behind `outputs`."""
    names, pending, seen = set(), [y.grad_fn for y in outputs], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return names


_IDS = np.array([[3, 7, 3, 49], [0, -1, 7, 3]], "int32")

# (name, function of the tensors, their shapes, the fused autograd node it must make)
CASES = [
    ("dense 2-D", lambda x, w, b: linear.dense(x, w, b), [(64, 32), (32, 16), (16,)], "ScaledDenseBackward"),
    ("dense 3-D, no bias", lambda x, w: linear.dense(x, w), [(4, 8, 32), (32, 16)], "ScaledDenseBackward"),
    ("dense 1-D", lambda x, w, b: linear.dense(x, w, b), [(32,), (32, 16), (16,)], "ScaledDenseBackward"),
    ("dense unconstrained", lambda x, w, b: linear.dense(x, w, b, constraint=None), [(64, 32), (32, 16), (16,)],
     "ScaledDenseBackward"),
    ("readout", lambda x, w, b: linear.dense_readout(x, w, b), [(64, 32), (32, 10), (10,)], "ScaledDenseBackward"),
    ("dense with weight multipliers", lambda x, w, b: linear.dense(x, w, b, weight_multipliers=(0.5, 3.0)),
     [(4, 8, 32), (32, 16), (16,)], "ScaledDenseBackward"),
    ("dense with relu", lambda x, w, b: linear.dense(x, w, b, activation="relu", weight_multipliers=(0.5, 3.0)),
     [(4, 8, 32), (32, 16), (16,)], "ScaledDenseBackward"),
    ("dense with gelu, unconstrained", lambda x, w, b: linear.dense(x, w, b, constraint=None, activation="gelu"),
     [(64, 32), (32, 16), (16,)], "ScaledDenseBackward"),
    ("dense with silu, no bias", lambda x, w: linear.dense(x, w, activation="swish"), [(64, 32), (32, 16)],
     "ScaledDenseBackward"),
    ("dense with tanh (not fused)", lambda x, w, b: linear.dense(x, w, b, activation="tanh"),
     [(64, 32), (32, 16), (16,)], "ScaledDenseBackward"),
    ("dense with silu, mult 2 (not fused)", lambda x, w, b: linear.dense(x, w, b, activation="silu", mult=2.0),
     [(64, 32), (32, 16), (16,)], "ScaledDenseBackward"),
    # An einsum that is a matmul of reshaped operands (attention's projections) runs as the dense.
    ("einsum with weight multipliers",
     lambda x, w, b: linear.einsum_dense("abc,cde->abde", x, w, b, constraint=None, weight_multipliers=(0.5, 3.0)),
     [(2, 5, 16), (16, 4, 8), (4, 8)], "ScaledDenseBackward"),
    ("einsum, attention's query", lambda x, w, b: linear.einsum_dense("abc,cde->abde", x, w, b),
     [(2, 5, 16), (16, 4, 8), (4, 8)], "ScaledDenseBackward"),
    ("einsum, attention's output", lambda x, w, b: linear.einsum_dense("abcd,cde->abe", x, w, b),
     [(2, 5, 4, 8), (4, 8, 16), (16,)], "ScaledDenseBackward"),
    ("einsum with an ellipsis", lambda x, w: linear.einsum_dense("...b,bc->...c", x, w), [(2, 3, 4, 8), (8, 6)],
     "ScaledDenseBackward"),
    ("einsum, a bias broadcast inside", lambda x, w, b: linear.einsum_dense("abc,cd->abd", x, w, b),
     [(3, 5, 8), (8, 6), (1, 6)], "ScaledEinsumDenseBackward"),
    ("einsum summing a leading axis", lambda x, w, b: linear.einsum_dense("ab...,bc->ac...", x, w, b),
     [(3, 8, 5), (8, 6), (6, 1)], "ScaledEinsumDenseBackward"),
    ("einsum with weight multipliers, not a matmul",
     lambda x, w, b: linear.einsum_dense("ab...,bc->ac...", x, w, b, constraint=None, weight_multipliers=(0.5, 3.0)),
     [(3, 8, 5), (8, 6), (6, 1)], "ScaledEinsumDenseBackward"),
    ("conv 2-D, same", lambda x, w, b: convolution.conv(x, w, b, padding="same"), [(2, 6, 6, 4), (3, 3, 4, 5), (5,)],
     "ScaledConvBackward"),
    ("conv 1-D with relu and weight multipliers",
     lambda x, w, b: convolution.conv(x, w, b, activation="relu", weight_multipliers=(0.5, 3.0)),
     [(2, 9, 4), (3, 4, 5), (5,)], "ScaledConvBackward"),
    ("conv 2-D, strided, dilated, grouped, no bias",
     lambda x, w: convolution.conv(x, w, strides=(2, 1), padding="same", dilation_rate=(1, 2)),
     [(2, 9, 8, 4), (3, 3, 2, 6)], "ScaledConvBackward"),
    ("conv 3-D, channels first, unconstrained",
     lambda x, w, b: convolution.conv(x, w, b, data_format="channels_first", constraint=None),
     [(2, 3, 5, 4, 6), (2, 3, 2, 3, 4), (4,)], "ScaledConvBackward"),
    # Repeated ids (their rows' gradients add up) and one counted from the end, as Keras's `take` counts it.
    ("embedding", lambda t: linear.embedding(keras_tensor(_IDS), t), [(50, 8)], "ScaledEmbeddingBackward"),
    ("embedding with a table multiplier", lambda t: linear.embedding(keras_tensor(_IDS), t, table_multiplier=0.5),
     [(50, 8)], "ScaledEmbeddingBackward"),
    ("relu", lambda x: activations.relu(x), [(64, 32)], "ScaledActivationBackward"),
    ("gelu", lambda x: activations.gelu(x), [(64, 32)], "ScaledActivationBackward"),
    ("gelu, tanh form, unconstrained", lambda x: activations.gelu(x, constraint=None, approximate=True), [(64, 32)],
     "ScaledActivationBackward"),
    ("silu", lambda x: activations.silu(x), [(64, 32)], "ScaledActivationBackward"),
    ("residual split", lambda x: residual.residual_split(x, tau=0.4), [(4, 8, 16)], "ResidualSplitBackward"),
    ("residual add", lambda r, s: residual.residual_add(r, s, tau=0.4), [(4, 8, 16), (4, 8, 16)],
     "ResidualAddBackward"),
    ("layer norm", lambda x, g, b: norms.layer_norm(x, g, b), [(4, 8, 16), (16,), (16,)],
     "ScaledLayerNormBackward"),
    ("layer norm over two axes", lambda x, g: norms.layer_norm(x, g, axis=(-2, -1)), [(4, 8, 16), (8, 16)],
     "ScaledLayerNormBackward"),
]


@on_torch
@pytest.mark.parametrize("name, fn, shapes, node", CASES, ids=[case[0] for case in CASES])
def test_each_fused_op_gives_the_composed_ops_numbers(monkeypatch, name, fn, shapes, node):
    inputs = _tensors(shapes)
    fused, fused_nodes = _run(fn, inputs)
    assert node in fused_nodes
    monkeypatch.setattr(torch_fused, "applies", lambda *args: False)
    monkeypatch.setattr(norms, "_torch_native", lambda *args: False)
    composed, composed_nodes = _run(fn, inputs)
    assert node not in composed_nodes
    for got, expected in zip(fused, composed):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=2e-5, atol=2e-6 * float(expected.abs().max()))


@on_torch
def test_the_fused_path_steps_aside_where_scaling_is_off_or_the_matmul_is_fp8():
    x, w = _tensors([(16, 8), (8, 4)])
    with scaling_disabled():
        y, nodes = _run(lambda x, w: linear.dense(x, w), [x, w])
    assert "ScaledDenseBackward" not in nodes
    np.testing.assert_allclose(y[0].numpy(), (x @ w).detach().numpy(), rtol=1e-6)
    _, nodes = _run(lambda x, w: linear.dense(x, w, fp8=True), [x, w])
    assert "ScaledDenseBackward" not in nodes


@on_torch
@pytest.mark.parametrize("op", ["dense", "einsum", "conv"])
def test_a_float16_bias_gradient_is_summed_in_float32(op):
    import torch

    # 4096 rows of 30 sum to 122880, past float16's 65504; scaled by
    # 4096^-1/2 the gradient is 1920, which float16 holds.
    rows, value = 4096, 30.0
    x = torch.zeros(rows, 8, dtype=torch.float16)
    kernel = torch.ones(8, 4, dtype=torch.float16, requires_grad=True)
    bias = torch.zeros(4, dtype=torch.float16, requires_grad=True)
    if op == "dense":
        y = linear.dense(x, kernel, bias)
    elif op == "einsum":  # summed over x's leading axis: not a matmul of reshaped operands, so the einsum's own function
        y = linear.einsum_dense("ba,bc->ac", x.t(), kernel, bias)
    else:  # a 1×1 convolution over 4096 positions: the same rows
        y = convolution.conv(x[None], kernel[None], bias)
    node = {"dense": "ScaledDenseBackward", "einsum": "ScaledEinsumDenseBackward", "conv": "ScaledConvBackward"}[op]
    assert type(y.grad_fn).__name__ == node
    y.backward(torch.full_like(y, value))
    np.testing.assert_allclose(bias.grad.float().numpy(), value * rows * rows**-0.5, rtol=1e-3)


@on_torch
@pytest.mark.parametrize("fn, shapes", [
    (lambda x, w, b: linear.einsum_dense("ab,bc->ac", x, w, b), [(4, 8), (8, 6), (4, 6)]),
    (lambda x: residual.residual_split(x, tau=0.5), [(4, 6)]),
    (lambda x: activations.gelu(x), [(4, 6)]),
], ids=["einsum with a full-size bias", "residual split", "gelu"])
def test_the_backward_pass_leaves_the_incoming_gradient_as_it_was(fn, shapes):
    import torch

    inputs = _tensors(shapes)
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [torch.full_like(y, 3.0) for y in outputs]
    torch.autograd.backward(outputs, upstream)
    for g in upstream:
        assert bool((g == 3.0).all())


@on_torch
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_a_hidden_dense_applies_its_activation_in_its_own_autograd_function(activation):
    from keras_unitscale import layers

    x, kernel, bias = _tensors([(8, 16), (16, 4), (4,)])
    _, nodes = _run(lambda x, w, b: linear.dense(x, w, b, activation=activation), [x, kernel, bias])
    assert nodes == {"ScaledDenseBackward", "AccumulateGrad"}
    layer = layers.Dense(4, activation=activation)
    _, nodes = _run(layer, [x])
    assert nodes == {"ScaledDenseBackward", "AccumulateGrad"}


@on_torch
def test_a_hidden_convolution_takes_relus_scale_into_its_own_and_relu_into_its_autograd_function():
    from keras_unitscale import layers

    (x,) = _tensors([(2, 6, 4)])
    _, nodes = _run(layers.Conv1D(5, 3, activation="relu"), [x])
    assert "ScaledActivationBackward" not in nodes
    assert nodes == {"ScaledConvBackward", "AccumulateGrad"}


@on_torch
@pytest.mark.parametrize("kernel_size, strides", [((2, 2), 1), ((3, 3), 2)], ids=["even kernel", "stride 2"])
def test_an_uneven_same_padding_keeps_keras_convolution_which_pads_first(kernel_size, strides):
    import keras

    x, kernel = _tensors([(2, 6, 6, 4), (*kernel_size, 4, 5)])
    assert torch_fused.conv_padding("same", (6, 6), kernel_size, (strides,) * 2, (1, 1)) is None
    (y, *_), nodes = _run(lambda x, w: convolution.conv(x, w, strides=strides, padding="same"), [x, kernel])
    assert "ScaledConvBackward" not in nodes
    assert tuple(y.shape) == tuple(keras.ops.conv(x, kernel, strides=strides, padding="same").shape)


def _batch_norm_step(layer_kwargs, x, mask=None):
    """A fresh unit-scaled BatchNormalization's training call on `x`: outputs, gradients, moving statistics, nodes."""
    import torch

    from keras_unitscale import layers

    layer = layers.BatchNormalization(momentum=0.5, **layer_kwargs)
    layer.build(tuple(x.shape))
    rng = np.random.default_rng(2)
    affine = [variable for variable in (layer.gamma, layer.beta) if variable is not None]
    for variable in (*affine, layer.moving_mean, layer.moving_variance):
        variable.assign(rng.uniform(0.5, 2.0, size=variable.shape).astype("float32"))
    x = x.detach().clone().requires_grad_(True)
    y = layer(x, training=True, mask=mask)
    upstream = torch.tensor(rng.normal(size=tuple(y.shape)).astype("float32"))
    y.backward(upstream)
    values = [y.detach(), x.grad, *(variable.value.grad for variable in affine),
              layer.moving_mean.value.detach().clone(), layer.moving_variance.value.detach().clone()]
    return values, _graph_nodes([y])


@on_torch
@pytest.mark.parametrize("shape, layer_kwargs", [
    ((4, 8, 16), {}),
    ((3, 5, 5, 6), {"weight_multipliers": {"gamma": 2.0, "beta": 0.5}}),
    ((2, 3), {"weight_multipliers": {"beta": 3.0}}),
    ((4, 8, 16), {"scale": False, "weight_multipliers": {"beta": 3.0}}),
], ids=["1-D", "2-D, multipliers", "2 rows", "bias only"])
def test_batch_normalizations_training_call_as_one_function_gives_keras_calls_numbers(monkeypatch, shape, layer_kwargs):
    # Keras's call with the gain and bias lent, scaled (`_keras_call_with_affine_gradients`), is the reference.
    # Centred data: Keras's variance, E[x²] - E[x]², loses digits where the mean is large against the spread
    # (PyTorch's kernel does not; with 2 rows and a mean of 1, Keras's gradients are 20-50 times further from
    # float64's).
    x = _tensors([shape])[0] * 3.0
    fused, fused_nodes = _batch_norm_step(layer_kwargs, x)
    assert "ScaledBatchNormBackward" in fused_nodes
    monkeypatch.setattr(torch_fused, "applies", lambda *args: False)
    reference, keras_nodes = _batch_norm_step(layer_kwargs, x)
    assert "ScaledBatchNormBackward" not in keras_nodes
    for got, expected in zip(fused, reference):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=2e-5, atol=2e-6 * float(expected.abs().max()))


@on_torch
@pytest.mark.parametrize("layer_kwargs, shape, masked", [
    ({"axis": 1}, (4, 6, 5), False),
    ({}, (1, 6), False),
    ({"renorm": True}, (4, 6), False),
    ({}, (4, 5, 6), True),
    ({"center": False, "scale": False}, (4, 6), False),
], ids=["channels first", "one row", "renorm", "mask", "neither gain nor bias"])
def test_batch_normalization_keeps_keras_call_where_pytorchs_kernel_does_not_compute_it(layer_kwargs, shape, masked):
    import torch

    x = _tensors([shape])[0]
    mask = torch.tensor(np.arange(shape[0] * shape[1]).reshape(shape[:2]) % 3 > 0) if masked else None
    values, nodes = _batch_norm_step(layer_kwargs, x, mask)
    assert "ScaledBatchNormBackward" not in nodes
    assert all(bool(torch.isfinite(value).all()) for value in values if value is not None)
