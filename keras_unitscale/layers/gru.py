"""The unit-scaled `GRU` layer and its cell: Keras's `GRU` and `GRUCell` with the unit-scaled ops.

The scaling rule and its derivation live in `keras_unitscale.rules.gru`, the
ops that apply it in `keras_unitscale.ops.gru` (`gru_weights`, `gru_inputs`,
`gru_hidden_in`, `gru_hidden_out`, `gru_cell`). This module wires them into
Keras's recurrent machinery as the LSTM does (`keras_unitscale.layers.recurrent`):
the cell steps `gru_cell`, and the layer hands the *scaled* weights to the
backend's fused GRU where plain `keras.layers.GRU` would hand it the raw
ones. Everything else (sequences, states, masking, `go_backwards`,
`stateful`, `unroll`, dropout masks, both reset conventions, configs,
shapes, dtype policies, variable names and paths) is Keras's.
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
from keras_unitscale.ops import gru as gru_ops
from keras_unitscale.ops import lstm as lstm_ops

__all__ = ["GRU", "GRUCell"]


def _check_reset_after(reset_after):
    if not any(reset_after is option for option in (True, False)):
        raise ValueError(f"`reset_after` must be True or False. Received: reset_after={reset_after!r}")
    return reset_after


@keras.saving.register_keras_serializable(package="keras_unitscale")
class GRUCell(ScaledCell, WeightMultipliers, keras.layers.GRUCell):
    """A unit-scaled GRU cell: `keras.layers.GRUCell` with the unit-scaled step.

    Weights start at unit variance; `keras_unitscale.ops.gru_weights` scales
    them (input projection × `input_dim^-1/2`, recurrent projection ×
    `units^-1/2` on the plain state) and `ops.gru_cell` steps Keras's GRU
    recurrence with plain sigmoid/tanh gates, scaling the state (the output
    and what is carried) to unit RMS. Everything else (weights, their names
    and shapes in both `reset_after` conventions, dropout masks, initial
    states, configs) is Keras's `GRUCell`.

    Driven by `GRU`, the weights are scaled once per sequence, for its
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
        kernel_regularizer: as for `keras.layers.GRUCell`.
        recurrent_regularizer: as for `keras.layers.GRUCell`.
        bias_regularizer: as for `keras.layers.GRUCell`.
        kernel_constraint: as for `keras.layers.GRUCell`.
        recurrent_constraint: as for `keras.layers.GRUCell`.
        bias_constraint: as for `keras.layers.GRUCell`.
        dropout: fraction of the inputs dropped, in [0, 1).
        recurrent_dropout: fraction of the recurrent state dropped, in
            [0, 1). One mask for the whole recurrent projection (Keras draws
            one per gate when `recurrent_dropout` is set); either is
            rescaled by `ops.lstm_dropout` to keep unit RMS.
        reset_after: Keras's convention: the reset gate applied after the
            recurrent projection (True, the default; the bias then has an
            input and a recurrent row) or before it.
        seed: random seed for dropout.
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name (set
            by `unit_scale`; see `common.WeightMultipliers`).
        fp8: the matmuls in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting, True or False decide.
        **kwargs: base layer arguments (`name`, `dtype`, ...). Keras's
            `implementation` is accepted and ignored: the cell always runs
            one fused step (Keras's implementation 2).

    Examples:
        >>> rnn = keras.layers.RNN(GRUCell(4), return_sequences=True)
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
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        reset_after=True,
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
        activation = check_activation("GRU", "activation", activation, "tanh")
        recurrent_activation = check_activation("GRU", "recurrent_activation", recurrent_activation, "sigmoid")
        reset_after = _check_reset_after(reset_after)
        kwargs.pop("implementation", None)
        super().__init__(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer or unit_normal(),
            recurrent_initializer=recurrent_initializer or unit_normal(),
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            reset_after=reset_after,
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
        gates = 3 * self.units
        self.declare_role(self.kernel, "hidden", fan_in=int(self.kernel.shape[0]), fan_out=gates)
        self.declare_role(self.recurrent_kernel, "hidden", fan_in=self.units, fan_out=gates)
        if self.use_bias:
            self.declare_role(self.bias, "bias", fan_out=gates)

    def scaled_inputs(self, inputs, return_sequences=True):
        """The inputs with their gradient scaled by `ops.gru_inputs` (a cut edge)."""
        return gru_ops.gru_inputs(inputs, self.units, return_sequences, self.reset_after)

    def scaled_weights(self, inputs, return_sequences=True):
        """The weights for one sequence: multiplied, then scaled by `ops.gru_weights`."""
        return gru_ops.gru_weights(
            self.multiplied(self.kernel),
            self.multiplied(self.recurrent_kernel),
            self.multiplied(self.bias),
            inputs,
            return_sequences,
            self.reset_after,
            fp8=self.uses_fp8(),
        )

    def hidden_in(self, h):
        """The unit-scaled state h → the plain state h̃ (`ops.gru_hidden_in`)."""
        return gru_ops.gru_hidden_in(h, self.reset_after)

    def hidden_out(self, h):
        """The plain state h̃ → the unit-scaled state (`ops.gru_hidden_out`)."""
        return gru_ops.gru_hidden_out(h, self.reset_after)

    def call(self, inputs, states, training=False):
        nested = keras.tree.is_nested(states)
        h = states[0] if nested else states
        inputs, weights = self.step_weights(inputs)
        if training and self.dropout > 0:
            inputs = lstm_ops.lstm_dropout(inputs, self.get_dropout_mask(inputs), self.dropout)
        if training and self.recurrent_dropout > 0:
            h = lstm_ops.lstm_dropout(h, self.get_recurrent_dropout_mask(h), self.recurrent_dropout)
        h = gru_ops.gru_cell(inputs, h, *weights, reset_after=self.reset_after, fp8=self.uses_fp8(),
                             plain_state=self.steps_plain_state)
        return h, ([h] if nested else h)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class GRU(ScaledRNN, keras.layers.GRU):
    """A unit-scaled GRU layer: `keras.layers.GRU` with the unit-scaled cell and fused call.

    Same arguments and behaviour as `keras.layers.GRU` (sequences, states,
    `go_backwards`, `stateful`, masking, dropout, `unroll`, `reset_after`,
    `use_cudnn`, configs: `from_config` takes the config Keras's GRU
    writes), with unit-variance weights and the unit-scaling rule of
    `keras_unitscale.rules.gru`: for unit-scaled inputs the output, the
    input gradient and the kernel, recurrent-kernel and bias gradients are
    all near unit RMS at initialisation, for any width and sequence length.
    The carried state is the (unit-scaled) output, as in Keras; an
    `initial_state` is in that scale too.

    Where `keras.layers.GRU` calls the backend's fused GRU (cuDNN on GPU;
    PyTorch's own loop on its CPU), this layer does too, with the scaled
    weights (`ops.gru_weights`) and the plain state (`ops.gru_hidden_in` /
    `gru_hidden_out`); elsewhere it steps `GRUCell`. `use_cudnn` is as for
    `keras_unitscale.layers.LSTM` (see `layers.recurrent.ScaledRNN`).

    Args:
        units: positive integer, the output size.
        activation: must be "tanh".
        recurrent_activation: must be "sigmoid".
        use_bias: as for `GRUCell` (and `keras.layers.GRU`).
        kernel_initializer: as for `GRUCell` (and `keras.layers.GRU`); defaults
            to unit-variance normal.
        recurrent_initializer: as for `GRUCell` (and `keras.layers.GRU`);
            defaults to unit-variance normal.
        bias_initializer: as for `GRUCell` (and `keras.layers.GRU`).
        kernel_regularizer: as for `GRUCell` (and `keras.layers.GRU`).
        recurrent_regularizer: as for `GRUCell` (and `keras.layers.GRU`).
        bias_regularizer: as for `GRUCell` (and `keras.layers.GRU`).
        activity_regularizer: as for `GRUCell` (and `keras.layers.GRU`).
        kernel_constraint: as for `GRUCell` (and `keras.layers.GRU`).
        recurrent_constraint: as for `GRUCell` (and `keras.layers.GRU`).
        bias_constraint: as for `GRUCell` (and `keras.layers.GRU`).
        dropout: as for `GRUCell` (and `keras.layers.GRU`).
        recurrent_dropout: as for `GRUCell` (and `keras.layers.GRU`).
        reset_after: as for `GRUCell` (and `keras.layers.GRU`).
        seed: as for `GRUCell` (and `keras.layers.GRU`).
        return_sequences: return the whole output sequence, not only the
            last output. It also says where the upstream gradient arrives,
            which the backward scales account for.
        return_state: also return the final state.
        go_backwards: process the sequence backwards (and return it
            reversed, as Keras does).
        stateful: carry the final state of a batch into the next.
        unroll: unroll the loop.
        use_cudnn: "auto" (use the fused kernel where the backend has one,
            and the matmuls are not in FP8), True (require it) or False.
        weight_multipliers: as for `GRUCell`.
        lr_multipliers: as for `GRUCell`.
        fp8: as for `GRUCell`.
        **kwargs: base layer and `keras.layers.RNN` arguments (`name`,
            `dtype`, `zero_output_for_mask`, ...). Keras's `implementation`
            is accepted and ignored, as in `GRUCell`.

    Examples:
        >>> layer = GRU(64, return_sequences=True)
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
        reset_after=True,
        use_cudnn="auto",
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        **kwargs,
    ):
        use_cudnn = check_use_cudnn(use_cudnn)
        kwargs.pop("implementation", None)
        cell = GRUCell(
            units,
            activation=activation,
            recurrent_activation=recurrent_activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint,
            dropout=dropout,
            recurrent_dropout=recurrent_dropout,
            reset_after=reset_after,
            seed=seed,
            weight_multipliers=weight_multipliers,
            lr_multipliers=lr_multipliers,
            fp8=fp8,
            dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True),
            name="gru_cell",
        )
        # `keras.layers.GRU.__init__` makes Keras's own cell and then
        # `RNN.__init__`; this is that, with our cell (its `input_spec` left
        # out, as for our LSTM: the rank check says more).
        super(keras.layers.GRU, self).__init__(
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
                keras.activations.tanh, keras.activations.sigmoid, self.unroll, cell.use_bias,
                reset_after=reset_after,
            )
        ):
            # cuDNN ops are not XLA-compatible (as for keras.layers.GRU).
            self.supports_jit = False

    def _fused_loop(self, sequences, initial_state, mask, weights):
        """The backend's fused GRU on the plain state, with the scaled weights."""
        reset_after = self.cell.reset_after
        kernel, recurrent_kernel, bias = weights
        (h,) = self._plain_state_in(initial_state)
        return self._scaled_state_out(*keras_backend.gru(
            sequences,
            h,
            mask,
            kernel=kernel,
            recurrent_kernel=recurrent_kernel,
            bias=bias,
            activation=keras.activations.tanh,
            recurrent_activation=keras.activations.sigmoid,
            return_sequences=self.return_sequences,
            go_backwards=self.go_backwards,
            unroll=self.unroll,
            reset_after=reset_after,
        ))
