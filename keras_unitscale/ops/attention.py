"""Unit-scaled dot-product attention (rule: `keras_unitscale.rules.attention`)."""

import keras
from keras import ops
from keras import random

from keras_unitscale import checks
from keras_unitscale import rules
from keras_unitscale.ops.common import check_dims_match
from keras_unitscale.ops.common import check_rank
from keras_unitscale.ops.common import dtype
from keras_unitscale.ops.common import in_float32
from keras_unitscale.ops.common import to_tensor
from keras_unitscale.scale import scale_bwd
from keras_unitscale.scale import scale_fwd
from keras_unitscale.scale import scaled
from keras_unitscale.sizes import shape as shape_of

__all__ = ["dot_product_attention"]


def dot_product_attention(query, key, value, mask=None, is_causal=False, dropout_rate=0.0, mult=1.0, training=True,
                          seed=None, return_attention_scores=False, rule_key_length=None, rule_causal=None,
                          logit_soft_cap=None):
    """Unit-scaled dot-product attention, in Keras's `(batch, seq, heads, head_dim)` layout.

    Rule (`rules.attention.attention`, the reference's, calibrated): logits
    are `mult / head_dim · q·k` (u-μP's `1/d`, not `1/sqrt(d)`, so that the
    logits do not grow as queries and keys align during training); the
    output and the gradients of `query`, `key` and `value` × `s`, with
    `s = sqrt(1 - p) / L(1 / (1 + 4·head_dim/mult²), sqrt(c / S), 1)`, where
    `S` is the key length, `c = ln S` for causal attention and 1 otherwise,
    and `p` the dropout rate. Without dropout, the fused Keras op runs.

    Args:
        query: `(batch, T, heads, head_dim)`.
        key: `(batch, S, heads, head_dim)`.
        value: `(batch, S, heads, value_dim)`.
        mask: optional boolean mask broadcastable to `(batch, heads, T, S)`;
            `True` attends.
        is_causal: apply a causal mask (and the causal scale).
        dropout_rate: dropout on the attention probabilities, in [0, 1).
        mult: the u-μP multiplier of the logits, > 0.
        training: whether dropout applies.
        seed: for the dropout, as for `keras.random.dropout`.
        return_attention_scores: also return the attention probabilities
            (runs the unfused computation).
        rule_key_length: the key length `S` of the rule's output scale
            (default: `key`'s); a fixed one keeps it one constant at every
            length, as a converted model needs.
        rule_causal: whether the rule's causal constant applies (default:
            `is_causal`); set where `mask` is causal (KerasHub's decoders').
        logit_soft_cap: logits `cap·tanh(logits/cap)` (Gemma 2's, unfused).
            The rule is the uncapped one: u-μP's logits (RMS
            `mult/sqrt(head_dim)`) lie far below the caps models use (50).

    Returns:
        `(batch, T, heads, value_dim)`; with `return_attention_scores`, a
        tuple of it and the probabilities `(batch, heads, T, S)`.

    Examples:
        >>> import numpy as np
        >>> q = np.random.default_rng(0).normal(size=(2, 8, 2, 16)).astype("float32")
        >>> tuple(dot_product_attention(q, q, q, is_causal=True).shape)
        (2, 8, 2, 16)
    """
    checks.rate("dropout_rate", dropout_rate)
    if logit_soft_cap is not None:
        checks.positive("logit_soft_cap", logit_soft_cap)
    query, key, value = _checked(query, key, value)
    rate = dropout_rate if bool(training) and dropout_rate > 0 else 0.0
    scales = rules.attention.attention(shape_of(query)[-1], shape_of(key)[1] if rule_key_length is None
                                       else rule_key_length, mult, is_causal if rule_causal is None else rule_causal,
                                       rate)
    return _attend(query, key, value, scales, mask, is_causal, rate, seed, return_attention_scores, logit_soft_cap)


def _attend(query, key, value, scales, mask, is_causal, rate, seed, return_attention_scores, logit_soft_cap):
    """The attention of `dot_product_attention`, with the rule's `scales` applied."""
    def unfused(q, k, v):
        return _attention_unfused(q, k, v, mask, is_causal, scales.logits, rate, seed, logit_soft_cap)

    if return_attention_scores:
        # The probabilities are returned: their gradient reaches query and key
        # apart from the output's, so each input's gradient is scaled on its own.
        out, probs = unfused(*(scale_bwd(t, scales.output) for t in (query, key, value)))
        return scale_fwd(out, scales.output), probs
    if rate or logit_soft_cap is not None:
        out, _ = unfused(query, key, value)
    else:
        out = ops.dot_product_attention(query, key, value, mask=mask, scale=scales.logits, is_causal=is_causal,
                                        flash_attention=_LET_BACKEND_CHOOSE_KERNEL)
    # The output is linear in `value`: one ordinary multiplication by the
    # rule's scale is the output's forward scale and the same backward scale
    # on the gradients of query, key and value, in one pass each way, not four.
    return scaled(out, scales.output, scales.output)


# On PyTorch, `flash_attention=None` makes Keras probe flash attention's
# eligibility first, which breaks a `torch.compile` graph; `False` skips the
# probe and `scaled_dot_product_attention` still picks its fused kernel itself.
# Elsewhere None lets Keras choose (cuDNN's flash attention on JAX GPUs).
_LET_BACKEND_CHOOSE_KERNEL = False if keras.backend.backend() == "torch" else None


def _checked(query, key, value):
    tensors = [to_tensor(t, name) for t, name in ((query, "query"), (key, "key"), (value, "value"))]
    for name, tensor in zip(("query", "key", "value"), tensors):
        check_rank(name, tensor, 4, 4)
    query, key, value = tensors
    check_dims_match("Head sizes", "query.shape[-1]", shape_of(query)[-1], "key.shape[-1]", shape_of(key)[-1])
    check_dims_match("Key and value lengths", "key.shape[1]", shape_of(key)[1], "value.shape[1]", shape_of(value)[1])
    return tensors


def _attention_unfused(query, key, value, mask, is_causal, logit_scale, rate, seed, soft_cap=None):
    """Attention with its probabilities exposed (and dropout on them where `rate > 0`, soft-capped logits where set)."""
    logits = ops.einsum("btnh,bsnh->bnts", query, key) * ops.cast(logit_scale, query.dtype)
    if soft_cap is not None:
        logits = ops.tanh(logits / ops.cast(soft_cap, logits.dtype)) * ops.cast(soft_cap, logits.dtype)
    if is_causal:
        # Aligned at the top left, as keras.ops.dot_product_attention does.
        causal = ops.tril(ops.ones((ops.shape(query)[1], ops.shape(key)[1]), dtype="bool"))
        mask = causal if mask is None else ops.logical_and(ops.cast(mask, "bool"), causal)
    if mask is not None:
        neg = ops.cast(-3e4 if dtype(logits) == "float16" else -1e9, logits.dtype)
        logits = ops.where(ops.cast(mask, "bool"), logits, neg)
    probs = ops.cast(ops.softmax(in_float32(logits), axis=-1), value.dtype)
    kept = random.dropout(probs, rate, seed=seed) if rate > 0 else probs
    return ops.einsum("bnts,bsnh->btnh", kept, value), probs
