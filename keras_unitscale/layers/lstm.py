"""The unit-scaled `LSTM` layer and its cell: Keras's `LSTM` and `LSTMCell` with the unit-scaled ops.

The scaling rule and its derivation live in `keras_unitscale.rules.lstm`,
the ops that apply it in `keras_unitscale.ops.lstm` (`lstm_weights`,
`lstm_inputs`, `lstm_hidden_in`, `lstm_hidden_out`, `lstm_dropout`,
`lstm_cell`). This module only wires them into Keras's recurrent machinery
(through `keras_unitscale.layers.recurrent`, shared with the GRU): the cell
steps `lstm_cell`, and the layer hands the *scaled* weights to the backend's
fused LSTM (cuDNN) where plain `keras.layers.LSTM` would hand it the raw
ones. Everything else (sequences, states, masking, `go_backwards`,
`stateful`, `unroll`, dropout masks, configs, shapes, dtype policies,
variable names and paths) is Keras's.
"""

import keras
from keras.src import backend as keras_backend

from keras_unitscale import checks
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import check_fp8
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.layers.recurrent import ScaledCell
from keras_unitscale.layers.recurrent import ScaledRNN
from keras_unitscale.layers.recurrent import check_activation
from keras_unitscale.layers.recurrent import check_use_cudnn
from keras_unitscale.ops import lstm as lstm_ops

__all__ = ["LSTM", "LSTMCell"]

@keras.saving.register_keras_serializable(package="keras_unitscale")
class LSTMCell(ScaledCell, WeightMultipliers, keras.layers.LSTMCell):
    """A unit-scaled LSTM cell: `keras.layers.LSTMCell` with the unit-scaled step.

    Weights start at unit variance; `keras_unitscale.ops.lstm_weights`
    scales them (input projection × `input_dim^-1/2`, recurrent projection ×
    `units^-1/2` on the plain hidden state) and `ops.lstm_cell` steps the
    recurrence with plain sigmoid/tanh gates, scaling the hidden state (the
    output and what is carried) to unit RMS. The cell's state is `[h, c]`
    with `h` the unit-scaled output. Everything else (weights, their names,
    dropout masks, initial states, configs) is Keras's `LSTMCell`.

    Driven by `LSTM`, the weights are scaled once per sequence, for its
    length. Standalone in `keras.layers.RNN`, each step is scaled as a
    sequence of one step: the forward pass is the same, but the weight and
    input gradients are not rescaled for the sequence length.

    Args:
        units: positive integer, the output size.
        activation: must be "tanh" (the rule is derived for it).
        recurrent_activation: must be "sigmoid".
        use_bias: whether to add a bias.
        kernel_initializer: defaults to unit-variance normal.
        recurrent_initializer: defaults to unit-variance normal.
        bias_initializer: defaults to zeros.
        unit_forget_bias: add 1 to the forget gate's bias at initialisation
            (and derive the rule for a forget bias of 1).
        kernel_regularizer: as for `keras.layers.LSTMCell`.
        recurrent_regularizer: as for `keras.layers.LSTMCell`.
        bias_regularizer: as for `keras.layers.LSTMCell`.
        kernel_constraint: as for `keras.layers.LSTMCell`.
        recurrent_constraint: as for `keras.layers.LSTMCell`.
        bias_constraint: as for `keras.layers.LSTMCell`.
        dropout: fraction of the inputs dropped, in [0, 1).
        recurrent_dropout: fraction of the recurrent state dropped, in [0, 1).
            One mask for the whole recurrent projection (Keras draws one
            per gate when `recurrent_dropout` is set); either is rescaled by
            `ops.lstm_dropout` to keep unit RMS.
        seed: random seed for dropout.
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name (set
            by `unit_scale`; see `common.WeightMultipliers`).
        fp8: the kernels' matmuls in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting, True or False decide.
        **kwargs: base layer arguments (`name`, `dtype`, ...). Keras's
            `implementation` is accepted and ignored: the cell always runs
            one fused step (Keras's implementation 2).

    Examples:
        >>> rnn = keras.layers.RNN(LSTMCell(4), return_sequences=True)
        >>> tuple(rnn(np.random.default_rng(0).normal(size=(2, 5, 3))).shape)
        (2, 5, 4)
    """

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer=None,
        recurrent_initializer=None,
        bias_initializer="zeros",
        unit_forget_bias=True,
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        **kwargs,
    ):
        checks.positive_int("units", units)
        fp8 = check_fp8(fp8)
        dropout = checks.rate("dropout", dropout)
        recurrent_dropout = checks.rate("recurrent_dropout", recurrent_dropout)
        activation = check_activation("LSTM", "activation", activation, "tanh")
        recurrent_activation = check_activation("LSTM", "recurrent_activation", recurrent_activation, "sigmoid")
        kwargs.pop("implementation", None)
        super().__init__(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer or unit_normal(),
            recurrent_initializer=recurrent_initializer or unit_normal(),
            bias_initializer=bias_initializer,
            unit_forget_bias=unit_forget_bias,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            **kwargs,
        )
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self._init_sequence_weights(fp8)
        # One fused step (Keras's implementation 2) with one dropout mask
        # per tensor, whatever the recurrent dropout.
        self.implementation = 2
        self.dropout_mask_count = None

    def build(self, input_shape):
        super().build(input_shape)
        gates = 4 * self.units
        self.declare_role(self.kernel, "hidden", fan_in=int(self.kernel.shape[0]), fan_out=gates)
        self.declare_role(self.recurrent_kernel, "hidden", fan_in=self.units, fan_out=gates)
        if self.use_bias:
            self.declare_role(self.bias, "bias", fan_out=gates)

    def scaled_inputs(self, inputs, return_sequences=True):
        """The inputs with their gradient scaled by `ops.lstm_inputs` (a cut edge)."""
        return lstm_ops.lstm_inputs(inputs, self.units, return_sequences, self.forget_bias)

    def scaled_weights(self, inputs, return_sequences=True):
        """The weights for one sequence: multiplied, then scaled by `ops.lstm_weights`."""
        return lstm_ops.lstm_weights(
            self.multiplied(self.kernel),
            self.multiplied(self.recurrent_kernel),
            self.multiplied(self.bias),
            inputs,
            return_sequences,
            self.forget_bias,
            fp8=self.uses_fp8(),
        )

    def hidden_in(self, h):
        """The unit-scaled state h → the plain state h̃ (`ops.lstm_hidden_in`)."""
        return lstm_ops.lstm_hidden_in(h, self.forget_bias)

    def hidden_out(self, h):
        """The plain state h̃ → the unit-scaled state (`ops.lstm_hidden_out`)."""
        return lstm_ops.lstm_hidden_out(h, self.forget_bias)

    @property
    def forget_bias(self):
        """The forget-gate bias at initialisation, which the rule is derived for."""
        return 1.0 if (self.use_bias and self.unit_forget_bias) else 0.0

    def call(self, inputs, states, training=False):
        h, c = states[0], states[1]
        inputs, weights = self.step_weights(inputs)
        if training and self.dropout > 0:
            inputs = lstm_ops.lstm_dropout(inputs, self.get_dropout_mask(inputs), self.dropout)
        if training and self.recurrent_dropout > 0:
            h = lstm_ops.lstm_dropout(h, self.get_recurrent_dropout_mask(h), self.recurrent_dropout)
        h, c = lstm_ops.lstm_cell(inputs, h, c, *weights, forget_bias=self.forget_bias, fp8=self.uses_fp8(),
                                  plain_state=self.steps_plain_state)
        return h, [h, c]


@keras.saving.register_keras_serializable(package="keras_unitscale")
class LSTM(ScaledRNN, keras.layers.LSTM):
    """A unit-scaled LSTM layer: `keras.layers.LSTM` with the unit-scaled cell and fused call.

    Same arguments and behaviour as `keras.layers.LSTM` (sequences, states,
    `go_backwards`, `stateful`, masking, dropout, `unroll`, `use_cudnn`,
    configs: `from_config` takes the config Keras's LSTM writes), with
    unit-variance weights and the unit-scaling rule of
    `keras_unitscale.rules.lstm`: for unit-scaled inputs the output, the
    input gradient and the kernel, recurrent-kernel and bias gradients are
    all near unit RMS at initialisation, for any width and sequence length.
    The carried state `h` is the (unit-scaled) output, as in Keras; an
    `initial_state` is in that scale too.

    Where `keras.layers.LSTM` calls the backend's fused LSTM (cuDNN on GPU),
    this layer does too, with the scaled weights (`ops.lstm_weights`) and
    the plain hidden state (`ops.lstm_hidden_in` / `lstm_hidden_out`);
    elsewhere it steps `LSTMCell`.

    `use_cudnn`: the constructor's choice is `fused_kernel` (saved in the
    config as `use_cudnn`); the attribute `use_cudnn` reads None, so that
    `keras.layers.Bidirectional` never hands Keras's fused kernel the raw
    weights (see `layers.recurrent.ScaledRNN`).

    Args:
        units: positive integer, the output size.
        activation: must be "tanh".
        recurrent_activation: must be "sigmoid".
        use_bias: as for `LSTMCell` (and `keras.layers.LSTM`).
        kernel_initializer: as for `LSTMCell` (and `keras.layers.LSTM`);
            defaults to unit-variance normal.
        recurrent_initializer: as for `LSTMCell` (and `keras.layers.LSTM`);
            defaults to unit-variance normal.
        bias_initializer: as for `LSTMCell` (and `keras.layers.LSTM`).
        unit_forget_bias: as for `LSTMCell` (and `keras.layers.LSTM`).
        kernel_regularizer: as for `LSTMCell` (and `keras.layers.LSTM`).
        recurrent_regularizer: as for `LSTMCell` (and `keras.layers.LSTM`).
        bias_regularizer: as for `LSTMCell` (and `keras.layers.LSTM`).
        activity_regularizer: as for `LSTMCell` (and `keras.layers.LSTM`).
        kernel_constraint: as for `LSTMCell` (and `keras.layers.LSTM`).
        recurrent_constraint: as for `LSTMCell` (and `keras.layers.LSTM`).
        bias_constraint: as for `LSTMCell` (and `keras.layers.LSTM`).
        dropout: as for `LSTMCell` (and `keras.layers.LSTM`).
        recurrent_dropout: as for `LSTMCell` (and `keras.layers.LSTM`).
        seed: as for `LSTMCell` (and `keras.layers.LSTM`).
        return_sequences: return the whole output sequence, not only the
            last output. It also says where the upstream gradient arrives,
            which the backward scales account for.
        return_state: also return the final states `h` and `c`.
        go_backwards: process the sequence backwards (and return it
            reversed, as Keras does).
        stateful: carry the final states of a batch into the next.
        unroll: unroll the loop.
        use_cudnn: "auto" (use the fused kernel where the backend has one,
            and the matmuls are not in FP8), True (require it) or False.
        weight_multipliers: as for `LSTMCell`.
        lr_multipliers: as for `LSTMCell`.
        fp8: as for `LSTMCell`.
        **kwargs: base layer and `keras.layers.RNN` arguments (`name`,
            `dtype`, `zero_output_for_mask`, ...). Keras's `implementation`
            is accepted and ignored, as in `LSTMCell`.

    Examples:
        >>> layer = LSTM(64, return_sequences=True)
        >>> y = keras.ops.convert_to_numpy(layer(np.random.default_rng(0).normal(size=(8, 16, 32))))
        >>> rms = float(np.sqrt(np.mean(y**2)))
        >>> y.shape, bool(0.7 < rms < 1.4)
        ((8, 16, 64), True)
    """

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer=None,
        recurrent_initializer=None,
        bias_initializer="zeros",
        unit_forget_bias=True,
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        use_cudnn="auto",
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        **kwargs,
    ):
        use_cudnn = check_use_cudnn(use_cudnn)
        kwargs.pop("implementation", None)
        cell = LSTMCell(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            unit_forget_bias=unit_forget_bias,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            seed=seed,
            weight_multipliers=weight_multipliers,
            lr_multipliers=lr_multipliers,
            fp8=fp8,
            dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True),
            name="lstm_cell",
        )
        # `keras.layers.LSTM.__init__` makes Keras's own cell and then
        # `RNN.__init__`; this is that, with our cell, and the rest of it
        # below. Its `input_spec` (ndim=3) is left out: the rank check in
        # `build` and `call` says more (the shape received).
        super(keras.layers.LSTM, self).__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.fused_kernel = use_cudnn
        if (
            keras.backend.backend() == "tensorflow"
            and use_cudnn in (True, "auto")
            and keras_backend.cudnn_ok(
                keras.activations.tanh, keras.activations.sigmoid, self.unroll, cell.use_bias
            )
        ):
            # cuDNN ops are not XLA-compatible (as for keras.layers.LSTM).
            self.supports_jit = False

    def _fused_loop(self, sequences, initial_state, mask, weights):
        """The backend's fused LSTM on the plain hidden state, with the scaled weights."""
        kernel, recurrent_kernel, bias = weights
        h, c = self._plain_state_in(initial_state)
        return self._scaled_state_out(*keras_backend.lstm(
            sequences,
            h,
            c,
            mask,
            kernel=kernel,
            recurrent_kernel=recurrent_kernel,
            bias=bias,
            activation=keras.activations.tanh,
            recurrent_activation=keras.activations.sigmoid,
            return_sequences=self.return_sequences,
            go_backwards=self.go_backwards,
            unroll=self.unroll,
        ))
