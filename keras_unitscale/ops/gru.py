"""The unit-scaled GRU's ops: its scaled weights, input, state and one step.

The rule and its derivation are in `keras_unitscale.rules.gru`. Dropout is the
LSTM's (`lstm_dropout`: one cached mask per sequence, rescaled to unit RMS).
"""

from keras import ops

from keras_unitscale import checks
from keras_unitscale import precision
from keras_unitscale import rules
from keras_unitscale.ops.common import to_float
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.ops.lstm import add_rows
from keras_unitscale.ops.lstm import scaled_recurrent_weights
from keras_unitscale.ops.lstm import sequence_sizes
from keras_unitscale.ops.lstm import times_both_passes
from keras_unitscale.scale import scale_bwd
from keras_unitscale.sizes import shape as shape_of

__all__ = ["gru_weights", "gru_inputs", "gru_hidden_in", "gru_hidden_out", "gru_cell"]

def _check_bias(bias, units, reset_after):
    expected = (2, 3 * units) if reset_after else (3 * units,)
    dims = tuple(shape_of(bias))
    if len(dims) != len(expected) or any(
        isinstance(d, int) and isinstance(e, int) and d != e for d, e in zip(dims, expected)
    ):
        raise ValueError(
            f"`bias` must have shape {expected} (reset_after={reset_after}: "
            f"{'an input and a recurrent row' if reset_after else 'one row'} of 3·units). "
            f"Received: bias.shape={dims}"
        )


def gru_weights(kernel, recurrent_kernel, bias, x, return_sequences=True, reset_after=True, fp8=False):
    """The GRU's weights with their unit-scaling factors, for one sequence `x`.

    Rule (`rules.gru.weights`), with `n = batch·m`, `m = T` if the upstream
    gradient reaches every step (`return_sequences`) else 1, and the
    constants of `gru_rule`: kernel × `D^-1/2` forward and `1/(√n·ĝ)`
    backward; recurrent kernel × `H^-1/2` forward (it multiplies the plain
    state h̃, see `gru_hidden_in`) and `1/(√n·ĝ·r_h·ρ_U·κ_U)` backward; bias ×
    1 forward and `1/(√n·ĝ·ρ_b·κ_b)` backward. These are the tensors to hand
    to a fused GRU kernel (cuDNN) in place of the raw weights.

    Args:
        kernel: `(D, 3H)`, unit-variance at initialisation.
        recurrent_kernel: `(H, 3H)`, unit-variance at initialisation.
        bias: `(2, 3H)` with `reset_after` (input and recurrent rows),
            `(3H,)` without, or `None`.
        x: the input sequence `(batch, T, D)` (or one step `(batch, D)`,
            counted as T = 1); only its sizes and dtype are used.
        return_sequences: whether the upstream gradient reaches every step.
        reset_after: Keras's GRU convention (see `rules.gru`).
        fp8: cast the two kernels to E4M3 at unit scale, before their scales.

    Returns:
        `(kernel, recurrent_kernel, bias)`, scaled, in `x`'s dtype.

    Examples:
        >>> import numpy as np
        >>> k, r, b = gru_weights(np.ones((4, 6), "float32"), np.ones((2, 6), "float32"),
        ...                       None, np.zeros((3, 5, 4), "float32"))
        >>> float(keras.ops.convert_to_numpy(k)[0, 0]), b is None
        (0.5, True)
    """
    return scaled_recurrent_weights(
        kernel, recurrent_kernel, bias, x, "z, r, h",
        lambda features, units, batch, steps: rules.gru.weights(
            features, units, batch, steps, return_sequences, reset_after),
        lambda bias, units: _check_bias(bias, units, reset_after),
        fp8,
    )


def gru_inputs(x, units, return_sequences=True, reset_after=True):
    """Scales the gradient of a GRU's input sequence (a cut edge): `x` unchanged.

    Rule (`rules.gru.input_grad`): gradient × `√(D/3H)·√(T/m)/ĝ`; as for
    `lstm_inputs`, right unless `x` also feeds something else whose
    gradient is added to this one.

    Examples:
        >>> import numpy as np
        >>> y = gru_inputs(np.ones((2, 3, 4), "float32"), units=8)
        >>> keras.ops.convert_to_numpy(y).shape
        (2, 3, 4)
    """
    x = to_float(x, "x")
    checks.positive_int("units", units)
    _, steps, features = sequence_sizes(x)
    return scale_bwd(x, rules.gru.input_grad(features, units, steps, return_sequences, reset_after))


def gru_hidden_in(h, reset_after=True):
    """The unit-scaled state h → the plain state h̃ = h·r_h (both passes).

    Examples:
        >>> import numpy as np
        >>> y = gru_hidden_in(np.ones((1,), "float32"))
        >>> round(float(keras.ops.convert_to_numpy(y)[0]), 3)
        0.414
    """
    return times_both_passes(h, rules.gru.gru_rule(reset_after).hidden_rms)


def gru_hidden_out(h, reset_after=True):
    """The plain state h̃ → the unit-scaled output and state s·h̃ (both passes).

    Examples:
        >>> import numpy as np
        >>> y = gru_hidden_out(np.ones((1,), "float32"))
        >>> round(float(keras.ops.convert_to_numpy(y)[0]), 3)
        2.414
    """
    return times_both_passes(h, rules.gru.gru_rule(reset_after).output_scale)


def _project(x, kernel, bias, fp8):
    """`x·kernel (+ bias)`; in FP8, `x` cast to E4M3 and the product's gradient to E5M2 (the kernel comes cast)."""
    if fp8:
        (x,) = precision.cast_inputs(x)
        projected = precision.cast_output_gradient(ops.matmul(x, kernel))
    else:
        projected = ops.matmul(x, kernel)
    return projected if bias is None else ops.add(projected, bias)


def gru_cell(x, h, kernel, recurrent_kernel, bias=None, reset_after=True, fp8=False, plain_state=False):
    """One step of the unit-scaled GRU, given the weights from `gru_weights`.

    Keras's GRU step (gate order z, r, h; `reset_after` as in Keras) on the
    plain state `h̃ = gru_hidden_in(h)`, with plain sigmoid gates and tanh
    candidate; returns `gru_hidden_out(z·h̃ + (1 - z)·ĥ)`. The scaling lives
    in the weights and in `gru_hidden_in` / `gru_hidden_out`; a fused kernel
    computes the same recurrence on h̃.

    Args:
        x: `(batch, D)`, the step's input.
        h: `(batch, H)`, the unit-scaled state.
        kernel: from `gru_weights`.
        recurrent_kernel: from `gru_weights`.
        bias: from `gru_weights`.
        reset_after: Keras's GRU convention.
        fp8: the matmuls in scale-free FP8: their inputs cast to E4M3, the
            gradients of their outputs to E5M2 (the kernels come cast from
            `gru_weights(..., fp8=True)`).
        plain_state: `h` is the plain state h̃ and the plain new state is
            returned, as a loop over a whole sequence steps it (see
            `lstm_cell`).

    Returns:
        The new unit-scaled state (also the step's output).

    Examples:
        >>> import numpy as np
        >>> x, h = np.ones((2, 4), "float32"), np.zeros((2, 3), "float32")
        >>> weights = gru_weights(np.ones((4, 9), "float32"), np.ones((3, 9), "float32"),
        ...                       np.zeros((2, 9), "float32"), x)
        >>> tuple(gru_cell(x, h, *weights).shape)
        (2, 3)
    """
    x = to_float(x, "x", like=kernel)
    h = to_tensor(h, "h")
    h_plain = h if plain_state else gru_hidden_in(h, reset_after)
    units = h_plain.shape[-1]
    input_bias, recurrent_bias = (bias[0], bias[1]) if reset_after and bias is not None else (bias, None)
    x_z, x_r, x_h = ops.split(_project(x, kernel, input_bias, fp8), 3, axis=-1)
    # reset_after: every gate's recurrent projection at once; before: z's and r's, the candidate's below.
    projected_h = _project(h_plain, recurrent_kernel if reset_after else recurrent_kernel[:, : 2 * units],
                           recurrent_bias, fp8)
    z = ops.sigmoid(add_rows(x_z, projected_h[:, :units]))
    r = ops.sigmoid(add_rows(x_r, projected_h[:, units : 2 * units]))
    if reset_after:
        candidate_h = r * projected_h[:, 2 * units :]
    else:
        candidate_h = _project(r * h_plain, recurrent_kernel[:, 2 * units :], None, fp8)
    candidate = ops.tanh(add_rows(x_h, candidate_h))
    h = z * h_plain + (1.0 - z) * candidate
    return h if plain_state else gru_hidden_out(h, reset_after)
