"""Forward values and gradients against the reference PyTorch package `unit-scaling` 0.3.5.

Skipped where it is not installed (`pip install torch==2.13.0 unit-scaling==0.3.5`).
Layouts differ where Keras's differ from PyTorch's: a dense kernel is the
transpose of a `Linear` weight, and attention tensors are
`(batch, seq, heads, dim)` here and `(batch, heads, seq, dim)` there.
"""

import numpy as np
import pytest
from helpers import unit_normal

from keras_unitscale import functional as U
from keras_unitscale.autodiff import vjp

torch = pytest.importorskip("torch")
reference = pytest.importorskip("unit_scaling.functional")
reference_core = pytest.importorskip("unit_scaling.core.functional")

RTOL = 1e-5


def _reference_vjp(fn, primals, cotangent):
    tensors = [torch.tensor(p, requires_grad=True) for p in primals]
    output = fn(*tensors)
    grads = torch.autograd.grad(output, tensors, grad_outputs=torch.tensor(cotangent), allow_unused=True)
    return output.detach().numpy(), tuple(
        np.zeros_like(p) if g is None else g.numpy() for g, p in zip(grads, primals)
    )


def _assert_parity(ours, theirs, primals, cotangent, map_primals=None, map_back=None):
    """Runs both with the same data; `map_primals` converts ours to the reference's layout."""
    out, grads = vjp(ours, primals, cotangent)
    their_primals = map_primals(primals) if map_primals else primals
    their_cotangent = map_back[0](cotangent) if map_back else cotangent
    their_out, their_grads = _reference_vjp(theirs, their_primals, their_cotangent)
    if map_back:
        their_out = map_back[0](their_out)
        their_grads = tuple(f(g) for f, g in zip(map_back[1], their_grads))
    scale = max(1.0, float(np.abs(their_out).max()))
    np.testing.assert_allclose(out, their_out, rtol=RTOL, atol=RTOL * scale)
    for index, (grad, their_grad) in enumerate(zip(grads, their_grads)):
        scale = max(1e-3, float(np.abs(their_grad).max()))
        np.testing.assert_allclose(grad, their_grad, rtol=RTOL, atol=RTOL * scale, err_msg=f"gradient {index}")


@pytest.mark.parametrize("constraint", ["to_output_scale", "gmean", None])
def test_matmul(constraint):
    a, b = unit_normal(3, 6, 8), unit_normal(8, 5, seed=1)
    _assert_parity(
        lambda a, b: U.matmul(a, b, constraint=constraint),
        lambda a, b: reference.matmul(a, b, constraint=constraint),
        [a, b],
        unit_normal(3, 6, 5, seed=2),
    )


@pytest.mark.parametrize("constraint", ["to_output_scale", "to_grad_input_scale", "hmean", None])
@pytest.mark.parametrize("readout", [False, True])
def test_dense_and_readout(constraint, readout):
    x, w, b = unit_normal(4, 3, 8), unit_normal(8, 5, seed=1), unit_normal(5, seed=2)
    ours = U.dense_readout if readout else U.dense
    theirs = reference.linear_readout if readout else reference.linear
    _assert_parity(
        lambda x, w, b: ours(x, w, b, constraint=constraint),
        lambda x, w, b: theirs(x, w.T, b, constraint=constraint),
        [x, w, b],
        unit_normal(4, 3, 5, seed=3),
    )


@pytest.mark.parametrize("shape_b", [(6, 5), (5,), (1,)])
def test_add(shape_b):
    a, b = unit_normal(6, 5), unit_normal(*shape_b, seed=1)
    _assert_parity(U.add, reference.add, [a, b], unit_normal(6, 5, seed=2))


@pytest.mark.parametrize("mult", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("constraint", ["to_output_scale", None])
def test_gelu_silu_softmax(mult, constraint):
    x = unit_normal(7, 16)
    upstream = unit_normal(7, 16, seed=1)
    _assert_parity(
        lambda x: U.gelu(x, mult=mult, constraint=constraint),
        lambda x: reference.gelu(x, mult=mult, constraint=constraint),
        [x],
        upstream,
    )
    _assert_parity(
        lambda x: U.silu(x, mult=mult, constraint=constraint),
        lambda x: reference.silu(x, mult=mult, constraint=constraint),
        [x],
        upstream,
    )
    _assert_parity(
        lambda x: U.softmax(x, axis=-1, mult=mult, constraint=constraint),
        lambda x: reference.softmax(x, dim=-1, mult=mult, constraint=constraint),
        [x],
        upstream,
    )


@pytest.mark.parametrize("mult", [1.0, 2.0])
def test_silu_glu(mult):
    x, gate = unit_normal(7, 16), unit_normal(7, 16, seed=1)
    _assert_parity(
        lambda x, g: U.silu_glu(x, g, mult=mult),
        lambda x, g: reference.silu_glu(x, g, mult=mult),
        [x, gate],
        unit_normal(7, 16, seed=2),
    )


def test_embedding():
    ids = np.random.default_rng(0).integers(0, 11, size=(4, 6))
    table = unit_normal(11, 8)
    _assert_parity(
        lambda t: U.embedding(ids, t),
        lambda t: reference.embedding(torch.tensor(ids), t),
        [table],
        unit_normal(4, 6, 8, seed=1),
    )


def test_layer_norm_and_rms_norm():
    x, gamma, beta = unit_normal(4, 5, 16) * 3, unit_normal(16, seed=1), unit_normal(16, seed=2)
    upstream = unit_normal(4, 5, 16, seed=3)
    _assert_parity(
        U.layer_norm, lambda x, g, b: reference.layer_norm(x, (16,), g, b), [x, gamma, beta], upstream
    )
    _assert_parity(U.rms_norm, lambda x, g: reference.rms_norm(x, (16,), g), [x, gamma], upstream)


def _to_heads_first(t):
    return np.ascontiguousarray(np.swapaxes(t, 1, 2))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mult", [1.0, 3.0])
def test_dot_product_attention(is_causal, mult):
    q, k, v = (unit_normal(2, 12, 3, 8, seed=s) for s in range(3))
    _assert_parity(
        lambda q, k, v: U.dot_product_attention(q, k, v, is_causal=is_causal, mult=mult),
        lambda q, k, v: reference.scaled_dot_product_attention(q, k, v, is_causal=is_causal, mult=mult),
        [q, k, v],
        unit_normal(2, 12, 3, 8, seed=3),
        map_primals=lambda ts: [_to_heads_first(t) for t in ts],
        map_back=(_to_heads_first, [_to_heads_first] * 3),
    )


@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_cross_entropy(mult):
    logits = unit_normal(9, 13)
    labels = np.random.default_rng(1).integers(0, 13, size=(9,))
    _assert_parity(
        lambda z: U.cross_entropy(z, labels, mult=mult),
        lambda z: reference.cross_entropy(z, torch.tensor(labels), mult=mult),
        [logits],
        np.float32(1.0),
    )
    probabilities = np.random.default_rng(2).dirichlet(np.ones(13), size=9).astype("float32")
    _assert_parity(
        lambda z: U.cross_entropy(z, probabilities, mult=mult),
        lambda z: reference.cross_entropy(z, torch.tensor(probabilities), mult=mult),
        [logits],
        np.float32(1.0),
    )


def test_mse():
    pred, true = unit_normal(6, 7), unit_normal(6, 7, seed=1)
    _assert_parity(U.mse, reference.mse_loss, [pred, true], np.float32(1.0))


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_residual_split_add_apply(tau):
    x = unit_normal(5, 8)
    w = unit_normal(8, 8, seed=1)
    _assert_parity(
        lambda x: U.residual_apply(lambda r: U.dense(r, w), x, tau=tau),
        lambda x: reference.residual_apply(
            lambda r: reference.linear(r, torch.tensor(w.T), None), x, tau=tau
        ),
        [x],
        unit_normal(5, 8, seed=2),
    )


@pytest.mark.parametrize("mult, ratio", [(1.0, 1.0), (0.5, 2.0)])
def test_transformer_residual_scaling_rule(mult, ratio):
    ours = U.transformer_residual_scaling_rule(mult, ratio)
    theirs = reference_core.transformer_residual_scaling_rule(mult, ratio)
    for layers in (2, 8, 24):
        np.testing.assert_allclose(
            [ours(i, layers) for i in range(layers)], [theirs(i, layers) for i in range(layers)], rtol=1e-12
        )
