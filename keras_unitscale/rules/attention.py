"""The rule of unit-scaled dot-product attention (the reference's, calibrated)."""

import math
from typing import NamedTuple

from keras import ops

from keras_unitscale import checks
from keras_unitscale.rules.common import logarithmic_interpolation
from keras_unitscale.sizes import as_float
from keras_unitscale.sizes import is_static

__all__ = ["AttentionScales", "attention", "shared_key_value"]


class AttentionScales(NamedTuple):
    logits: float  # on q·k
    output: float  # on the output, and on the gradients of query, key and value


def _flat_rms(seq_len, is_causal):
    """The output RMS of attention with flat probabilities over `seq_len` keys of unit values."""
    if not is_causal:
        return as_float(seq_len) ** -0.5
    # Causal attention averages t values at position t: its output RMS is
    # about sqrt(ln(S) / S). One key is the exact case RMS = 1.
    if is_static(seq_len):
        return math.sqrt(math.log(seq_len) / seq_len) if seq_len > 1 else 1.0
    seq = ops.cast(seq_len, "float32")
    return ops.sqrt(ops.where(seq > 1, ops.log(seq) / seq, 1.0))


def attention(head_dim, seq_len, mult=1.0, is_causal=False, dropout_rate=0.0):
    """Logits × `mult / head_dim`; output and the q, k, v gradients × `s`.

    `s = sqrt(1 - p) / L(1 / (1 + 4·head_dim/mult²), sqrt(c / S), 1)`, with
    `S` the key length, `c = ln S` for causal attention and 1 otherwise, `p`
    the dropout rate that applies, and `L` `logarithmic_interpolation`.
    u-μP's `1/head_dim` (not `1/sqrt(head_dim)`) keeps the logits from
    growing as queries and keys align in training.

    Examples:
        >>> scales = attention(16, 64)
        >>> scales.logits, round(scales.output, 4)
        (0.0625, 7.7481)
    """
    checks.positive("mult", mult)
    checks.rate("dropout_rate", dropout_rate)
    alpha = 1.0 / (1.0 + 4.0 * head_dim / mult**2)
    output = (1.0 - dropout_rate) ** 0.5 / logarithmic_interpolation(alpha, _flat_rms(seq_len, is_causal), 1.0)
    return AttentionScales(mult / head_dim, output)


def shared_key_value(groups):
    """Grouped-query attention: the gradient of a key or value head that `groups` query heads share, × `groups^-1/2`.

    Each of the `groups` copies of a shared head brings back a gradient of
    unit scale, and they add: uncorrelated, their sum has scale
    `sqrt(groups)`, which this brings back to one.

    Examples:
        >>> shared_key_value(4)
        0.5
    """
    checks.positive_int("groups", groups)
    return groups**-0.5
