"""Unit-scaled ops as single PyTorch autograd functions: eager PyTorch's fast path.

In eager PyTorch every op is a Python call, and every Keras op adds its own
work on top (converting and checking its arguments). A unit-scaled dense
written with the scaling primitive is six of them (three backward scales, a
matmul, a bias add, a forward scale), where Keras's `Dense` is two. Here the
same computation is one `torch.autograd.Function` whose forward and backward
apply the rule's scales themselves: the numbers are those of the composed
ops (tested equal), the Python calls fewer.

Only the arithmetic lives here. The scales come from the rules
(`keras_unitscale.rules`), computed by the op that calls this, so a rule is
still stated once; each op (`ops.linear.dense`, `einsum_dense`,
`ops.common.elementwise`, `ops.residual`) takes this path where `applies`
says so and its composed ops otherwise (TensorFlow and JAX, where XLA fuses
them anyway; FP8; scaling disabled; scales that are tensors).
"""

import math

from keras_unitscale import scale
from keras_unitscale.sizes import static_memo

_FUNCTIONS = {}  # name -> `torch.autograd.Function`, made on first use (torch is imported only then)


def applies(x, scales):
    """Whether an op on `x` may run here: PyTorch, scaling on, Python-number scales, a dense floating `x`."""
    return scale.torch_function_applies(x, scales)


def dense(x, kernel, bias, output, grad_input, grad_weight, kernel_multiplier=1.0, bias_multiplier=1.0,
          activation=None):
    """`(x @ m_k·kernel + m_b·bias) · output`; `x`'s gradient × `grad_input`, the kernel's and bias's × `grad_weight`.

    The same numbers as `scale_fwd(scale_bwd(x, grad_input) @ scale_bwd(scale_fwd(kernel, m_k), grad_weight)
    + scale_bwd(scale_fwd(bias, m_b), grad_weight), output)`, with `m_k`, `m_b`
    the weights' forward multipliers. In float16 the bias's gradient is
    summed in float32, as `ops.linear.add_bias` does (why: there).

    `activation`, `(name, output, grad)` with the name in
    `NATIVE_ACTIVATIONS`, is then applied as `activation` applies it, in the
    same autograd function: its gradient scale joins the dense's.
    """
    return _function("dense", _make_dense).apply(
        x, kernel, bias, output, grad_input, grad_weight, kernel_multiplier, bias_multiplier, activation)


def einsum_transposes(x_spec, kernel_spec, out_spec):
    """The equations of the einsum's two gradients, `(x's, the kernel's)`; None where one is not an einsum.

    `x, kernel -> out` has the gradients `out, kernel -> x` and `x, out ->
    kernel` when every label of each input is in the other input or the
    output (none summed over one operand alone): so for every equation
    Keras's `EinsumDense` and `MultiHeadAttention` use.
    """
    x, kernel, out = set(x_spec), set(kernel_spec), set(out_spec)
    if not (x <= kernel | out and kernel <= x | out):
        return None
    return f"{out_spec},{kernel_spec}->{x_spec}", f"{x_spec},{out_spec}->{kernel_spec}"


def einsum_as_dense(specs, x, kernel, bias):
    """`(x, kernel, bias, output shape)` reshaped so that the einsum is `dense`'s matmul; None where it is not one.

    `x_spec = batch + summed`, `kernel_spec = summed + free`, `out_spec =
    batch + free`, and a bias over the free labels or none (Keras's
    `EinsumDense` in attention's projections, and every `"...b,bc->...c"`):
    then `y = x.reshape(*batch, summed) @ kernel.reshape(summed, free)`, and
    the rule's bias scale is the kernel's (each sums over the same rows), as
    `dense` takes it. The reshapes are views; `dense` runs one `addmm` where
    the einsum took PyTorch's parser and a permuted batched product.
    """
    split = _matmul_split(specs, tuple(kernel.shape), None if bias is None else tuple(bias.shape))
    if split is None:
        return None
    batch_rank, summed_size, free_size, free_shape = split
    batch_shape = tuple(x.shape[:batch_rank])
    return (x.reshape(*batch_shape, summed_size), kernel.reshape(summed_size, free_size),
            None if bias is None else bias.reshape(free_size), (*batch_shape, *free_shape))


@static_memo  # asked at every call of every projection: its answer depends on the equation and the weights' shapes
def _matmul_split(specs, kernel_shape, bias_shape):
    """`einsum_as_dense`'s reading of the equation: `(batch rank, summed size, free size, free shape)`, or None."""
    x_spec, kernel_spec, out_spec = specs
    summed = "".join(label for label in x_spec if label not in out_spec)
    batch, free = x_spec[:len(x_spec) - len(summed)], kernel_spec[len(summed):]
    if not summed or not (x_spec.endswith(summed) and kernel_spec.startswith(summed) and out_spec == batch + free):
        return None
    free_shape = kernel_shape[len(summed):]
    if bias_shape is not None and bias_shape != free_shape:
        return None
    return len(batch), math.prod(kernel_shape[:len(summed)]), math.prod(free_shape), free_shape


def einsum_output_shape(specs, x, kernel):
    """The shape of `einsum(x, kernel)` for the spelled-out `(x_spec, kernel_spec, out_spec)`."""
    x_spec, kernel_spec, out_spec = specs
    sizes = {**dict(zip(x_spec, x.shape)), **dict(zip(kernel_spec, kernel.shape))}
    return tuple(sizes[label] for label in out_spec)


def einsum_dense(specs, transposes, x, kernel, bias, output, grad_input, grad_weight, grad_bias, kernel_multiplier=1.0,
                 bias_multiplier=1.0):
    """`(einsum(x, m_k·kernel) + m_b·bias) · output`, the gradients scaled as `dense`'s (the bias's by `grad_bias`).

    `specs` are the equation's labels with any ellipsis spelled out
    (`ops.linear._einsum_specs`); `transposes` are `einsum_transposes(*specs)`,
    which must not be None. The scales are applied to the kernel-sized operands and
    results (the kernel before each product, the kernel's gradient after),
    not to the activations: on the same numbers, fewer passes over memory.
    """
    return _function("einsum_dense", _make_einsum_dense).apply(
        x, kernel, bias, specs, transposes, output * kernel_multiplier, grad_input * kernel_multiplier, grad_weight, grad_bias,
        output * bias_multiplier)


def conv_padding(padding, spatial_shape, kernel_size, strides, dilation):
    """PyTorch's padding argument for Keras's `padding` ("valid" or "same"); None where "same" is uneven (or neither).

    Keras's "same" pads `total // 2` before and the rest after (TensorFlow's
    rule); PyTorch's convolutions pad both sides alike, so an uneven "same"
    (an even kernel, or a stride that leaves an odd total) keeps Keras's op,
    which pads the input first.
    """
    padding = padding.lower() if isinstance(padding, str) else padding
    if padding == "valid":
        return [0] * len(kernel_size)
    if padding != "same":  # Keras's op says what is wrong
        return None
    padding = []
    for length, size, stride, rate in zip(spatial_shape, kernel_size, strides, dilation):
        reach = (size - 1) * rate + 1
        total = max(0, (-(-length // stride) - 1) * stride + reach - length)
        if total % 2:
            return None
        padding.append(total // 2)
    return padding


def conv(x, kernel, bias, layout, output, grad_input, grad_weight, kernel_multiplier=1.0, bias_multiplier=1.0,
         relu=False):
    """`(conv(x, m_k·kernel) + m_b·bias) · output`, then relu if asked; gradients scaled as `dense`'s.

    Keras's layouts: `x` is `(batch, *spatial, channels)` (or channels
    first), the kernel `(*kernel_size, in_channels / groups, filters)`.
    `layout` is `(channels_last, strides, padding, dilation, groups)`, with
    PyTorch's padding (`conv_padding`). The same numbers as `ops.convolution`'s
    composed path: the output and the bias in one convolution, with
    PyTorch's own backward kernel (`aten.convolution_backward`) for the input's
    and the kernel's gradients in one call, then scaled in place. With `relu`,
    relu runs in place and its derivative reads its output, as `dense`'s does.
    """
    return _function("conv", _make_conv).apply(
        x, kernel, bias, layout, output * kernel_multiplier, output * bias_multiplier, grad_input * kernel_multiplier,
        grad_weight, relu)


def batch_norm(x, gamma, beta, epsilon, gamma_multiplier, beta_multiplier, grad_scale):
    """Keras's batch normalisation in training, over every axis but the last, as one autograd function.

    `(x - mean) / sqrt(variance + epsilon) · m_g·gamma + m_b·beta` with the
    batch's mean and (biased) variance, as `keras.layers.BatchNormalization`
    computes it; the gain's and bias's gradients × `grad_scale`, as
    `scale.scaled_together` lends them to Keras's call. PyTorch's own kernels:
    the statistics and the normalisation in one (`native_batch_norm`), and
    every gradient in one (`aten.native_batch_norm_backward`), where Keras's
    ops are a dozen each way. `x` has at least 2 rows. Returns `(y, mean,
    variance)`: the statistics, without gradients, for the moving ones.
    """
    return _function("batch_norm", _make_batch_norm).apply(
        x, gamma, beta, epsilon, gamma_multiplier, beta_multiplier, grad_scale)


def embedding(ids, table, table_multiplier, grad_scale):
    """The rows `m·table[ids]`; the table's gradient × `grad_scale`: `ops.linear.embedding` as one autograd function.

    The numbers of Keras's lookup (`ops.take` on the table, negative ids
    counted from the end, PyTorch's `embedding` and its dense backward) of
    `scale.scaled(table, m, grad_scale)`; `m` multiplies the rows looked up,
    the same products as on the table, on fewer numbers.
    """
    return _function("embedding", _make_embedding).apply(ids, table, table_multiplier, grad_scale)


def layer_norm(x, gamma, beta, normalized_shape, epsilon, grad_scale):
    """`torch.nn.functional.layer_norm`, the gain's and bias's gradients × `grad_scale`, as one autograd function.

    The numbers of `scale.scaled_together` on the gain and bias before
    PyTorch's layer norm (`ops.norms._torch_layer_norm`'s other path): PyTorch's
    kernel each way (`aten.native_layer_norm_backward` gives all three
    gradients), without an autograd function of its own for the two scales.
    """
    return _function("layer_norm", _make_layer_norm).apply(x, gamma, beta, normalized_shape, epsilon, grad_scale)


def residual_split(x, residual_weight, skip_weight):
    """`(x, x)`, whose gradients arrive at `x` as `residual_weight·g_residual + skip_weight·g_skip`."""
    return _function("residual_split", _make_residual_split).apply(x, residual_weight, skip_weight)


def residual_add(residual, skip, residual_weight, skip_weight):
    """`residual_weight·residual + skip_weight·skip`, whose gradient reaches both unscaled (the split scaled it)."""
    return _function("residual_add", _make_residual_add).apply(residual, skip, residual_weight, skip_weight)


# The activations `activation` takes: those with a PyTorch kernel for each pass (`_make_activation` names them).
NATIVE_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def activation(name, x, output, grad):
    """`output · f(x)` for f in `NATIVE_ACTIVATIONS`, whose input gradient is `grad · f'(x)` times the incoming one.

    `ops.common.elementwise` in one autograd function: PyTorch's kernels for
    f and f', each scaled in place, so neither pass makes a tensor for its scale.
    """
    return _function("activation", _make_activation).apply(x, name, output, grad)


def _function(name, make):
    if name not in _FUNCTIONS:
        _FUNCTIONS[name] = make()
    return _FUNCTIONS[name]


def _make_dense():
    import torch

    kernels = _activation_kernels()

    class ScaledDense(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernel, bias, output, grad_input, grad_weight, kernel_multiplier, bias_multiplier,
                    activation):
            name, activation_output, activation_grad = activation or (None, 1.0, 1.0)
            # The activation's gradient scale multiplies the gradient that
            # reaches the dense, so it joins the dense's own; x's gradient is
            # through the multiplied kernel: m_k of it.
            ctx.scales = (grad_input * kernel_multiplier * activation_grad, grad_weight * activation_grad)
            ctx.derivative = None if name is None else kernels[name][1]
            ctx.x_shape = x.shape
            # The rows are reshaped once and saved as they are: a view, or the
            # one copy of an input that is not contiguous (attention's output).
            rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
            # `addmm` scales the product inside the matrix multiply (BLAS's
            # alpha and beta): no pass over the output of its own.
            alpha = output * kernel_multiplier
            y = _scaled_mm(rows, kernel, alpha) if bias is None else torch.addmm(
                bias, rows, kernel, beta=output * bias_multiplier, alpha=alpha)
            if x.ndim != 2:
                y = y.reshape(*x.shape[:-1], kernel.shape[-1])
            if name == "relu":
                # relu's derivative reads its output as well as its input (c > 0
                # keeps the signs), so it runs in place and keeps no input.
                y = y.relu_() if activation_output == 1.0 else y.relu_().mul_(activation_output)
                ctx.save_for_backward(rows, kernel, y)
            elif name is not None:
                ctx.save_for_backward(rows, kernel, y)
                y = kernels[name][0](y).mul_(activation_output)
            else:
                ctx.save_for_backward(rows, kernel)
            return y

        @staticmethod
        def backward(ctx, upstream):
            rows, kernel, *activation_input = ctx.saved_tensors
            grad_input, grad_weight = ctx.scales
            needs_x, needs_kernel, needs_bias = ctx.needs_input_grad[:3]
            if activation_input:
                upstream = ctx.derivative(upstream, activation_input[0])
            upstream_rows = upstream if upstream.ndim == 2 else upstream.reshape(-1, upstream.shape[-1])
            dx = dkernel = dbias = None
            if needs_x:
                dx = _scaled_mm(upstream_rows, kernel.t(), grad_input)
                dx = dx if len(ctx.x_shape) == 2 else dx.reshape(ctx.x_shape)
            if needs_kernel:
                dkernel = _scaled_mm(rows.t(), upstream_rows, grad_weight)
            if needs_bias:
                dbias = _bias_gradient(upstream_rows, 0, grad_weight)
            return dx, dkernel, dbias, None, None, None, None, None, None

    return ScaledDense


def _summing_dtype(dtype):
    """The dtype a bias's gradient is summed in: float32 from float16, as `ops.linear.add_bias` does (why: there)."""
    import torch

    return torch.float32 if dtype == torch.float16 else dtype


def _bias_gradient(upstream, axes, scale):
    """A bias's gradient: `upstream` summed over the `axes` it was broadcast along, × `scale`, in its dtype."""
    wide = _summing_dtype(upstream.dtype)
    if wide == upstream.dtype:  # the sum alone: its dtype argument and a cast back cost an eager step two calls
        return upstream.sum(axes).mul_(scale)
    return upstream.sum(axes, dtype=wide).mul_(scale).to(upstream.dtype)


_ZEROS = {}  # (dtype, device) -> a zero scalar for `addmm`'s (ignored) input: one tensor, not one per call


def _scaled_mm(a, b, scale):
    """`scale · (a @ b)` in one kernel: beta = 0 ignores the (zero) input."""
    import torch

    if torch.compiler.is_compiling():  # a traced tensor must not outlive its graph
        return torch.addmm(a.new_zeros(()), a, b, beta=0.0, alpha=scale)
    key = (a.dtype, a.device)
    if key not in _ZEROS:
        _ZEROS[key] = a.new_zeros(())
    return torch.addmm(_ZEROS[key], a, b, beta=0.0, alpha=scale)


def _make_conv():
    import torch
    import torch.nn.functional as F

    convolutions = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
    channels_last_formats = {3: torch.contiguous_format, 4: torch.channels_last, 5: torch.channels_last_3d}

    def in_layout(t, channels_last):
        # The memory format Keras's own op gives PyTorch's kernels: channels
        # last in memory for Keras's channels-last tensors (their own order:
        # the input's permuted view is one already), contiguous otherwise.
        # oneDNN's fast path wants the input, kernel and gradient to agree;
        # otherwise it copies each, the saved input once more in the backward.
        return t.contiguous(memory_format=channels_last_formats[t.ndim] if channels_last else torch.contiguous_format)

    class ScaledConv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernel, bias, layout, kernel_scale, bias_scale, grad_input, grad_weight, relu):
            channels_last, strides, padding, dilation, groups = layout
            # PyTorch's layouts from Keras's: channels first, kernel (filters, in / groups, *size).
            x = in_layout(x.movedim(-1, 1) if channels_last else x, channels_last)
            kernel = kernel.movedim(-1, 0).movedim(-1, 1)
            ctx.layout, ctx.scales = layout, (grad_input, grad_weight)
            bias = None if bias is None else bias * bias_scale
            y = convolutions[x.ndim - 2](
                x, in_layout(kernel * kernel_scale, channels_last), bias, strides, padding, dilation, groups)
            if relu:
                y = y.relu_()
                ctx.save_for_backward(x, kernel, y)
            else:
                ctx.save_for_backward(x, kernel)
            return y.movedim(1, -1) if channels_last else y

        @staticmethod
        def backward(ctx, upstream):
            x, kernel, *relu_output = ctx.saved_tensors
            channels_last, strides, padding, dilation, groups = ctx.layout
            grad_input, grad_weight = ctx.scales
            needs_x, needs_kernel, needs_bias = ctx.needs_input_grad[:3]
            upstream = in_layout(upstream.movedim(-1, 1) if channels_last else upstream, channels_last)
            if relu_output:
                upstream = torch.ops.aten.threshold_backward(upstream, relu_output[0], 0)
            # The kernel × x's gradient scale: x's gradient comes out scaled (the kernel's does not read it).
            dx, dkernel, _ = torch.ops.aten.convolution_backward(
                upstream, x, in_layout(kernel * grad_input, channels_last), None, strides, padding, dilation, False,
                [0] * len(strides), groups, [needs_x, needs_kernel, False])
            dbias = None
            if dx is not None:
                dx = dx.movedim(1, -1) if channels_last else dx
            if dkernel is not None:
                dkernel = dkernel.mul_(grad_weight).movedim(0, -1).movedim(0, -2)
            if needs_bias:  # the bias is in x's dtype (`ops.convolution._torch_conv`), so in the upstream's
                dbias = _bias_gradient(upstream, (0, *range(2, upstream.ndim)), grad_weight)
            return dx, dkernel, dbias, None, None, None, None, None, None

    return ScaledConv


def _affine_gradients(dgamma, dbeta, grad_scale):
    """A norm's gain and bias gradients × `grad_scale` (None stays None): `scaled`'s backward scale alone, as
    `scale.scaled_together` gives it (the forward multiplier is not in a gradient)."""
    return tuple(None if grad is None else grad.mul_(grad_scale) for grad in (dgamma, dbeta))


def _make_batch_norm():
    import torch

    class ScaledBatchNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, epsilon, gamma_multiplier, beta_multiplier, grad_scale):
            # Channels last: the rows of every other axis, a view of a contiguous x.
            rows = x.reshape(-1, x.shape[-1])
            weight = None if gamma is None else gamma * gamma_multiplier
            bias = None if beta is None else beta * beta_multiplier
            # PyTorch's training kernel, which writes the batch's statistics
            # into "running" ones at momentum 1: the mean, and the variance with
            # Bessel's correction (undone below; at least 2 rows, `batch_norm` says).
            mean, variance = rows.new_zeros(rows.shape[1]), rows.new_zeros(rows.shape[1])
            y, saved_mean, inverse_std = torch.native_batch_norm(
                rows, weight, bias, mean, variance, True, 1.0, epsilon)
            variance.mul_((rows.shape[0] - 1) / rows.shape[0])
            ctx.save_for_backward(rows, weight, saved_mean, inverse_std)
            ctx.epsilon, ctx.grad_scale, ctx.x_shape = epsilon, grad_scale, x.shape
            ctx.mark_non_differentiable(mean, variance)
            return y.reshape(x.shape), mean, variance

        @staticmethod
        def backward(ctx, upstream, _mean_grad, _variance_grad):
            rows, weight, mean, inverse_std = ctx.saved_tensors
            needs_x, needs_gamma, needs_beta = ctx.needs_input_grad[:3]
            # Contiguous: PyTorch's kernel takes a slow path for a broadcast gradient (of a sum, say).
            upstream_rows = upstream.reshape(rows.shape).contiguous()
            dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                upstream_rows, rows, weight, None, None, mean, inverse_std, True, ctx.epsilon,
                [needs_x, needs_gamma, needs_beta])
            dx = None if dx is None else dx.reshape(ctx.x_shape)
            return dx, *_affine_gradients(dgamma, dbeta, ctx.grad_scale), None, None, None, None

    return ScaledBatchNorm


def _make_embedding():
    import torch
    import torch.nn.functional as F

    class ScaledEmbedding(torch.autograd.Function):
        @staticmethod
        def forward(ctx, ids, table, table_multiplier, grad_scale):
            vocab = table.shape[0]
            ids = ids if ids.dtype in (torch.int32, torch.int64) else ids.long()
            ids = torch.where(ids < 0, ids + vocab, ids)  # as Keras's `take`
            ctx.save_for_backward(ids)
            ctx.vocab, ctx.grad_scale = vocab, grad_scale
            rows = F.embedding(ids, table)
            return rows if table_multiplier == 1.0 else rows.mul_(table_multiplier)

        @staticmethod
        def backward(ctx, upstream):
            (ids,) = ctx.saved_tensors
            grad = torch.ops.aten.embedding_dense_backward(upstream, ids, ctx.vocab, -1, False)
            return None, grad.mul_(ctx.grad_scale), None, None

    return ScaledEmbedding


def _make_layer_norm():
    import torch

    class ScaledLayerNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta, normalized_shape, epsilon, grad_scale):
            y, mean, inverse_std = torch.native_layer_norm(x, normalized_shape, gamma, beta, epsilon)
            ctx.save_for_backward(x, gamma, beta, mean, inverse_std)
            ctx.normalized_shape, ctx.grad_scale = normalized_shape, grad_scale
            return y

        @staticmethod
        def backward(ctx, upstream):
            x, gamma, beta, mean, inverse_std = ctx.saved_tensors
            dx, dgamma, dbeta = torch.ops.aten.native_layer_norm_backward(
                upstream, x, ctx.normalized_shape, mean, inverse_std, gamma, beta, list(ctx.needs_input_grad[:3]))
            return dx, *_affine_gradients(dgamma, dbeta, ctx.grad_scale), None, None, None

    return ScaledLayerNorm


def _make_einsum_dense():
    import torch

    class ScaledEinsumDense(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, kernel, bias, specs, transposes, kernel_scale, grad_input, grad_weight, grad_bias,
                    bias_scale):
            # The scales on the kernel's side: the forward multipliers folded in by `einsum_dense`.
            x_spec, kernel_spec, out_spec = specs
            ctx.save_for_backward(x, kernel)
            ctx.equations = transposes
            ctx.scales = (grad_input, grad_weight, grad_bias)
            ctx.bias_shape = None if bias is None else bias.shape
            y = torch.einsum(f"{x_spec},{kernel_spec}->{out_spec}", x, kernel * kernel_scale)
            return y if bias is None else y.add_(bias, alpha=bias_scale)

        @staticmethod
        def backward(ctx, upstream):
            x, kernel = ctx.saved_tensors
            for_x, for_kernel = ctx.equations
            grad_input, grad_weight, grad_bias = ctx.scales
            needs_x, needs_kernel, needs_bias = ctx.needs_input_grad[:3]
            dx = dkernel = dbias = None
            if needs_x:
                dx = torch.einsum(for_x, upstream, kernel * grad_input)
            if needs_kernel:
                dkernel = torch.einsum(for_kernel, x, upstream).mul_(grad_weight)
            if needs_bias:
                dbias = _sum_to(upstream, ctx.bias_shape).mul(grad_bias).to(upstream.dtype)
            return dx, dkernel, dbias, None, None, None, None, None, None, None

    def _sum_to(grad, shape):
        # The bias broadcast over the output: its gradient sums the output's
        # over the axes it was broadcast along (in `_summing_dtype`).
        wide = _summing_dtype(grad.dtype)
        leading = tuple(range(grad.ndim - len(shape)))
        summed = grad.sum(leading, dtype=wide) if leading else grad.to(wide)
        broadcast = tuple(axis for axis, size in enumerate(shape) if size == 1 and summed.shape[axis] != 1)
        return summed.sum(broadcast, keepdim=True) if broadcast else summed

    return ScaledEinsumDense


def _make_residual_split():
    import torch

    class ResidualSplit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, residual_weight, skip_weight):
            ctx.weights = (residual_weight, skip_weight)
            return x.view_as(x), x.view_as(x)

        @staticmethod
        def backward(ctx, residual_grad, skip_grad):
            residual_weight, skip_weight = ctx.weights
            # One new tensor: the skip's share, then the residual's added in place.
            grad = skip_grad * skip_weight
            return grad.add_(residual_grad, alpha=residual_weight), None, None

    return ResidualSplit


def _make_residual_add():
    import torch

    class ResidualAdd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, residual, skip, residual_weight, skip_weight):
            return torch.mul(skip, skip_weight).add_(residual, alpha=residual_weight)

        @staticmethod
        def backward(ctx, grad):
            return grad, grad, None, None

    return ResidualAdd


def _activation_kernels():
    """name -> (f, its backward `(incoming gradient, input) -> gradient`): PyTorch's kernels for each pass."""
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    return {
        # relu's backward reads either its input or its output (both positive at the same places).
        "relu": (F.relu, lambda g, x: aten.threshold_backward(g, x, 0)),
        "gelu": (F.gelu, lambda g, x: aten.gelu_backward(g, x)),
        "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda g, x: aten.gelu_backward(g, x, approximate="tanh")),
        "silu": (F.silu, lambda g, x: aten.silu_backward(g, x)),
    }


def _make_activation():
    import torch

    kernels = _activation_kernels()

    class ScaledActivation(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, name, output, grad):
            ctx.save_for_backward(x)
            ctx.derivative, ctx.grad = kernels[name][1], grad
            y = kernels[name][0](x)
            return y.mul_(output) if output != 1.0 else y

        @staticmethod
        def backward(ctx, upstream):
            (x,) = ctx.saved_tensors
            dx = ctx.derivative(upstream, x)
            return (dx.mul_(ctx.grad) if ctx.grad != 1.0 else dx), None, None, None

    return ScaledActivation
