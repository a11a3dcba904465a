"""The unit-scaled pre-norm `TransformerBlock`."""

import keras
from keras import ops

from keras_unitscale import checks
from keras_unitscale import functional as U
from keras_unitscale import rules
from keras_unitscale.layers import activation as activations
from keras_unitscale.layers.attention import MultiHeadAttention
from keras_unitscale.layers.dense import Dense
from keras_unitscale.layers.dropout import Dropout
from keras_unitscale.layers.residual_block import ResidualBlock
from keras_unitscale.layers.residual_block import gain_only_norm


def _norm_epsilons(value):
    """`norm_epsilon` as (attention_norm's, mlp_norm's): one number for both, or a pair; None: the norms' defaults."""
    if value is None:
        return (None, None)
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2:
        raise ValueError(
            f"`norm_epsilon` must be a number or a pair (attention_norm's, mlp_norm's). Received: norm_epsilon={value!r}"
        )
    return tuple(float(checks.non_negative("norm_epsilon", eps)) for eps in pair)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class TransformerBlock(ResidualBlock):
    """A pre-norm transformer block of unit-scaled layers, with u-μP's residual weights.

    `x → x + attention(norm(x))` then `x → x + mlp(norm(x))`, each join a
    unit-scaled residual (`functional.residual_split`/`residual_add`) whose
    branch weight `tau` comes from `rules.residual.transformer_residual_scaling_rule`
    given this block's `index` in a stack of `depth` blocks: attention is
    branch `2·index`, the MLP `2·index + 1`, of `2·depth`.

    Args:
        num_heads: attention heads.
        key_dim: size of each head (default: input width / num_heads).
        mlp_ratio: hidden width of the MLP relative to the input width.
        activation: the MLP's unit-scaled activation (default "gelu").
        index: this block's position in the stack, 0-based.
        depth: the number of blocks in the stack.
        dropout: dropout on the attention probabilities and after each
            branch, in [0, 1).
        norm: "layer" (LayerNormalization) or "rms" (RMSNormalization).
        norm_epsilon: the norms' epsilon, one for both or a pair
            (attention_norm's, mlp_norm's); None: each norm's default.
            `keras_unitscale.grow` sets a pair: a stream that arrives at
            `c` times its scale is normalised as before with `c²·epsilon`.
        use_causal_mask: causal self-attention (a decoder block).
        attention_mult: the u-μP attention-logit multiplier.
        activation_mult: the u-μP multiplier of the MLP's activation.
        residual_mult: a hyperparameter of the depth rule.
        residual_attn_ratio: a hyperparameter of the depth rule.
        use_bias: biases on the attention and MLP projections (off, as in u-μP).
        weight_multipliers: fixed forward multipliers on the weights of the
            block's layers, by path within the block, e.g.
            `{"mlp_up/kernel": 0.5, "attention/query/kernel": 2.0}` (see
            `common.WeightMultipliers`).
        fp8: the block's matmuls in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting (which leaves the attention
            output and MLP down projections, u-μP's critical matmuls, in
            higher precision unless `critical=True`), True or False decide for all.
        **kwargs: base layer arguments.

    Its variables belong to a residual stack of `depth` blocks: u-μP gives
    them a learning rate × `depth^-1/2` (see `keras_unitscale.parametrization`).

    Examples:
        >>> block = TransformerBlock(num_heads=2, index=0, depth=4)
        >>> x = np.random.default_rng(0).normal(size=(2, 8, 16)).astype("float32")
        >>> tuple(block(x).shape), round(block.attention_tau, 3), round(block.mlp_tau, 3)
        ((2, 8, 16), 0.5, 0.447)
    """

    def __init__(
        self,
        num_heads,
        key_dim=None,
        mlp_ratio=4,
        activation="gelu",
        index=0,
        depth=1,
        dropout=0.0,
        norm="layer",
        norm_epsilon=None,
        use_causal_mask=True,
        attention_mult=1.0,
        activation_mult=1.0,
        residual_mult=1.0,
        residual_attn_ratio=1.0,
        use_bias=False,
        weight_multipliers=None,
        fp8=None,
        **kwargs,
    ):
        super().__init__(index=index, depth=depth, dropout=dropout, norm=norm, residual_mult=residual_mult,
                         use_bias=use_bias, weight_multipliers=weight_multipliers, fp8=fp8, **kwargs)
        self.num_heads = checks.positive_int("num_heads", num_heads)
        self.key_dim = None if key_dim is None else checks.positive_int("key_dim", key_dim)
        self.mlp_ratio = checks.positive("mlp_ratio", mlp_ratio)
        self.activation = activations.check(activation)
        self.norm_epsilon = _norm_epsilons(norm_epsilon)
        self.use_causal_mask = bool(use_causal_mask)
        self.attention_mult = attention_mult
        self.activation_mult = activation_mult
        self.residual_attn_ratio = residual_attn_ratio
        self.attention_tau, self.mlp_tau = self.branch_taus(index, depth)

    def branch_taus(self, index, depth):
        """(attention's, the MLP's) `tau` for this block at `index` in a stack of `depth` (u-μP's depth rule)."""
        rule = rules.residual.transformer_residual_scaling_rule(self.residual_mult, self.residual_attn_ratio)
        return rule(2 * index, 2 * depth), rule(2 * index + 1, 2 * depth)

    def build(self, input_shape):
        width = self.check_input_shape(input_shape)
        key_dim = self.key_dim or max(1, width // self.num_heads)
        part = self.sublayer_multipliers
        # No norm biases and, by default, no projection biases, as in u-μP:
        # at initialisation every position's gradient into a bias points the
        # same way, so a bias's gradient grows with the sequence length.
        self.attention_norm = gain_only_norm(self.norm, "attention_norm", part("attention_norm"), self.norm_epsilon[0])
        self.attention = MultiHeadAttention(
            self.num_heads, key_dim, dropout=self.dropout, mult=self.attention_mult, use_bias=self.use_bias,
            name="attention", weight_multipliers=part("attention"), fp8=self.fp8,
        )
        self.mlp_norm = gain_only_norm(self.norm, "mlp_norm", part("mlp_norm"), self.norm_epsilon[1])
        self.mlp_up = Dense(int(self.mlp_ratio * width), activation=self.activation, mult=self.activation_mult,
                            use_bias=self.use_bias, name="mlp_up", weight_multipliers=part("mlp_up"), fp8=self.fp8)
        self.mlp_down = Dense(width, use_bias=self.use_bias, name="mlp_down", weight_multipliers=part("mlp_down"),
                              fp8=self.fp8, fp8_critical=True)
        self.branch_dropout = Dropout(self.dropout, name="branch_dropout")
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.mlp_norm.build(input_shape)
        self.mlp_up.build(input_shape)
        self.mlp_down.build(tuple(input_shape[:-1]) + (int(self.mlp_ratio * width),))
        self.declare_depth()

    def multiplier_holders(self):
        """The norms, attention (its projections under "attention/<projection>/<variable>") and the MLP."""
        return [(layer.name, layer)
                for layer in (self.attention_norm, self.attention, self.mlp_norm, self.mlp_up, self.mlp_down)]

    def _attend(self, x, training=None, mask=None):
        h = self.attention_norm(x)
        # Keras's attention takes the query's padding mask from the query
        # tensor, not from an argument: the block's mask is the value mask
        # and, over query positions, the attention mask.
        attention_mask = None if mask is None else ops.expand_dims(ops.cast(mask, "bool"), -1)
        h = self.attention(h, h, value_mask=mask, attention_mask=attention_mask,
                           use_causal_mask=self.use_causal_mask, training=training)
        return self.branch_dropout(h, training=training)

    def _feed_forward(self, x, training=None, mask=None):
        h = self.mlp_down(self.mlp_up(self.mlp_norm(x)))
        return self.branch_dropout(h, training=training)

    def call(self, inputs, training=None, mask=None):
        x = U.residual_apply(lambda r: self._attend(r, training, mask), inputs, self.attention_tau)
        return U.residual_apply(lambda r: self._feed_forward(r, training, mask), x, self.mlp_tau)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "mlp_ratio": self.mlp_ratio,
            "activation": self.activation,
            "norm_epsilon": self.norm_epsilon[0] if len(set(self.norm_epsilon)) == 1 else list(self.norm_epsilon),
            "use_causal_mask": self.use_causal_mask,
            "attention_mult": self.attention_mult,
            "activation_mult": self.activation_mult,
            "residual_attn_ratio": self.residual_attn_ratio,
        }
