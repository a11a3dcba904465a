"""The unit-scaled pre-norm `RecurrentBlock`: a residual LSTM or GRU branch with u-μP's depth rule."""

import keras

from keras_unitscale import checks
from keras_unitscale import functional as U
from keras_unitscale import rules
from keras_unitscale.layers.dense import Dense
from keras_unitscale.layers.dropout import Dropout
from keras_unitscale.layers.gru import GRU
from keras_unitscale.layers.lstm import LSTM
from keras_unitscale.layers.residual_block import ResidualBlock
from keras_unitscale.layers.residual_block import gain_only_norm

_CELLS = {"lstm": LSTM, "gru": GRU}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class RecurrentBlock(ResidualBlock):
    """A pre-norm residual recurrent block of unit-scaled layers: `x → x + projection(rnn(norm(x)))`.

    The join is a unit-scaled residual (`functional.residual_split` /
    `residual_add`) whose branch weight `tau` is u-μP's depth rule for a
    stack of `depth` single-branch blocks: `transformer_residual_scaling_rule()`
    (attention and MLP weighted alike) over `depth` branches, this block's at
    `index`. A stack of these is the recurrent counterpart of a stack of
    `TransformerBlock`s: a branch can add nothing (its projection at zero),
    which a plain LSTM or GRU, bounded by its gates, cannot; so
    `keras_unitscale.grow` can insert blocks into such a stack with the
    model's function kept (`keras_unitscale.models.lstm_lm(residual=True)`).

    Args:
        units: the LSTM's or GRU's size; the projection brings its outputs
            back to the input width.
        cell: "lstm" (`layers.LSTM`) or "gru" (`layers.GRU`).
        index: this block's position in the stack, 0-based.
        depth: the number of blocks in the stack.
        dropout: dropout on the branch's output, in [0, 1).
        norm: "layer" (LayerNormalization without a bias) or "rms"
            (RMSNormalization).
        norm_epsilon: the norm's epsilon; None: its default.
            `keras_unitscale.grow` sets one: a stream that arrives at `c`
            times its scale is normalised as before with `c²·epsilon`.
        residual_mult: the branches' total contribution relative to the
            embedding, a hyperparameter of the depth rule.
        use_bias: a bias on the projection (off, as in u-μP). The LSTM or
            GRU keeps its gates' biases.
        weight_multipliers: fixed forward multipliers on the weights of the
            block's layers, by path within the block, e.g.
            `{"projection/kernel": 2.0, "rnn/kernel": 0.5}` (see
            `common.WeightMultipliers`).
        fp8: the block's matmuls in scale-free FP8, as for
            `TransformerBlock` (the projection is a critical matmul).
        **kwargs: base layer arguments.

    Its variables belong to a residual stack of `depth` blocks: u-μP gives
    them a learning rate × `depth^-1/2` (see `keras_unitscale.parametrization`).

    Examples:
        >>> block = RecurrentBlock(32, index=0, depth=4)
        >>> x = np.random.default_rng(0).normal(size=(2, 8, 16)).astype("float32")
        >>> tuple(block(x).shape), round(block.tau, 3)
        ((2, 8, 16), 0.707)
    """

    def __init__(
        self,
        units,
        cell="lstm",
        index=0,
        depth=1,
        dropout=0.0,
        norm="layer",
        norm_epsilon=None,
        residual_mult=1.0,
        use_bias=False,
        weight_multipliers=None,
        fp8=None,
        **kwargs,
    ):
        super().__init__(index=index, depth=depth, dropout=dropout, norm=norm, residual_mult=residual_mult,
                         use_bias=use_bias, weight_multipliers=weight_multipliers, fp8=fp8, **kwargs)
        self.units = checks.positive_int("units", units)
        self.cell = checks.one_of("cell", cell, tuple(_CELLS))
        self.norm_epsilon = None if norm_epsilon is None else float(checks.non_negative("norm_epsilon", norm_epsilon))
        (self.tau,) = self.branch_taus(index, depth)

    def branch_taus(self, index, depth):
        """(The branch's `tau`,) for this block at `index` in a stack of `depth` (u-μP's depth rule)."""
        return (rules.residual.transformer_residual_scaling_rule(self.residual_mult)(index, depth),)

    def build(self, input_shape):
        width = self.check_input_shape(input_shape)
        part = self.sublayer_multipliers
        self.pre_norm = gain_only_norm(self.norm, "pre_norm", part("pre_norm"), self.norm_epsilon)
        self.rnn = _CELLS[self.cell](self.units, return_sequences=True, name="rnn", weight_multipliers=part("rnn"),
                                     fp8=self.fp8)
        # The projection is what lets the branch add nothing (at zero) and what `grow` rescales: an LSTM's or
        # GRU's output is bounded by its gates, so no multiplier of its own can take the stream's change of scale.
        self.projection = Dense(width, use_bias=self.use_bias, name="projection", weight_multipliers=part("projection"),
                                fp8=self.fp8, fp8_critical=True)
        self.branch_dropout = Dropout(self.dropout, name="branch_dropout")
        self.pre_norm.build(input_shape)
        self.rnn.build(input_shape)
        self.projection.build(tuple(input_shape[:-1]) + (self.units,))
        self.declare_depth()

    def multiplier_holders(self):
        """The norm, the LSTM's or GRU's cell (under "rnn/<variable>") and the projection."""
        return [("pre_norm", self.pre_norm), ("rnn", self.rnn.cell), ("projection", self.projection)]

    def _branch(self, x, training=None, mask=None):
        h = self.rnn(self.pre_norm(x), mask=mask, training=training)
        return self.branch_dropout(self.projection(h), training=training)

    def call(self, inputs, training=None, mask=None):
        return U.residual_apply(lambda r: self._branch(r, training, mask), inputs, self.tau)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "cell": self.cell, "norm_epsilon": self.norm_epsilon}
