"""The unit-scaled `MultiHeadAttention` layer."""


import keras
from keras import ops

from keras_unitscale import checks
from keras_unitscale import rules
from keras_unitscale import weights
from keras_unitscale.layers.common import check_fp8
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.layers.einsum_dense import EinsumDense
from keras_unitscale.ops import attention as attention_ops
from keras_unitscale.rebinding import with_names
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.sizes import shape as shape_of

_KerasMultiHeadAttention = keras.layers.MultiHeadAttention

# The projections Keras's `MultiHeadAttention` builds, by the names it gives them.
PROJECTIONS = ("query", "key", "value", "gate", "attention_output")
# u-μP's critical matmul among them: left in higher precision by the global FP8 setting.
_CRITICAL = "attention_output"


class _CausalOnly:
    """What `_compute_attention_mask` returns when the causal mask is the only mask.

    Keras's `call` passes the mask it computes straight to
    `_compute_attention`, which then runs the backend's causal kernel
    (`is_causal=True`) instead of a materialised `(T, S)` mask, as Keras's own
    layer does on that path.
    """

    def __repr__(self):
        return "CAUSAL_ONLY"


CAUSAL_ONLY = _CausalOnly()


def _with_our_projections(function, make_projection):
    """Keras's `function`, run with `make_projection` where it constructs an `EinsumDense`.

    Keras's `MultiHeadAttention.build` and `_make_output_dense` construct
    their projections with the module-level name `EinsumDense`. This is the
    same code with that one name bound to ours (`rebinding.with_names`:
    Keras's module is untouched), so the sublayers, their equations, names
    and variable paths stay exactly Keras's and follow its version.
    """
    return with_names(function, EinsumDense=make_projection)


def _split_path(path, argument):
    """("query", "kernel") from "query/kernel"; raises for anything else."""
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) != 2 or parts[0] not in PROJECTIONS or not parts[1]:
        raise ValueError(
            "A weight of `MultiHeadAttention` is named by its path within the layer, "
            f"'<projection>/<variable>' with the projection one of {list(PROJECTIONS)} "
            f"(e.g. 'query/kernel', 'attention_output/bias'). Received: {argument}={path!r}"
        )
    return parts[0], parts[1]


@keras.saving.register_keras_serializable(package="keras_unitscale")
class MultiHeadAttention(_KerasMultiHeadAttention):
    """Unit-scaled multi-head attention: `keras.layers.MultiHeadAttention` with unit-scaled ops.

    The projections are this package's `EinsumDense` (unit-normal kernels,
    the dense rule with each einsum's fan-in and fan-out), built by Keras's
    own `build`: the same sublayers, equations and variable paths as Keras's
    (`query/kernel`, `key/kernel`, `value/kernel`, `attention_output/kernel`,
    their biases, `gate/kernel` with `use_gate`), so weights, layout maps
    and `Model.quantize` line up. Attention is unit-scaled dot-product
    attention (`rules.attention.attention`): logits × `mult / head_dim`
    (u-μP's `1/d`, not `1/sqrt(d)`), and the output and the query, key and
    value gradients × the rule's scale `s`, which depends on the key length
    `S` (the product of the attention axes' sizes), on the dropout rate and
    on whether attention is causal.

    Attention is causal, for the rule, when its mask lets no query attend a
    later key: `use_causal_mask=True`, or an `attention_mask` (or Keras mask)
    that implies it, so an explicit causal mask gives what
    `use_causal_mask=True` gives. This is read from the mask when the layer
    runs, over one attention axis; over several, the non-causal scale
    applies. A `sliding_window`, like any mask, leaves `S` as it is.

    Everything else is Keras's: the Keras masks of query, value and key, every
    `attention_mask` shape Keras takes (`(T, S)`, `(B, T, S)`,
    `(B, H, T, S)`), `use_causal_mask`, `sliding_window`,
    `return_attention_scores` (a tuple, symbolic calls included),
    `attention_axes` and inputs of any rank >= 3, tuple `output_shape`,
    dropout on the probabilities, `flash_attention`, configs and the
    quantized dtype policies. Where Keras's computation changes, the rule
    applies on top of it:

    - `use_gate=True`: the gate is Keras's sigmoid gate with the unit-scaled
      sigmoid (see `_projection`), so the gated output keeps unit scale.
    - LoRA: each projection is an `EinsumDense` with LoRA
      (`layer.query_dense.enable_lora(rank)`; Keras's `MultiHeadAttention`
      has no `enable_lora` of its own), under `EinsumDense`'s rule.
    - Quantization: `Model.quantize(...)` quantizes the projections, each
      inside the dense rule's scales (`EinsumDense.quantized_call`).

    Args:
        num_heads: as for `keras.layers.MultiHeadAttention`.
        key_dim: as for `keras.layers.MultiHeadAttention`.
        value_dim: as for `keras.layers.MultiHeadAttention`.
        use_bias: as for `keras.layers.MultiHeadAttention`.
        output_shape: as for `keras.layers.MultiHeadAttention`.
        attention_axes: as for `keras.layers.MultiHeadAttention`.
        sliding_window: as for `keras.layers.MultiHeadAttention`.
        flash_attention: as for `keras.layers.MultiHeadAttention`.
        bias_initializer: as for `keras.layers.MultiHeadAttention`.
        kernel_regularizer: as for `keras.layers.MultiHeadAttention`.
        bias_regularizer: as for `keras.layers.MultiHeadAttention`.
        activity_regularizer: as for `keras.layers.MultiHeadAttention`.
        kernel_constraint: as for `keras.layers.MultiHeadAttention`.
        bias_constraint: as for `keras.layers.MultiHeadAttention`.
        use_gate: as for `keras.layers.MultiHeadAttention`.
        seed: as for `keras.layers.MultiHeadAttention`.
        dropout: dropout on the attention probabilities, in [0, 1); the
            rule's scale has its `sqrt(1 - p)` in training.
        kernel_initializer: defaults to unit-variance normal.
        mult: the u-μP multiplier of the attention logits.
        weight_multipliers: fixed forward multipliers on the projections'
            weights, by path within this layer: `{"query/kernel": m,
            "attention_output/bias": m}` (each projection keeps its own, see
            `common.WeightMultipliers`, and saves them with its weights).
        lr_multipliers: fixed learning-rate factors, keyed likewise (set by
            `unit_scale`).
        fp8: the projections in scale-free FP8: None follows
            `keras_unitscale.precision`'s setting (the output projection,
            u-μP's critical matmul, only with `critical=True`), True or
            False decide for all.
        rule_key_length: the key length the rule's output scale is computed
            for; None: each call's key length. A fixed one keeps the output
            scale one constant at every length (a converted model's
            multipliers need that to compute what the original did).
        rule_causal: whether the rule's causal constant applies; None: where
            the mask is causal, found at run time. KerasHub's decoders, which
            pass their causal mask with a key/value cache, set it.
        **kwargs: base layer arguments.

    Call arguments: as for `keras.layers.MultiHeadAttention` (`query`,
    `value`, `key=None`, `attention_mask=None`, `return_attention_scores=False`,
    `training=None`, `use_causal_mask=False`).

    Examples:
        >>> layer = MultiHeadAttention(num_heads=2, key_dim=8, name="mha")
        >>> x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
        >>> tuple(layer(x, x, use_causal_mask=True).shape), [v.path for v in layer.weights][:2]
        ((2, 5, 16), ['mha/query/kernel', 'mha/query/bias'])
    """

    def __init__(
        self,
        num_heads,
        key_dim=None,
        value_dim=None,
        dropout=0.0,
        use_bias=True,
        output_shape=None,
        attention_axes=None,
        sliding_window=None,
        flash_attention=None,
        kernel_initializer=None,
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        use_gate=False,
        seed=None,
        mult=1.0,
        weight_multipliers=None,
        lr_multipliers=None,
        fp8=None,
        rule_key_length=None,
        rule_causal=None,
        **kwargs,
    ):
        dropout = checks.rate("dropout", dropout)
        super().__init__(
            num_heads, key_dim, value_dim=value_dim, dropout=dropout, use_bias=use_bias, output_shape=output_shape,
            attention_axes=attention_axes, sliding_window=sliding_window, flash_attention=flash_attention,
            kernel_initializer=kernel_initializer or unit_normal(), bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer, kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint, use_gate=use_gate, seed=seed, **kwargs,
        )
        self.mult = float(checks.positive("mult", mult))
        self.fp8 = check_fp8(fp8)
        self.rule_key_length = None if rule_key_length is None else checks.positive_int("rule_key_length", rule_key_length)
        self.rule_causal = None if rule_causal is None else bool(rule_causal)
        # Plain dicts by "projection/variable", kept out of Keras's attribute
        # tracking: the values that wait for the projections (emptied as they build).
        for attribute, argument, given in (
            ("_waiting_multipliers", "weight_multipliers", weight_multipliers),
            ("_waiting_lr_multipliers", "lr_multipliers", lr_multipliers),
        ):
            values = weights.check_multipliers(argument, given)
            for path in values:
                _split_path(path, argument)
            object.__setattr__(self, attribute, values)

    # --- the projections: Keras's, built as ours ------------------------------

    def build(self, query_shape, value_shape, key_shape=None):
        # The key's shape is Keras's to check: it must match the value's but for its last dimension.
        for name, shape in (("query", query_shape), ("value", value_shape)):
            if len(shape) < 3 or shape[-1] is None:
                raise ValueError(
                    "`MultiHeadAttention` takes inputs of rank >= 3, (batch, ..., features), with a known "
                    f"last dimension. Received: {name}.shape={tuple(shape)}"
                )
        _with_our_projections(_KerasMultiHeadAttention.build, self._projection)(
            self, query_shape, value_shape, key_shape
        )
        self._check_waiting_names()

    def _make_output_dense(self, query_shape, common_kwargs, name=None):
        return _with_our_projections(_KerasMultiHeadAttention._make_output_dense, self._projection)(
            self, query_shape, common_kwargs, name
        )

    def _projection(self, *args, name=None, **kwargs):
        """One projection, where Keras constructs an `EinsumDense`: ours, with this layer's settings."""

        def waiting(values):
            return {
                path.split("/")[1]: values.pop(path) for path in list(values) if path.split("/")[0] == name
            }

        # Every projection is a hidden one, the gate too: its sigmoid is the
        # unit-scaled op (`rules.activations.sigmoid`, `σ(z) / RMS(σ(z))`), a
        # hidden feature rather than a probability, so that the gated product
        # of two unit-RMS tensors stays at unit RMS (a plain gate: ≈ 0.54).
        return EinsumDense(
            *args,
            name=name,
            role="hidden",
            fp8=self.fp8,
            fp8_critical=name == _CRITICAL,
            weight_multipliers=waiting(self._waiting_multipliers),
            lr_multipliers=waiting(self._waiting_lr_multipliers),
            **kwargs,
        )

    def _check_waiting_names(self):
        known = self._known_paths()
        for argument, values in (
            ("weight_multipliers", self._waiting_multipliers),
            ("lr_multipliers", self._waiting_lr_multipliers),
        ):
            unknown = [path for path in values if path not in known]
            if unknown:
                raise ValueError(
                    f"`{argument}` names weights layer '{self.name}' does not have: {unknown}. "
                    f"Its weights are {sorted(known)}."
                )
        for projection in self._projections().values():
            for argument, values in (
                ("weight_multipliers", projection._waiting_multipliers),
                ("lr_multipliers", projection._waiting_lr_multipliers),
            ):
                if values:
                    raise ValueError(
                        f"`{argument}` names weights layer '{self.name}' does not have: "
                        f"{[f'{projection.name}/{name}' for name in values]}. Its weights are {sorted(known)}."
                    )

    def _projections(self):
        """{name: projection} of the projections built so far (none before `build`)."""
        found = [getattr(self, attribute, None) for attribute in
                 ("_query_dense", "_key_dense", "_value_dense", "_gate_dense", "_output_dense")]
        return {layer.name: layer for layer in found if layer is not None}

    def _known_paths(self):
        return {f"{name}/{v.name}" for name, layer in self._projections().items() for v in layer._own_weights()}

    # --- weight and learning-rate multipliers, by "projection/variable" -------

    def _by_path(self, getter, waiting):
        if not self.built:
            return dict(waiting)
        return {
            f"{name}/{variable}": value
            for name, layer in self._projections().items()
            for variable, value in getter(layer).items()
        }

    @property
    def weight_multipliers(self):
        """{"projection/variable": weight multiplier} for the weights whose multiplier is not 1."""
        return self._by_path(lambda layer: layer.weight_multipliers, self._waiting_multipliers)

    @property
    def lr_multipliers(self):
        """{"projection/variable": fixed learning-rate multiplier}, for the weights that have one."""
        return self._by_path(lambda layer: layer.lr_multipliers, self._waiting_lr_multipliers)

    def _owner(self, path, argument):
        projection, variable = _split_path(path, argument)
        if not self.built:
            return None, variable
        layer = self._projections().get(projection)
        if layer is None or variable not in [v.name for v in layer._own_weights()]:
            raise ValueError(
                f"Layer '{self.name}' has no weight called '{path}'. Its weights are "
                f"{sorted(self._known_paths())}. Received: name={path!r}"
            )
        return layer, variable

    def weight_multiplier(self, path):
        """The weight multiplier of the weight at `path` ("query/kernel", ...): 1 unless one was set."""
        layer, variable = self._owner(path, "name")
        return self._waiting_multipliers.get(path, 1.0) if layer is None else layer.weight_multiplier(variable)

    def set_weight_multiplier(self, path, value):
        """Sets the weight multiplier of the weight at `path` (functions traced before keep the old one)."""
        layer, variable = self._owner(path, "name")
        if layer is not None:
            layer.set_weight_multiplier(variable, value)
        else:
            self._waiting_multipliers[path] = weights.check_multipliers("weight_multipliers", {path: value})[path]

    def lr_multiplier(self, path):
        """The fixed learning-rate multiplier of the weight at `path`, or None."""
        layer, variable = self._owner(path, "name")
        return self._waiting_lr_multipliers.get(path) if layer is None else layer.lr_multiplier(variable)

    def set_lr_multiplier(self, path, value):
        """Fixes the learning-rate multiplier of the weight at `path` (None removes it)."""
        layer, variable = self._owner(path, "name")
        if layer is not None:
            layer.set_lr_multiplier(variable, value)
        elif value is None:
            self._waiting_lr_multipliers.pop(path, None)
        else:
            self._waiting_lr_multipliers[path] = weights.check_multipliers("lr_multipliers", {path: value})[path]

    # --- attention ------------------------------------------------------------

    def _compute_attention_mask(self, query, value, query_mask=None, value_mask=None, key_mask=None,
                                attention_mask=None, use_causal_mask=False):
        causal_only = (
            use_causal_mask
            and query_mask is None
            and value_mask is None
            and key_mask is None
            and attention_mask is None
            and self._sliding_window is None
            # A subclass's own `_compute_attention` gets Keras's mask.
            and type(self)._compute_attention is MultiHeadAttention._compute_attention
        )
        if causal_only:
            return CAUSAL_ONLY
        return super()._compute_attention_mask(
            query, value, query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
            attention_mask=attention_mask, use_causal_mask=use_causal_mask,
        )

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        if self._flash_attention and return_attention_scores:
            raise ValueError(
                "Returning attention scores is not supported when flash attention is enabled. Please disable "
                "flash attention to access attention scores."
            )
        causal_only = attention_mask is CAUSAL_ONLY or (use_causal_mask and attention_mask is None)
        if attention_mask is CAUSAL_ONLY:
            attention_mask = None
        elif use_causal_mask and attention_mask is not None:
            attention_mask = ops.logical_and(ops.cast(attention_mask, "bool"), self._compute_causal_mask(query, key))
        rate = self._dropout if training and self._dropout > 0 else 0.0
        if len(query.shape) == 4:
            return self._attention(query, key, value, attention_mask, causal_only, rate, return_attention_scores)
        return self._attention_over_axes(query, key, value, attention_mask, causal_only, rate, training)

    def _attention(self, query, key, value, mask, causal_only, rate, return_attention_scores):
        """Queries, keys and values `(B, T|S, heads, dim)`: the unit-scaled op, or the fused kernel Keras asks for."""
        if mask is not None:
            # Keras's broadcast of (T, S) and (B, T, S) masks to (B, heads, T, S).
            for _ in range(4 - len(mask.shape)):
                mask = ops.expand_dims(mask, axis=-len(self._attention_axes) * 2 - 1)
            mask = ops.cast(mask, "bool")
        scores = None
        if self._flash_attention is None or rate or return_attention_scores:
            out = attention_ops.dot_product_attention(
                query, key, value, mask=mask, is_causal=causal_only, dropout_rate=self._dropout, mult=self.mult,
                training=bool(rate), seed=self._dropout_layer.seed_generator if rate else None,
                return_attention_scores=return_attention_scores, rule_key_length=self.rule_key_length,
                rule_causal=self.rule_causal,
            )
            if return_attention_scores:
                out, scores = out
        else:
            # The op's fused path, with Keras's `flash_attention` setting passed on.
            scales = rules.attention.attention(shape_of(query)[-1], self._rule_length(shape_of(key)[1]), self.mult,
                                               causal_only if self.rule_causal is None else self.rule_causal)
            query, key, value = (scale_bwd(t, scales.output) for t in (query, key, value))
            out = ops.dot_product_attention(query, key, value, mask=mask, scale=scales.logits,
                                            is_causal=causal_only, flash_attention=self._flash_attention)
            out = scale_fwd(out, scales.output)
        if mask is not None and self.rule_causal is None:
            out = self._if_causal(out, mask, query, key, 1, self._rule_length(shape_of(key)[1]), rate)
        return out, scores

    def _rule_length(self, key_length):
        return key_length if self.rule_key_length is None else self.rule_key_length

    def _attention_over_axes(self, query, key, value, mask, causal_only, rate, training):
        """Any rank and attention axes: Keras's einsums and masked softmax, inside the rule's scales."""
        axes = self._attention_axes
        if causal_only:
            # As Keras's own general path does.
            mask = self._compute_causal_mask(query, key)
        seq_len = self._rule_length(_product(shape_of(key)[axis] for axis in axes))
        scales = rules.attention.attention(shape_of(query)[-1], seq_len, self.mult, bool(self.rule_causal), rate)
        query, key, value = (scale_bwd(t, scales.output) for t in (query, key, value))
        query = ops.multiply(query, ops.cast(scales.logits, query.dtype))
        scores = self._masked_softmax(ops.einsum(self._dot_product_equation, key, query), mask)
        kept = self._dropout_layer(scores, training=training) if rate else scores
        out = scale_fwd(ops.einsum(self._combine_equation, kept, value), scales.output)
        if mask is not None and len(axes) == 1 and self.rule_causal is None:
            out = self._if_causal(out, mask, query, key, axes[0], seq_len, rate)
        return out, scores

    def _if_causal(self, out, mask, query, key, axis, seq_len, rate):
        """`out` times the causal over the non-causal scale of the rule, where `mask` lets no query see a later key.

        The mask's last two axes are (query, key) positions along the one
        attention axis. Where it is causal, the computation above applied
        the non-causal scale `s` to the output and to the gradients of
        query, key and value; an ordinary product by `s_causal / s`, in both
        passes, brings both to the causal scale.
        """
        head_dim = shape_of(query)[-1]
        plain = rules.attention.attention(head_dim, seq_len, self.mult, False, rate).output
        causal = rules.attention.attention(head_dim, seq_len, self.mult, True, rate).output
        later = ops.greater(
            ops.expand_dims(ops.arange(ops.shape(key)[axis]), 0), ops.expand_dims(ops.arange(ops.shape(query)[axis]), 1)
        )
        sees_later = ops.any(ops.logical_and(ops.cast(mask, "bool"), later))
        ratio = ops.where(sees_later, 1.0, ops.cast(causal, "float32") / ops.cast(plain, "float32"))
        return ops.multiply(out, ops.cast(ratio, out.dtype))

    def get_config(self):
        return {
            **super().get_config(),
            "mult": self.mult,
            "fp8": self.fp8,
            "rule_key_length": self.rule_key_length,
            "rule_causal": self.rule_causal,
            "weight_multipliers": self.weight_multipliers,
            "lr_multipliers": self.lr_multipliers,
        }


def _product(sizes):
    """The product of sizes: an int when all are static, else a float32 scalar tensor."""
    result = 1
    for size in sizes:
        result = result * size
    return result
