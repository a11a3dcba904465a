"""The unit-scaled `MultiHeadAttention` layer."""

import keras
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale import checks
from keras_unitscale import precision
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import check_fp8
from keras_unitscale.layers.common import unit_normal


@keras.saving.register_keras_serializable(package="keras_unitscale")
class MultiHeadAttention(WeightMultipliers, keras.layers.Layer):
    """Unit-scaled multi-head attention: the drop-in for `keras.layers.MultiHeadAttention`.

    The four projections are unit-scaled dense ops (`functional.dense`) on
    unit-variance kernels, and attention is `functional.dot_product_attention`
    (logits `mult/key_dim`, the fused kernel whenever no dropout applies and
    no scores are returned). Kernels have Keras's shapes — query, key and
    value `(input_dim, num_heads, head_dim)`, output
    `(num_heads, value_dim, output_dim)` — so weights move between the two.
    Self- and cross-attention over rank-3 inputs `(batch, seq, dim)`.

    Args:
        num_heads: number of heads.
        key_dim: size of each query/key head.
        value_dim: size of each value head (default `key_dim`).
        dropout: dropout on the attention probabilities, in [0, 1).
        use_bias: whether the projections have biases.
        output_shape: output size (default: the query's last dimension).
        mult: the u-μP multiplier of the attention logits.
        kernel_initializer: defaults to unit-variance normal.
        bias_initializer, kernel_regularizer, bias_regularizer,
        activity_regularizer, kernel_constraint, bias_constraint, seed: as
            for Keras.
        weight_multipliers: fixed forward multipliers on the weights, by
            variable name (see `common.WeightMultipliers`).
        lr_multipliers: fixed learning-rate factors, by variable name (set
            by `unit_scale`; see `common.WeightMultipliers`).
        fp8: the four projections in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting (the output projection,
            u-μP's critical matmul, only with `critical=True`), True or
            False decide for all four.
        **kwargs: base layer arguments.

    Call arguments: `query`, `value`, `key=None`, `attention_mask=None`
    (boolean `(batch, T, S)`, True attends), `return_attention_scores=False`,
    `training=None`, `use_causal_mask=False`; Keras masks on `query`, `value`
    and `key` are applied as Keras applies them.

    Example:

    >>> layer = MultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
    >>> tuple(layer(x, x, use_causal_mask=True).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        num_heads,
        key_dim=None,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        mult=1.0,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        self.fp8 = check_fp8(fp8)
        self.num_heads = checks.positive_int("num_heads", num_heads)
        if key_dim is None:
            raise ValueError(
                "`key_dim` (the size of each attention head) is required. Received: key_dim=None"
            )
        self.key_dim = checks.positive_int("key_dim", key_dim)
        self.value_dim = self.key_dim if value_dim is None else checks.positive_int("value_dim", value_dim)
        self.dropout = checks.rate("dropout", dropout)
        self.use_bias = bool(use_bias)
        if output_shape is not None and not isinstance(output_shape, int):
            output_shape = tuple(output_shape)
            if len(output_shape) != 1:
                raise ValueError(
                    "`output_shape` must be an integer or a 1-tuple. "
                    f"Received: output_shape={output_shape!r}"
                )
            output_shape = output_shape[0]
        self.output_dim = None if output_shape is None else checks.positive_int("output_shape", output_shape)
        self.mult = float(checks.positive("mult", mult))
        self.kernel_initializer = keras.initializers.get(kernel_initializer or unit_normal())
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def _projection(self, name, fan_in, head_dim):
        kernel = self.add_weight(
            name=f"{name}_kernel",
            shape=(fan_in, self.num_heads, head_dim),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.declare_role(kernel, "hidden", fan_in=fan_in, fan_out=self.num_heads * head_dim)
        bias = None
        if self.use_bias:
            bias = self.add_weight(
                name=f"{name}_bias",
                shape=(self.num_heads, head_dim),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            self.declare_role(bias, "bias", fan_out=self.num_heads * head_dim)
        return kernel, bias

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            if len(shape) != 3 or shape[-1] is None:
                raise ValueError(
                    f"`MultiHeadAttention` takes rank-3 inputs (batch, seq, dim) with a known "
                    f"last dimension. Received: {name}.shape={tuple(shape)}"
                )
        output_dim = self.output_dim or query_shape[-1]
        self.query_kernel, self.query_bias = self._projection("query", query_shape[-1], self.key_dim)
        self.key_kernel, self.key_bias = self._projection("key", key_shape[-1], self.key_dim)
        self.value_kernel, self.value_bias = self._projection("value", value_shape[-1], self.value_dim)
        self.output_kernel = self.add_weight(
            name="output_kernel",
            shape=(self.num_heads, self.value_dim, output_dim),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.declare_role(
            self.output_kernel, "hidden", fan_in=self.num_heads * self.value_dim, fan_out=output_dim
        )
        self.output_bias = None
        if self.use_bias:
            self.output_bias = self.add_weight(
                name="output_bias",
                shape=(output_dim,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            self.declare_role(self.output_bias, "bias", fan_out=output_dim)

    def _project(self, x, kernel, bias):
        """A unit-scaled dense projection into heads: (B, T, d) → (B, T, heads, head_dim)."""
        fan_in, heads, head_dim = kernel.shape
        kernel, bias = self.multiplied(kernel), self.multiplied(bias)
        flat_bias = None if bias is None else ops.reshape(bias, (heads * head_dim,))
        y = U.dense(x, ops.reshape(kernel, (fan_in, heads * head_dim)), flat_bias, fp8=precision.uses_fp8(self.fp8))
        return ops.reshape(y, tuple(ops.shape(x)[:-1]) + (heads, head_dim))

    def _mask(self, query_mask, value_mask, key_mask, attention_mask):
        """Joins the Keras masks and `attention_mask` into one (B, 1, T, S) boolean mask."""
        mask = None
        for part, axis in ((query_mask, -1), (value_mask, -2), (key_mask, -2)):
            if part is not None:
                part = ops.expand_dims(ops.cast(part, "bool"), axis)
                mask = part if mask is None else ops.logical_and(mask, part)
        if attention_mask is not None:
            attention_mask = ops.cast(attention_mask, "bool")
            mask = attention_mask if mask is None else ops.logical_and(mask, attention_mask)
        return None if mask is None else ops.expand_dims(mask, 1)

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        if key is None:
            key = value
            key_mask = None
        q = self._project(query, self.query_kernel, self.query_bias)
        k = self._project(key, self.key_kernel, self.key_bias)
        v = self._project(value, self.value_kernel, self.value_bias)
        attended = U.dot_product_attention(
            q,
            k,
            v,
            mask=self._mask(query_mask, value_mask, key_mask, attention_mask),
            is_causal=use_causal_mask,
            dropout_rate=self.dropout,
            mult=self.mult,
            training=bool(training),
            seed=self.seed_generator,
            return_attention_scores=return_attention_scores,
        )
        scores = None
        if return_attention_scores:
            attended, scores = attended
        heads, value_dim, output_dim = self.output_kernel.shape
        merged = ops.reshape(attended, tuple(ops.shape(attended)[:-2]) + (heads * value_dim,))
        output_kernel = ops.reshape(self.multiplied(self.output_kernel), (heads * value_dim, output_dim))
        output = U.dense(merged, output_kernel, self.multiplied(self.output_bias),
                         fp8=precision.uses_fp8(self.fp8, critical=True))
        return (output, scores) if return_attention_scores else output

    def compute_output_shape(self, query_shape, value_shape, key_shape=None):
        return tuple(query_shape[:-1]) + (self.output_dim or query_shape[-1],)

    def compute_mask(self, query, value, key=None, query_mask=None, **kwargs):
        return query_mask

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "value_dim": self.value_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "output_shape": self.output_dim,
            "mult": self.mult,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "seed": self.seed,
            "fp8": self.fp8,
            **self.multiplier_config(),
        }
