"""Unit-scaled twins of KerasHub's generic transformer layers (`keras_hub.layers`), each one KerasHub's layer, subclassed.

`TransformerEncoder`, `TransformerDecoder` (GPT-2's block, and a user's own
decoder-only stack), `CachedMultiHeadAttention` and
`TokenAndPositionEmbedding`: built as `hub.layers` builds the model-specific
twins (KerasHub's own `build` or constructor, with the names it makes its
sublayers through bound to ours), so their attributes, variable paths and
configs are KerasHub's. `unit_scale` converts these layers wherever a
functional model uses them (`hub.converters.transformer_block`).

This module imports `keras_hub`: `keras_unitscale.hub` loads it only where
`keras_hub` is installed.
"""

import keras
from keras.src import backend as keras_backend
from keras_hub.src.layers.modeling import cached_multi_head_attention
from keras_hub.src.layers.modeling import token_and_position_embedding
from keras_hub.src.layers.modeling import transformer_decoder
from keras_hub.src.layers.modeling import transformer_encoder
from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask

from keras_unitscale import functional as U
from keras_unitscale import layers as L
from keras_unitscale.hub.layers import MLP_DENSE
from keras_unitscale.hub.layers import PositionEmbedding
from keras_unitscale.hub.layers import ReversibleEmbedding
from keras_unitscale.hub.layers import UnitScaledBlock
from keras_unitscale.hub.layers import keras_with_ours
from keras_unitscale.hub.layers import unit_initialised
from keras_unitscale.rebinding import with_names

__all__ = ["CachedMultiHeadAttention", "TransformerEncoder", "TransformerDecoder", "TokenAndPositionEmbedding"]


@keras.saving.register_keras_serializable(package="keras_unitscale")
class CachedMultiHeadAttention(L.MultiHeadAttention, cached_multi_head_attention.CachedMultiHeadAttention):
    """KerasHub's `CachedMultiHeadAttention` (the key/value cache of `generate()`) as our `MultiHeadAttention`.

    The call, and so the cache, is KerasHub's; the projections and the
    scores are our `MultiHeadAttention`'s (see there). A decoder's
    self-attention sets `rule_causal=True`: KerasHub passes the causal mask
    as a mask, whose cached rows our run-time check cannot tell are causal.
    """


class _KerasTransformerBlock(UnitScaledBlock):
    """What KerasHub's generic `TransformerEncoder` and `TransformerDecoder` twins share: pre- or post-norm joins.

    Pre-norm (`normalize_first=True`): `x → residual_add(branch(norm(x)), x,
    tau)`, each join split before its branch, `tau` from u-μP's residual
    rule. Post-norm (KerasHub's default): `x → norm(residual_add(branch(x),
    x, tau))`: the norm after each join renormalises the stream, so there is
    no depth for the rule to weigh, and `unit_scale` gives such a block
    `tau = 1` (the join's inputs weighted equally, its output at unit scale).
    The norms are our `LayerNormalization`, the MLP our `Dense` layers (its
    activation by the rule for any activation), dropout ours.
    """

    _BRANCH_NORMS = ("_self_attention_layer_norm", "_feedforward_layer_norm")

    def __init__(self, *args, attention_tau=1.0, mlp_tau=1.0, depth=1, attention_options=None, norm_epsilons=None,
                 **kwargs):
        self._init_block(attention_tau, mlp_tau, depth, attention_options, norm_epsilons)
        super().__init__(*args, **kwargs)

    def _build_with(self, keras_hub_build, shapes, names=None, **keras_layers):
        """KerasHub's `build` with our norms, MLP and dropout, `keras_layers` for the other Keras layers it makes
        and `names` for KerasHub's own."""
        build = with_names(keras_hub_build, **(names or {}), keras=keras_with_ours(
            Dense=MLP_DENSE, LayerNormalization=L.LayerNormalization, Dropout=L.Dropout, **keras_layers))
        build(self, *shapes)
        self._declare_depth()

    def _join(self, x, tau, norm, branch):
        """`x + branch(x)` as u-μP joins it, pre- or post-norm (see the class)."""
        inner, skip = U.residual_split(x, tau)
        if self.normalize_first:
            return U.residual_add(branch(norm(inner)), skip, tau)
        return norm(U.residual_add(branch(inner), skip, tau))

    def _feedforward(self, x, training):
        x = self._feedforward_output_dense(self._feedforward_intermediate_dense(x))
        return self._feedforward_dropout(x, training=training)


@keras.saving.register_keras_serializable(package="keras_unitscale")
class TransformerEncoder(_KerasTransformerBlock, transformer_encoder.TransformerEncoder):
    """KerasHub's `TransformerEncoder`, unit-scaled: pre- or post-norm, with our attention, norms and MLP.

    The joins are as `_KerasTransformerBlock` states; the attention is our
    `MultiHeadAttention` (non-causal; a padding mask, the inputs' Keras mask
    and an `attention_mask` merge as in KerasHub's layer), and
    `return_attention_scores` works as there.

    Args:
        attention_tau: the attention branch's `tau`.
        mlp_tau: the MLP branch's `tau`.
        depth: the number of blocks in the residual stack (u-μP's learning
            rate × `depth^-1/2` on the block's variables).
        attention_options: keyword arguments of our `MultiHeadAttention`
            (`mult`, `rule_key_length`).
        norm_epsilons: the two norms' epsilons (None: `layer_norm_epsilon`);
            `unit_scale` sets them in equivalent mode, where a norm meets
            its input at `r` times the original's.
        **kwargs: as for KerasHub's `TransformerEncoder`.
    """

    def build(self, inputs_shape):
        attention = unit_initialised(L.MultiHeadAttention, rule_causal=False, **self.attention_options)
        self._build_with(transformer_encoder.TransformerEncoder.build, [inputs_shape], MultiHeadAttention=attention)

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None, return_attention_scores=False):
        mask = merge_padding_and_attention_mask(inputs, padding_mask, attention_mask)
        scores = []

        def attend(x):
            out = self._self_attention_layer(query=x, value=x, attention_mask=mask, training=training,
                                             return_attention_scores=return_attention_scores)
            if return_attention_scores:
                out, attention_scores = out
                scores.append(attention_scores)
            return self._self_attention_dropout(out, training=training)

        x = self._join(inputs, self.attention_tau, self._self_attention_layer_norm, attend)
        x = self._join(x, self.mlp_tau, self._feedforward_layer_norm, lambda h: self._feedforward(h, training))
        return (x, scores[0]) if return_attention_scores else x


@keras.saving.register_keras_serializable(package="keras_unitscale")
class TransformerDecoder(_KerasTransformerBlock, transformer_decoder.TransformerDecoder):
    """KerasHub's `TransformerDecoder` (GPT-2's block), decoder-only, unit-scaled: pre- or post-norm.

    The joins are as `_KerasTransformerBlock` states; the attention is our
    `CachedMultiHeadAttention` with the causal rule, and the key/value cache
    of `generate()` passes through as in KerasHub's block.

    Args:
        attention_tau: as for `TransformerEncoder`.
        mlp_tau: as for `TransformerEncoder`.
        depth: as for `TransformerEncoder`.
        attention_options: as for `TransformerEncoder`.
        norm_epsilons: as for `TransformerEncoder`.
        **kwargs: as for KerasHub's `TransformerDecoder`.
    """

    def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
        if encoder_sequence_shape:
            raise ValueError(
                "The unit-scaled `TransformerDecoder` is decoder-only (GPT-2's block): it has no cross-attention. "
                f"Received: encoder_sequence_shape={encoder_sequence_shape}"
            )
        attention = unit_initialised(CachedMultiHeadAttention, rule_causal=True, **self.attention_options)
        self._build_with(transformer_decoder.TransformerDecoder.build, [decoder_sequence_shape, encoder_sequence_shape],
                         names={"CachedMultiHeadAttention": attention})

    def call(self, decoder_sequence, encoder_sequence=None, decoder_padding_mask=None, decoder_attention_mask=None,
             encoder_padding_mask=None, encoder_attention_mask=None, self_attention_cache=None,
             self_attention_cache_update_index=None, cross_attention_cache=None,
             cross_attention_cache_update_index=None, use_causal_mask=True, training=None):
        if encoder_sequence is not None:
            raise ValueError("The unit-scaled `TransformerDecoder` is decoder-only: it takes no `encoder_sequence`.")
        attention_mask = self._compute_self_attention_mask(
            decoder_sequence=decoder_sequence, decoder_padding_mask=decoder_padding_mask,
            decoder_attention_mask=decoder_attention_mask, use_causal_mask=use_causal_mask,
            self_attention_cache=self_attention_cache,
            self_attention_cache_update_index=self_attention_cache_update_index,
        )
        caches = []

        def attend(x):
            out = self._self_attention_layer(
                query=x, value=x, attention_mask=attention_mask, cache=self_attention_cache,
                cache_update_index=self_attention_cache_update_index, training=training,
            )
            if self_attention_cache is not None:
                out, cache = out
                caches.append(cache)
            return self._self_attention_dropout(out, training=training)

        x = self._join(decoder_sequence, self.attention_tau, self._self_attention_layer_norm, attend)
        output = self._join(x, self.mlp_tau, self._feedforward_layer_norm, lambda h: self._feedforward(h, training))
        return (output, caches[0]) if self_attention_cache is not None else output


@keras.saving.register_keras_serializable(package="keras_unitscale")
class TokenAndPositionEmbedding(token_and_position_embedding.TokenAndPositionEmbedding):
    """KerasHub's `TokenAndPositionEmbedding`, unit-scaled: our two lookups, summed by the unit-scaled `add`.

    The token rows (our `ReversibleEmbedding`) and the position rows (our
    `PositionEmbedding`) start at unit scale, and their sum is
    `ops.linear.add`'s, `(tokens + positions)/sqrt(2)`, at unit scale. The
    mask of `mask_zero=True` passes as in KerasHub's layer.

    Args: as for KerasHub's `TokenAndPositionEmbedding` (its initialiser is
    not used: our rows start at unit scale).
    """

    def __init__(self, vocabulary_size, sequence_length, embedding_dim, **kwargs):
        init = with_names(token_and_position_embedding.TokenAndPositionEmbedding.__init__,
                          ReversibleEmbedding=unit_initialised(ReversibleEmbedding),
                          PositionEmbedding=unit_initialised(PositionEmbedding))
        init(self, vocabulary_size, sequence_length, embedding_dim, **kwargs)

    def call(self, inputs, start_index=0, positions=None):
        tokens = self.token_embedding(inputs)
        outputs = U.add(tokens, self.position_embedding(tokens, start_index=start_index, positions=positions))
        # KerasHub's layer sets the token lookup's mask on the sum; Keras has no public call for it.
        mask = keras_backend.get_keras_mask(tokens)
        if mask is not None:
            keras_backend.set_keras_mask(outputs, mask)
        return outputs
