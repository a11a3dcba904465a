"""The unit-scaled LSTM's ops: its scaled weights, input, hidden state, dropout and one step.

The rule and its derivation are in `keras_unitscale.rules.lstm`.
"""

import keras
from keras import ops

from keras_unitscale import checks
from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.ops.common import as_compute_dtype
from keras_unitscale.ops.common import check_dims_match
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import to_float
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import replicas
from keras_unitscale.sizes import shape as shape_of

__all__ = ["lstm_weights", "lstm_inputs", "lstm_hidden_in", "lstm_hidden_out", "lstm_dropout", "lstm_cell"]


def sequence_sizes(x):
    """`(batch, steps, features)` of a sequence `(batch, T, D)` or a step `(batch, D)`."""
    check_rank("x", x, 2, 3)
    dims = shape_of(x)
    if len(dims) == 2:
        return dims[0], 1, dims[1]
    return dims


def check_units(kernel_name, kernel, rows, rows_name, gates):
    """A recurrent kernel's units: its rows must be `rows`, its columns one block per gate."""
    dims = shape_of(kernel)
    count = len(gates.split(", "))
    check_dims_match(f"`{kernel_name}` rows and {rows_name}", f"{kernel_name}.shape[0]", dims[0], rows_name, rows)
    if is_static(dims[1]) and dims[1] % count:
        raise ValueError(
            f"`{kernel_name}` must have {count}·units columns (gates {gates}). "
            f"Received: {kernel_name}.shape={tuple(dims)}"
        )
    return dims[1] // count if is_static(dims[1]) else dims[1] / float(count)


def lstm_weights(kernel, recurrent_kernel, bias, x, return_sequences=True, forget_bias=1.0, fp8=False):
    """The LSTM's weights with their unit-scaling factors, for one sequence `x`.

    Rule (`rules.lstm.weights`), with `n = batch·m`, `m = T` if the upstream
    gradient reaches every step (`return_sequences`) else 1, and `ĝ`, `r_h`,
    `κ_U`, `κ_b` from `lstm_rule`: kernel × `D^-1/2` forward and `1/(√n·ĝ)`
    backward; recurrent kernel × `H^-1/2` forward (it multiplies the plain
    hidden state h̃, see `lstm_hidden_in`) and `1/(√n·ĝ·r_h·κ_U)` backward;
    bias × 1 forward and `1/(√n·ĝ·κ_b)` backward. The weights are leaves, so
    forward and backward scales may differ. These are the tensors to hand to
    a fused LSTM kernel (cuDNN) in place of the raw weights.

    Args:
        kernel: `(D, 4H)`, unit-variance at initialisation.
        recurrent_kernel: `(H, 4H)`, unit-variance at initialisation.
        bias: `(4H,)` or `None`.
        x: the input sequence `(batch, T, D)` (or one step `(batch, D)`,
            counted as T = 1); only its sizes and dtype are used.
        return_sequences: whether the upstream gradient reaches every step.
        forget_bias: the forget-gate bias the rule is derived for.
        fp8: cast the two kernels to E4M3 at unit scale, before their
            scales (for `lstm_cell(..., fp8=True)`).

    Returns:
        `(kernel, recurrent_kernel, bias)`, scaled, in `x`'s dtype (`bias`
        stays `None` if it was).

    Examples:
        >>> import numpy as np
        >>> k, r, b = lstm_weights(np.ones((4, 8), "float32"), np.ones((2, 8), "float32"),
        ...                        None, np.zeros((3, 5, 4), "float32"))
        >>> float(keras.ops.convert_to_numpy(k)[0, 0]), b is None
        (0.5, True)
    """
    return scaled_recurrent_weights(
        kernel, recurrent_kernel, bias, x, "i, f, g, o",
        lambda features, units, batch, steps: rules.lstm.weights(
            features, units, batch, steps, return_sequences, forget_bias),
        lambda bias, units: check_rank("bias", bias, 1, 1),
        fp8,
    )


def scaled_recurrent_weights(kernel, recurrent_kernel, bias, x, gates, rule, check_bias, fp8):
    """What the LSTM's and the GRU's weight ops share: checks, dtypes, FP8 casts, then each weight's scales.

    `rule(features, units, batch, steps)` gives the layer's `RecurrentWeightScales`
    (`batch` counting every replica's rows); `check_bias(bias, units)` checks
    the bias's shape.
    """
    kernel = to_float(kernel, "kernel")
    x = to_float(x, "x", like=kernel)
    recurrent_kernel = to_tensor(recurrent_kernel, "recurrent_kernel")
    check_rank("kernel", kernel, 2, 2)
    check_rank("recurrent_kernel", recurrent_kernel, 2, 2)
    batch, steps, features = sequence_sizes(x)
    units = check_units("kernel", kernel, features, "x.shape[-1]", gates)
    check_units("recurrent_kernel", recurrent_kernel, units, "units", gates)
    scales = rule(features, units, batch * replicas(), steps)
    kernel, recurrent_kernel = as_compute_dtype(kernel, x), as_compute_dtype(recurrent_kernel, x)
    if fp8:
        kernel, recurrent_kernel = precision.cast_inputs(kernel, recurrent_kernel)
    kernel = scaled(kernel, *scales.kernel)
    recurrent_kernel = scaled(recurrent_kernel, *scales.recurrent_kernel)
    if bias is not None:
        bias = to_tensor(bias, "bias")
        check_bias(bias, units)
        bias = scaled(as_compute_dtype(bias, x), *scales.bias)
    return kernel, recurrent_kernel, bias


def lstm_inputs(x, units, return_sequences=True, forget_bias=1.0):
    """Scales the gradient of an LSTM's input sequence (a cut edge): `x` unchanged.

    Rule (`rules.lstm.input_grad`): gradient × `√(D/4H)·√(T/m)/ĝ` (`m` as in
    `lstm_weights`). `x_t` feeds only step t's input projection, so this
    backward-only scale is a cut; it is right unless `x` also feeds
    something else whose gradient is added to this one.

    Args:
        x: `(batch, T, D)`, or one step `(batch, D)`.
        units: H, the LSTM's units.
        return_sequences: whether the upstream gradient reaches every step.
        forget_bias: the forget-gate bias the rule is derived for.

    Returns:
        `x`, with its gradient scaled.

    Examples:
        >>> import numpy as np
        >>> y = lstm_inputs(np.ones((2, 3, 4), "float32"), units=8)
        >>> keras.ops.convert_to_numpy(y).shape
        (2, 3, 4)
    """
    x = to_float(x, "x")
    checks.positive_int("units", units)
    _, steps, features = sequence_sizes(x)
    return scale_bwd(x, rules.lstm.input_grad(features, units, steps, return_sequences, forget_bias))


def lstm_hidden_in(h, forget_bias=1.0):
    """The unit-scaled state h → the plain hidden state h̃ = h·r_h (both passes).

    Examples:
        >>> import numpy as np
        >>> y = lstm_hidden_in(np.ones((1,), "float32"))
        >>> round(float(keras.ops.convert_to_numpy(y)[0]), 3)
        0.225
    """
    return times_both_passes(h, rules.lstm.lstm_rule(forget_bias).hidden_rms)


def lstm_hidden_out(h, forget_bias=1.0):
    """The plain hidden state h̃ → the unit-scaled output and state s·h̃ (both passes).

    Examples:
        >>> import numpy as np
        >>> y = lstm_hidden_out(np.ones((1,), "float32"))
        >>> round(float(keras.ops.convert_to_numpy(y)[0]), 2)
        4.44
    """
    return times_both_passes(h, rules.lstm.lstm_rule(forget_bias).output_scale)


def times_both_passes(h, scale):
    """`h · scale` in both passes: an edge inside the recurrence, which is not cut."""
    return scaled(to_tensor(h, "h"), scale, scale)


def lstm_dropout(x, mask, rate):
    """Applies a cached inverted-dropout mask (values 0 or `1/(1-rate)`), unit-scaled.

    Rule (`rules.activations.dropout`): × `(1 - rate)^1/2` in both passes,
    so that the output keeps unit RMS. An RNN draws one mask per sequence
    and reuses it at every step; this applies it.

    Args:
        x: the step's inputs or the recurrent state.
        mask: the mask, `x`'s shape, or `None` (no dropout).
        rate: the dropout rate, in [0, 1).

    Returns:
        The masked, rescaled tensor.

    Examples:
        >>> import numpy as np
        >>> y = lstm_dropout(np.ones((2,), "float32"), np.array([0.0, 2.0], "float32"), 0.5)
        >>> [round(v, 4) for v in keras.ops.convert_to_numpy(y).tolist()]
        [0.0, 1.4142]
    """
    scale = rules.activations.dropout(rate)
    x = to_tensor(x, "x")
    if mask is None or rate == 0:
        return x
    return scaled(x * ops.cast(mask, x.dtype), scale, scale)


def add_rows(a, b):
    """`a + b` for two `(batch, n)` tensors, an empty batch included.

    On TensorFlow, `ops.add` takes a second operand that squeezes to one
    dimension for a bias (`tf.nn.bias_add`); a `(0, n)` tensor does, and
    `BiasAdd` then fails ("Biases must be 1D"). Promote as `ops.add` does,
    then add with `+`, which is the plain elementwise add on every backend.
    """
    dtypes = keras.backend.standardize_dtype(a.dtype), keras.backend.standardize_dtype(b.dtype)
    if dtypes[0] != dtypes[1]:
        dtype = keras.backend.result_type(*dtypes)
        a, b = ops.cast(a, dtype), ops.cast(b, dtype)
    return a + b


def lstm_cell(x, h, c, kernel, recurrent_kernel, bias=None, forget_bias=1.0, fp8=False, plain_state=False):
    """One step of the unit-scaled LSTM, given the weights from `lstm_weights`.

    `z = x·kernel + h̃·recurrent_kernel + bias` with `h̃ = lstm_hidden_in(h)`;
    plain sigmoid gates i, f, o and tanh candidate g (gate order i, f, g, o,
    as in Keras); `c' = f·c + i·g`; `h' = lstm_hidden_out(o·tanh(c'))`. The
    scaling lives in the weights and in `lstm_hidden_in` / `lstm_hidden_out`;
    a fused kernel computes the same recurrence on h̃.

    Args:
        x: `(batch, D)`, the step's input.
        h: `(batch, H)`, the unit-scaled hidden state.
        c: `(batch, H)`, the cell state.
        kernel: from `lstm_weights`.
        recurrent_kernel: from `lstm_weights`.
        bias: from `lstm_weights`.
        forget_bias: the forget-gate bias the rule is derived for.
        fp8: the two matmuls in scale-free FP8: `x` and h̃ cast to E4M3, the
            gradient of `z` to E5M2 (the kernels come cast from
            `lstm_weights(..., fp8=True)`).
        plain_state: `h` is the plain state h̃ and the plain h̃' is returned,
            as a loop over a whole sequence steps it: the state's two scales
            then apply once per sequence (`lstm_hidden_in` on the initial
            state, `lstm_hidden_out` on the outputs), not at every step.

    Returns:
        `(h', c')`.

    Examples:
        >>> import numpy as np
        >>> x, h = np.ones((2, 4), "float32"), np.zeros((2, 3), "float32")
        >>> weights = lstm_weights(np.ones((4, 12), "float32"), np.ones((3, 12), "float32"),
        ...                        np.zeros((12,), "float32"), x)
        >>> h, c = lstm_cell(x, h, h, *weights)
        >>> tuple(h.shape), tuple(c.shape)
        ((2, 3), (2, 3))
    """
    x = to_float(x, "x", like=kernel)
    h = to_tensor(h, "h")
    h_plain = h if plain_state else lstm_hidden_in(h, forget_bias)
    if fp8:
        x, h_plain = precision.cast_inputs(x, h_plain)
    z = add_rows(ops.matmul(x, kernel), ops.matmul(h_plain, recurrent_kernel))
    if fp8:
        z = precision.cast_output_gradient(z)
    if bias is not None:
        z = ops.add(z, bias)
    z_i, z_f, z_g, z_o = ops.split(z, 4, axis=-1)
    c = add_rows(ops.sigmoid(z_f) * ops.cast(c, z.dtype), ops.sigmoid(z_i) * ops.tanh(z_g))
    h = ops.sigmoid(z_o) * ops.tanh(c)
    return (h if plain_state else lstm_hidden_out(h, forget_bias)), c
