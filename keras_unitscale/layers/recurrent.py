"""What the unit-scaled LSTM and GRU share: argument checks, the cell's per-sequence weights, the layer's loop.

A recurrent layer scales its weights once per sequence (their backward
scales depend on its length) and hands them either to the backend's fused
kernel (cuDNN), with the plain hidden state, or to Keras's step loop over
its cell. The cell reads the weights of the current sequence from
`ScaledCell.sequence_weights`; the layer's `inner_loop` is
`ScaledRNN.inner_loop`. What differs per layer (the ops and the fused call)
is a method each defines.
"""

import contextlib

import keras
from keras import ops

from keras_unitscale import precision
from keras_unitscale.ops.lstm import lstm_dropout

__all__ = ["check_activation", "check_use_cudnn", "as_compute_dtype", "ScaledCell", "ScaledRNN"]

_USE_CUDNN = ("auto", True, False)


def check_activation(layer_name, name, value, expected):
    """Only the plain gates have a rule: their values have meaning, so they are not rescaled."""
    try:
        fn = keras.activations.get(value)
    except (ValueError, TypeError):
        fn = None
    if fn is not keras.activations.get(expected):
        raise ValueError(
            f"The unit-scaled {layer_name} is derived for `{name}='{expected}'` only. "
            f"Received: {name}={value!r}"
        )
    return expected


def check_use_cudnn(use_cudnn):
    # By identity: 1 == True and 0 == False, but neither is a valid choice.
    if any(use_cudnn is option for option in (True, False)) or (
        isinstance(use_cudnn, str) and use_cudnn == "auto"
    ):
        return use_cudnn
    raise ValueError(
        f"`use_cudnn` must be one of {list(_USE_CUDNN)}. Received: use_cudnn={use_cudnn!r}"
    )


def as_compute_dtype(x, dtype):
    """Casts `x` to the compute dtype unless it is already there.

    Floats: `__call__` autocasts them, `stateless_call` does not. Booleans
    and integers: Keras's `__call__` leaves them, and Keras's recurrent
    layers compute with them as their matmuls promote them, in the compute
    dtype.
    """
    x = ops.convert_to_tensor(x)
    if keras.backend.standardize_dtype(x.dtype) != dtype:
        x = ops.cast(x, dtype)
    return x


class ScaledCell:
    """Mixin for a unit-scaled recurrent cell: the weights of the current sequence, FP8, the config.

    A subclass defines `scaled_inputs(inputs, return_sequences)` (the input's
    gradient scale), `scaled_weights(inputs, return_sequences)`, and
    `hidden_in(h)` / `hidden_out(h)` (the unit-scaled state to the plain
    one and back), and calls `_init_sequence_weights(fp8)` in its constructor.
    """

    def _init_sequence_weights(self, fp8):
        self.fp8 = fp8
        # The weights scaled for the current sequence, set by the layer for
        # the duration of its loop. Stored outside Keras's attribute
        # tracking: these are tensors of one call, not state.
        object.__setattr__(self, "_sequence_weights", None)

    def uses_fp8(self):
        """Whether the kernels' matmuls run in FP8 now (see `keras_unitscale.precision`)."""
        return precision.uses_fp8(self.fp8)

    @contextlib.contextmanager
    def sequence_weights(self, weights):
        """Within this context the cell steps with `weights` (from `scaled_weights`), on the plain state.

        The layer's loop hands the cell the plain state h̃ (`hidden_in` of
        the unit-scaled state) and scales what comes out (`hidden_out`) once
        per sequence, as around the fused kernel: two multiplications a step
        fewer, and the same values.
        """
        object.__setattr__(self, "_sequence_weights", weights)
        try:
            yield
        finally:
            object.__setattr__(self, "_sequence_weights", None)

    @property
    def steps_plain_state(self):
        """Whether the cell now steps the plain state h̃ (inside a layer's loop) rather than the unit-scaled one."""
        return self._sequence_weights is not None

    def step_weights(self, inputs):
        """`(inputs, weights)` for one step: the sequence's, or, standalone in `keras.layers.RNN`, this step's own.

        Standalone, nothing cast the step yet, and each step is scaled as a
        sequence of one step.
        """
        if self._sequence_weights is not None:
            return inputs, self._sequence_weights
        inputs = self.scaled_inputs(as_compute_dtype(inputs, self.compute_dtype))
        return inputs, self.scaled_weights(inputs)

    def get_config(self):
        return {**super().get_config(), "fp8": self.fp8, **self.multiplier_config()}


class ScaledRNN:
    """Mixin for a unit-scaled recurrent layer over a `ScaledCell`: Keras's loop or the fused kernel, with the scaled weights.

    `use_cudnn`: the constructor's choice is `fused_kernel` (saved in the
    config as `use_cudnn`). The attribute `use_cudnn` reads None: Keras reads
    it in `keras.layers.Bidirectional`, which hands both directions' *raw*
    weights to the backend's fused bidirectional kernel (a plain layer,
    without the scales) when both say True or "auto". Saying neither,
    wrapped in `Bidirectional`, each direction runs this layer (and its own
    fused kernel). Setting `use_cudnn` to "auto", True or False sets
    `fused_kernel`.

    A subclass defines `_fused_loop(sequences, initial_state, mask, weights)`,
    which calls the backend's fused kernel (raising `NotImplementedError`
    where there is none).
    """

    @property
    def use_cudnn(self):
        """None: Keras's own fused kernels never get this layer's raw weights (see the class docstring)."""
        return None

    @use_cudnn.setter
    def use_cudnn(self, value):
        # `Bidirectional` copies the wrapped layer's value (None) into its two
        # copies, which keep the choice their config gave them.
        if value is not None:
            self.fused_kernel = check_use_cudnn(value)

    def _check_rank(self, sequences_shape):
        if len(sequences_shape) != 3:
            name = type(self).__name__
            raise ValueError(
                f"`sequences` (the {name}'s inputs) must have rank 3: (batch, "
                f"timesteps, features). Received: sequences.shape={tuple(sequences_shape)}"
            )

    def build(self, sequences_shape, initial_state_shape=None):
        self._check_rank(sequences_shape)
        super().build(sequences_shape, initial_state_shape)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._check_rank(sequences.shape)
        sequences = as_compute_dtype(sequences, self.compute_dtype)
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if keras.tree.is_nested(mask):
            mask = mask[0]
        cell = self.cell
        # The input's gradient scale (a cut edge) and the scaled weights,
        # once for the whole sequence.
        sequences = cell.scaled_inputs(sequences, self.return_sequences)
        weights = cell.scaled_weights(sequences, self.return_sequences)
        # The fused kernel has no FP8 casts inside its loop.
        if self.fused_kernel in ("auto", True) and not cell.recurrent_dropout and not cell.uses_fp8():
            if training and cell.dropout:
                mask_step = cell.get_dropout_mask(sequences[:, 0, :])
                fused_sequences = lstm_dropout(sequences, ops.expand_dims(mask_step, 1), cell.dropout)
            else:
                fused_sequences = sequences
            try:
                outputs = self._fused_loop(fused_sequences, initial_state, mask, weights)
            except NotImplementedError:
                pass
            else:
                if keras.backend.backend() == "tensorflow":
                    # cuDNN ops are not XLA-compatible (as for Keras's layers).
                    self.supports_jit = False
                return outputs
        if self.fused_kernel is True:
            raise ValueError(
                f"use_cudnn=True was specified, but the fused (cuDNN) {type(self).__name__} is not "
                "available for this layer configuration on this backend and "
                "device. Pass use_cudnn='auto' to fall back to the step-by-step "
                "implementation. Received: use_cudnn=True"
            )
        with cell.sequence_weights(weights):
            # Keras's step loop over our cell, on the plain state.
            return self._scaled_state_out(*keras.layers.RNN.inner_loop(
                self, sequences, self._plain_state_in(initial_state), mask=mask, training=training))

    def _plain_state_in(self, initial_state):
        """The initial states for a loop on the plain state: `hidden_in` of h; an LSTM's cell state as it is."""
        states = list(initial_state) if keras.tree.is_nested(initial_state) else [initial_state]
        return [self.cell.hidden_in(states[0]), *states[1:]]

    def _scaled_state_out(self, last_output, outputs, states):
        """A loop's `(last_output, outputs, states)` on the plain state, back at unit scale (`hidden_out` of h)."""
        hidden_out = self.cell.hidden_out
        return hidden_out(last_output), hidden_out(outputs), [hidden_out(states[0]), *states[1:]]

    def get_config(self):
        return {
            **super().get_config(),
            "use_cudnn": self.fused_kernel,
            "fp8": self.cell.fp8,
            **self.cell.multiplier_config(),
        }
