"""Unit-scaled twins of KerasHub's modelling layers: each one is KerasHub's layer, subclassed.

A twin builds with KerasHub's own `build`, run with the names it constructs
its sublayers through (`keras.layers.Dense`, `LlamaAttention`, ...) bound to
ours (`rebinding.with_names`): the same sublayers, attribute names and
variable paths, so KerasHub's layout maps, checkpoints' paths and
`generate()` keep working. What a twin changes beyond that is the Python
between the sublayers (the residual adds, the gated MLP's product, the
attention's scores), written with the unit-scaled ops and stated in its
docstring. Our layers start at unit scale: the initialisers KerasHub passes
are dropped.

This module imports `keras_hub`: `keras_unitscale.hub` loads it only where
`keras_hub` is installed.
"""

import keras
from keras import ops
from keras.src import backend as keras_backend
from keras_hub.src.layers.modeling import position_embedding
from keras_hub.src.models.gemma import gemma_attention
from keras_hub.src.models.gemma import gemma_decoder_block
from keras_hub.src.models.llama import llama_attention
from keras_hub.src.models.llama import llama_decoder
from keras_hub.src.models.mistral import mistral_attention
from keras_hub.src.models.mistral import mistral_transformer_decoder

from keras_unitscale import functional as U
from keras_unitscale import layers as L
from keras_unitscale import parametrization
from keras_unitscale import rules
from keras_unitscale.layers.common import WeightMultipliers
from keras_unitscale.layers.common import unit_normal
from keras_unitscale.ops import linear
from keras_unitscale.rebinding import Namespace
from keras_unitscale.rebinding import with_names
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd

__all__ = [
    "ReversibleEmbedding", "PositionEmbedding", "LlamaAttention", "MistralAttention", "GemmaAttention",
    "LlamaTransformerDecoder", "MistralTransformerDecoder", "GemmaDecoderBlock", "UnitScaledBlock", "MLP_DENSE",
    "unit_initialised", "keras_with_ours", "critical_if_named",
]

# The initialiser arguments KerasHub gives its layers; ours start at unit scale.
_INITIALIZERS = ("kernel_initializer", "embeddings_initializer", "initializer")


def unit_initialised(layer_class, **settings):
    """`layer_class` as KerasHub's code constructs it, without the initialisers it passes, with `settings` added."""
    def construct(*args, **kwargs):
        for key in _INITIALIZERS:
            kwargs.pop(key, None)
        return layer_class(*args, **settings, **kwargs)

    return construct


def keras_with_ours(**layers):
    """`keras` as KerasHub's code sees it, with `keras.layers.<name>` ours (unit-initialised) for each of `layers`."""
    return Namespace(keras, layers=Namespace(keras.layers, **{
        name: unit_initialised(layer_class) for name, layer_class in layers.items()
    }))


def critical_if_named(layer_class, *names):
    """`layer_class`, constructed with `fp8_critical=True` under `names`: the output projections u-μP keeps precise."""
    def construct(*args, **kwargs):
        if kwargs.get("name") in names:
            kwargs["fp8_critical"] = True
        return layer_class(*args, **kwargs)

    return construct


@keras.saving.register_keras_serializable(package="keras_unitscale")
class ReversibleEmbedding(L.Embedding, keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` (KerasHub's token embedding) with the unit-scaled lookup and readout.

    Forward (`reverse=False`) it is our `Embedding`: rows at unit scale,
    u-μP's input weight. In reverse it is u-μP's readout: `x·Wᵀ / fan_in`
    (`ops.linear.dense_readout`, `fan_in` the embedding width) times
    `readout_mult`, then Keras's soft cap where one is set.

    Tied weights (`tie_weights=True`, GPT-2's and Gemma's): the one table is
    the lookup's input weight and the readout's kernel. It keeps the input
    weight's role (u-μP's embedding learning rate, which does not shrink
    with the width), and its gradient is the sum of its two uses', each
    scaled by its own rule: both parts are at unit scale. The sum does not
    point where the true gradient does (the lookup's part arrives through the
    readout's input gradient, which u-μP scales as a cut edge), so a tied
    model's equivalent twin predicts as the original does but does not train
    as it does. Untied (Llama's), the reverse table is a readout weight of its
    own (role "output", u-μP's readout learning rate).

    Args:
        readout_mult: a fixed forward multiplier on the readout's logits
            (`unit_scale` sets it so that a tied table computes the
            original's logits).
        lookup_mult: a fixed multiplier on the looked-up rows, in both
            passes. Gemma's backbone multiplies the rows by
            `sqrt(hidden_dim)`; its twin sets `hidden_dim^-1/2`, so that the
            stream starts at unit scale and the table's gradient is the
            lookup's own.
        **kwargs: as for `keras.layers.ReversibleEmbedding` and our `Embedding`.
    """

    def __init__(self, input_dim, output_dim, readout_mult=1.0, lookup_mult=1.0, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        self.readout_mult = float(readout_mult)
        self.lookup_mult = float(lookup_mult)

    def declare_roles(self):
        super().declare_roles()
        if not self.tie_weights:
            self.declare_role(self.reverse_embeddings, "output", fan_in=self.output_dim, fan_out=self.input_dim)

    def call(self, inputs, reverse=False):
        if not reverse:
            rows = super().call(inputs)
            if self.lookup_mult != 1.0:
                rows = rows * ops.cast(self.lookup_mult, rows.dtype)
            # Keras's layer sets the padding mask in `call` (its `compute_mask` gives None, for the reverse call).
            mask = keras.layers.Embedding.compute_mask(self, inputs)
            if mask is not None:
                keras_backend.set_keras_mask(rows, mask)
            return rows
        if self.tie_weights:
            kernel = ops.transpose(self.multiplied(self._embeddings, self.embeddings))
        else:
            kernel = self.multiplied(self.reverse_embeddings)
        if self.reverse_dtype is not None:
            inputs, kernel = ops.cast(inputs, self.reverse_dtype), ops.cast(kernel, self.reverse_dtype)
        logits = linear.dense_readout(inputs, kernel)
        if self.readout_mult != 1.0:
            logits = scale_fwd(logits, self.readout_mult)
        if self.logit_soft_cap is not None:
            logits = ops.tanh(logits / self.logit_soft_cap) * self.logit_soft_cap
        return logits

    def get_config(self):
        return {**super().get_config(), "readout_mult": self.readout_mult, "lookup_mult": self.lookup_mult}


@keras.saving.register_keras_serializable(package="keras_unitscale")
class PositionEmbedding(WeightMultipliers, position_embedding.PositionEmbedding):
    """KerasHub's learned `PositionEmbedding`, unit-scaled: a lookup of each position's row, as our `Embedding`.

    Rows start at unit scale and are returned as they are; the table's
    gradient is scaled as an embedding's (`ops.linear.embedding`: each row
    sums the gradient of every sequence in the batch). `start_index` (the
    key/value cache's position in `generate()`) and `positions` work as in
    KerasHub's layer.

    Args:
        weight_multipliers: as for our `Embedding`.
        lr_multipliers: as for our `Embedding`.
        **kwargs: as for KerasHub's `PositionEmbedding`.
    """

    def __init__(self, sequence_length, weight_multipliers=None, lr_multipliers=None, **kwargs):
        self._init_weight_multipliers(weight_multipliers, lr_multipliers)
        kwargs.pop("initializer", None)
        super().__init__(sequence_length, initializer=unit_normal(), **kwargs)

    def build(self, inputs_shape):
        super().build(inputs_shape)
        self.declare_role(self.position_embeddings, "input", fan_in=1, fan_out=int(inputs_shape[-1]))

    def call(self, inputs, start_index=0, positions=None):
        shape = ops.shape(inputs)
        if positions is None:
            # A static length and a (possibly traced) start: `generate()`'s index under JAX's jit.
            positions = ops.arange(shape[-2], dtype="int32") + ops.cast(start_index, "int32")
        elif len(positions.shape) == 1:
            positions = ops.expand_dims(positions, axis=0)
        table = self.multiplied(self.position_embeddings)
        rows = linear.embedding(ops.broadcast_to(positions, shape[:-1]), table)
        return ops.cast(rows, self.compute_dtype)

    def get_config(self):
        config = {**super().get_config(), **self.multiplier_config()}
        config.pop("initializer", None)
        return config


def _shared_heads(key, value, groups):
    """A key and value head that `groups` query heads share: their gradients × `groups^-1/2`."""
    if groups == 1:
        return key, value
    shared = rules.attention.shared_key_value(groups)
    return scale_bwd(key, shared), scale_bwd(value, shared)


class _GroupedQueryAttention:
    """Llama's and Mistral's attention (grouped-query, rotary, key/value cache), with the unit-scaled projections and scores.

    The query, key, value and output projections are our `EinsumDense`
    (the output one a critical matmul for FP8); the scores are
    `ops.attention.dot_product_attention`'s: logits × `mult / head_dim`
    (u-μP's rule, not `1/sqrt(head_dim)`), the output at unit scale under the
    causal rule (KerasHub passes its causal mask, merged with the padding
    mask and Mistral's sliding window, as a mask). A key or value head
    shared by `groups` query heads has its gradient × `groups^-1/2`
    (`rules.attention.shared_key_value`). The rotary embedding has no weights
    and is KerasHub's.

    Args:
        mult: u-μP's attention-logit multiplier.
        rule_key_length: the key length the output scale is computed for;
            None: the key length of each call. `unit_scale` fixes it in
            equivalent mode, so that one multiplier keeps the original's
            function at every length.
        shared_heads_rule: scale the shared heads' gradients (above).
            `unit_scale` turns it off in equivalent mode: it is the one
            backward-only scale inside a block, and without it the twin's
            gradients point where the original's do, so an optimizer that
            follows the original follows it.
        **kwargs: as for KerasHub's layer.
    """

    _keras_hub_class = None  # the KerasHub class, whose `build` runs with our projections
    _groups_attribute = None  # where it keeps the number of query heads per key/value head

    def __init__(self, *args, mult=1.0, rule_key_length=None, shared_heads_rule=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.mult = float(mult)
        self.rule_key_length = rule_key_length
        self.shared_heads_rule = bool(shared_heads_rule)

    def build(self, inputs_shape):
        projection = critical_if_named(L.EinsumDense, "attention_output")
        build = with_names(self._keras_hub_class.build, keras=keras_with_ours(EinsumDense=projection, Dropout=L.Dropout))
        build(self, inputs_shape)

    def _compute_attention(self, query, key, value, attention_mask=None, **options):
        if self.shared_heads_rule:
            key, value = _shared_heads(key, value, getattr(self, self._groups_attribute))
        mask = None if attention_mask is None else ops.cast(ops.expand_dims(attention_mask, axis=1), "bool")
        return U.dot_product_attention(query, key, value, mask=mask, mult=self.mult,
                                       rule_key_length=self.rule_key_length, rule_causal=True, **options)


class LlamaAttention(_GroupedQueryAttention, llama_attention.LlamaAttention):
    __doc__ = _GroupedQueryAttention.__doc__
    _keras_hub_class = llama_attention.LlamaAttention
    _groups_attribute = "num_key_value_groups"


class MistralAttention(_GroupedQueryAttention, mistral_attention.CachedMistralAttention):
    __doc__ = _GroupedQueryAttention.__doc__
    _keras_hub_class = mistral_attention.CachedMistralAttention
    _groups_attribute = "_num_key_value_groups"


class GemmaAttention(_GroupedQueryAttention, gemma_attention.CachedGemmaAttention):
    """Gemma's attention (grouped-query, rotary, key/value cache), with the unit-scaled projections and scores.

    As `LlamaAttention` (see there), with what Gemma adds: the sliding
    window of alternate layers (KerasHub's mask), Gemma 2's soft-capped
    logits (`cap·tanh(logits/cap)`, `ops.attention.dot_product_attention`'s
    `logit_soft_cap`) and dropout on the attention probabilities. Gemma
    normalises its logits by `1/sqrt(head_dim)` (or `1/sqrt(hidden_dim /
    heads)` with `query_head_dim_normalize=False`); ours are u-μP's
    `mult/head_dim` either way.
    """

    _keras_hub_class = gemma_attention.CachedGemmaAttention
    _groups_attribute = "num_key_value_groups"

    def _compute_attention(self, q, k, v, attention_mask, training=False, cache_update_index=0):
        if self.use_sliding_window_attention and attention_mask is not None:
            attention_mask = self._mask_sliding_window(attention_mask, cache_update_index=cache_update_index)
        # Gemma's key and value heads come unrepeated: each serves `num_key_value_groups` query heads.
        k, v = (ops.repeat(t, self.num_key_value_groups, axis=2) for t in (k, v))
        return super()._compute_attention(q, k, v, attention_mask, logit_soft_cap=self.logit_soft_cap,
                                          dropout_rate=self.dropout, training=training)


# KerasHub's blocks name their MLP's down projection so; u-μP keeps it precise (FP8's critical matmul).
MLP_DENSE = critical_if_named(L.Dense, "feedforward_output_dense")


class UnitScaledBlock:
    """What our KerasHub blocks share: their residual branches' `tau`s, u-μP's depth factor, the norms' epsilons."""

    def _init_block(self, attention_tau, mlp_tau, depth, attention_options, norm_epsilons=None):
        self.attention_tau, self.mlp_tau, self.depth = float(attention_tau), float(mlp_tau), int(depth)
        self.attention_options = dict(attention_options or {})
        self.norm_epsilons = None if norm_epsilons is None else [float(epsilon) for epsilon in norm_epsilons]

    def branch_norms(self):
        """The norms of the attention and the MLP branch, in that order."""
        return [getattr(self, name) for name in self._BRANCH_NORMS]

    def _declare_depth(self):
        """The block's variables are of a residual stack of `depth` blocks: u-μP's learning rate × `depth^-1/2`.

        And the branch norms take `norm_epsilons` where it is set.
        """
        parametrization.set_depth(self.trainable_variables, self.depth)
        if self.norm_epsilons is not None:
            for norm, epsilon in zip(self.branch_norms(), self.norm_epsilons, strict=True):
                norm.epsilon = epsilon

    def get_config(self):
        return {**super().get_config(), "attention_tau": self.attention_tau, "mlp_tau": self.mlp_tau,
                "depth": self.depth, "attention_options": self.attention_options,
                "norm_epsilons": self.norm_epsilons}


class _SwiGLUDecoder(UnitScaledBlock):
    """Llama's and Mistral's decoder block, unit-scaled, with u-μP's residual rule.

    `x → residual_add(attention(norm(x)), x, attention_tau)`, then
    `x → residual_add(mlp(norm(x)), x, mlp_tau)`, each join split before its
    branch (`functional.residual_split`). The norms are our
    `RMSNormalization`, the attention ours (`LlamaAttention`,
    `MistralAttention`), the MLP our `Dense` layers around the unit-scaled
    SwiGLU (`functional.silu_glu`, in float32 as KerasHub computes its silu).
    The key/value cache of `generate()` passes through as in KerasHub's block.

    Args:
        attention_tau: the attention branch's `tau`
            (`rules.residual.transformer_residual_scaling_rule`).
        mlp_tau: the MLP branch's `tau`.
        depth: the number of blocks in the stack (u-μP's learning rate ×
            `depth^-1/2` on the block's variables).
        attention_options: keyword arguments of the attention layer
            (`LlamaAttention`'s `mult`, `rule_key_length`, `shared_heads_rule`).
        norm_epsilons: the two branch norms' epsilons (None: KerasHub's);
            a backbone sets its norms' epsilons itself (its `norm_epsilons`).
        **kwargs: as for KerasHub's block; `activation` must be "silu".
    """

    _keras_hub_class = None  # the KerasHub block, whose `build` runs with our layers
    _sublayers = ()  # the names its `build` constructs the attention and the norms through, and ours

    def __init__(self, *args, attention_tau=1.0, mlp_tau=1.0, depth=1, attention_options=None, norm_epsilons=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if keras.activations.serialize(self.activation) != "silu":
            raise ValueError(
                f"The unit-scaled {self._keras_hub_class.__name__} computes SwiGLU, `x · silu(gate)`. "
                f"Received: activation={keras.activations.serialize(self.activation)!r}"
            )
        self._init_block(attention_tau, mlp_tau, depth, attention_options, norm_epsilons)

    _BRANCH_NORMS = ("_self_attention_layernorm", "_feedforward_layernorm")

    def build(self, decoder_sequence_shape):
        attention_name, attention_class, norm_name = self._sublayers
        attention = unit_initialised(attention_class, **self.attention_options)
        build = with_names(self._keras_hub_class.build, **{attention_name: attention, norm_name: L.RMSNormalization},
                           keras=keras_with_ours(Dense=MLP_DENSE, Dropout=L.Dropout))
        build(self, decoder_sequence_shape)
        self._declare_depth()

    def call(self, decoder_sequence, decoder_padding_mask=None, decoder_attention_mask=None,
             self_attention_cache=None, self_attention_cache_update_index=None, training=None):
        attention_mask = self._compute_self_attention_mask(
            decoder_sequence=decoder_sequence, decoder_padding_mask=decoder_padding_mask,
            decoder_attention_mask=decoder_attention_mask, self_attention_cache=self_attention_cache,
            self_attention_cache_update_index=self_attention_cache_update_index,
        )
        branch, skip = U.residual_split(decoder_sequence, self.attention_tau)
        x = self._self_attention_layer(
            hidden_states=self._self_attention_layernorm(branch), attention_mask=attention_mask,
            cache=self_attention_cache, cache_update_index=self_attention_cache_update_index,
        )
        if self_attention_cache is not None:
            x, self_attention_cache = x
        x = U.residual_add(self._self_attention_dropout(x, training=training), skip, self.attention_tau)

        branch, skip = U.residual_split(x, self.mlp_tau)
        x = self._feedforward_layernorm(branch)
        gate = ops.cast(self._feedforward_gate_dense(x), "float32")
        x = ops.cast(self._feedforward_intermediate_dense(x), "float32")
        x = ops.cast(U.silu_glu(x, gate), self.compute_dtype)
        output = U.residual_add(self._feedforward_output_dense(x), skip, self.mlp_tau)
        if self_attention_cache is not None:
            return output, self_attention_cache
        return output


class LlamaTransformerDecoder(_SwiGLUDecoder, llama_decoder.LlamaTransformerDecoder):
    __doc__ = _SwiGLUDecoder.__doc__
    _keras_hub_class = llama_decoder.LlamaTransformerDecoder
    _sublayers = ("LlamaAttention", LlamaAttention, "LlamaLayerNorm")


class MistralTransformerDecoder(_SwiGLUDecoder, mistral_transformer_decoder.MistralTransformerDecoder):
    __doc__ = _SwiGLUDecoder.__doc__
    _keras_hub_class = mistral_transformer_decoder.MistralTransformerDecoder
    _sublayers = ("CachedMistralAttention", MistralAttention, "MistralLayerNormalization")


class GemmaDecoderBlock(UnitScaledBlock, gemma_decoder_block.GemmaDecoderBlock):
    """Gemma's decoder block (Gemma 2's too), unit-scaled, with u-μP's residual rule.

    `x → residual_add(post_norm(attention(norm(x))), x, attention_tau)`, then
    `x → residual_add(post_norm(mlp(norm(x))), x, mlp_tau)`, each join split
    before its branch; the post-norms (Gemma 2's) only where KerasHub's block
    has them. The norms are our `RMSNormalization`: Gemma's computes
    `(1 + scale)·x̂` from a zero `scale`, ours `gain·x̂` from a unit gain, the
    same function and the same Adam steps (weight decay pulls a gain to 0
    where Gemma's pulls it to 1). The attention is our `GemmaAttention`, the
    MLP our `EinsumDense` layers around the unit-scaled GeGLU
    (`functional.gelu_glu`, tanh-approximate as Gemma's).

    Args:
        attention_tau: as for `LlamaTransformerDecoder`.
        mlp_tau: as for `LlamaTransformerDecoder`.
        depth: as for `LlamaTransformerDecoder`.
        attention_options: keyword arguments of our `GemmaAttention`.
        norm_epsilons: as for `LlamaTransformerDecoder`.
        **kwargs: as for KerasHub's `GemmaDecoderBlock`.
    """

    _BRANCH_NORMS = ("pre_attention_norm", "pre_ffw_norm")

    def __init__(self, *args, attention_tau=1.0, mlp_tau=1.0, depth=1, attention_options=None, norm_epsilons=None,
                 **kwargs):
        self._init_block(attention_tau, mlp_tau, depth, attention_options, norm_epsilons)
        # KerasHub's block makes its sublayers in its constructor.
        attention = unit_initialised(GemmaAttention, **self.attention_options)
        projection = critical_if_named(L.EinsumDense, "ffw_linear")
        init = with_names(gemma_decoder_block.GemmaDecoderBlock.__init__, CachedGemmaAttention=attention,
                          RMSNormalization=L.RMSNormalization,
                          keras=keras_with_ours(EinsumDense=projection, Dropout=L.Dropout))
        init(self, *args, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        self._declare_depth()

    def call(self, x, padding_mask=None, cache=None, cache_update_index=0):
        branch, skip = U.residual_split(x, self.attention_tau)
        normalized = self.pre_attention_norm(branch)
        attention_mask = self._compute_attention_mask(normalized, padding_mask, cache, cache_update_index)
        attention = self.attention(normalized, attention_mask=attention_mask, cache=cache,
                                   cache_update_index=cache_update_index)
        if cache is not None:
            attention, cache = attention
        if self.use_post_attention_norm:
            attention = self.post_attention_norm(attention)
        if self.dropout:
            attention = self.attention_dropout(attention)
        x = U.residual_add(attention, skip, self.attention_tau)

        branch, skip = U.residual_split(x, self.mlp_tau)
        normalized = self.pre_ffw_norm(branch)
        hidden = U.gelu_glu(self.gating_ffw_2(normalized), self.gating_ffw(normalized), approximate=True)
        output = self.ffw_linear(ops.cast(hidden, self.compute_dtype))
        if self.use_post_ffw_norm:
            output = self.post_ffw_norm(output)
        output = U.residual_add(output, skip, self.mlp_tau)
        if cache is not None:
            return output, cache
        return output
