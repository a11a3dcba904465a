"""Grow and shrink a trained u-μP model: the same function, and the same learning rate.

`grow(model, width=2, depth=2)` returns a model twice as wide and twice as
deep whose outputs are the original's; `shrink` goes the other way. The
base learning rate that trained the original trains the new model: u-μP
reads every width and depth from the layers, which declare them when they
build, so the new model's forward multipliers and per-weight learning-rate
factors are those of its sizes. How widths grow is in
`keras_unitscale.resize.width`, how depths grow in
`keras_unitscale.resize.depth`.

The optimizer's state is not carried: compile the new model afresh. Its
moments start at zero, as after any change of shapes, and Adam's first
steps are then as large as at the start of training.
"""

import math

import keras
import numpy as np

from keras_unitscale.resize.common import GrowthError
from keras_unitscale.resize.common import check_model
from keras_unitscale.resize.common import factor as _factor
from keras_unitscale.resize.depth import INSERTS
from keras_unitscale.resize.depth import grow_depth
from keras_unitscale.resize.depth import shrink_depth
from keras_unitscale.resize.width import SPLITS
from keras_unitscale.resize.width import WIDTH_ARGUMENTS
from keras_unitscale.resize.width import grow_width
from keras_unitscale.resize.width import shrink_width
from keras_unitscale.resize.width import weight_axes

__all__ = ["grow", "shrink", "GrowthError", "WIDTH_ARGUMENTS", "weight_axes", "SPLITS", "INSERTS"]


def grow(model, width=1, depth=1, insert="interleave", split="zero_sum", noise=0.0, seed=None):
    """A copy of `model` with its hidden widths × `width` and its residual stack × `depth`, computing the same.

    Args:
        model: a built Sequential or functional model of
            `keras_unitscale.layers` (`keras_unitscale.models` builds such).
        width: the factor on every hidden width: a whole number, or a
            fraction that gives whole widths (where no norm spans them).
        depth: the factor on the number of `TransformerBlock`s (a whole
            number of blocks); a norm must follow the stack.
        insert: where the new blocks go: "interleave" (after each old
            block), "end" (after the last), or their positions in the new stack.
        split: how the copies of a summed-over unit share its weights:
            "zero_sum" (with zero-sum noise that keeps their RMS and lets the
            copies part when training) or "even" (tied copies).
        noise: the RMS, relative to each weight's, of noise added to the new
            units' incoming weights; 0 keeps the function, σ moves the outputs
            by about σ.
        seed: the noise's seed.

    Returns:
        The grown model, built and uncompiled. Its `resize_record` holds the arguments.

    Example:

    >>> model = keras_unitscale.models.transformer_lm(vocab_size=32, width=32, depth=2, head_dim=16, seq_len=8)
    >>> grown = grow(model, width=2, depth=2)
    >>> tokens = np.random.default_rng(0).integers(0, 32, size=(2, 8))
    >>> bool(np.allclose(grown.predict(tokens, verbose=0), model.predict(tokens, verbose=0), atol=1e-5))
    True
    >>> grown.get_layer("embed").output_dim, len([l for l in grown.layers if "block" in l.name])
    (64, 4)
    """
    width, depth = _factor("width", width), _factor("depth", depth)
    if split not in SPLITS:
        raise GrowthError(f"`split` must be one of {SPLITS}. Received: split={split!r}")
    noise = float(noise)
    if not (noise >= 0 and math.isfinite(noise)):
        raise GrowthError(f"`noise` must be a number >= 0. Received: noise={noise!r}")
    if isinstance(insert, str) and insert not in INSERTS:
        raise GrowthError(f"`insert` must be one of {INSERTS} or positions in the new stack. Received: insert={insert!r}")
    check_model(model, "grow")
    grown = model
    if width != 1 or depth == 1:  # at factor 1, a copy
        grown = grow_width(grown, width, split, noise, np.random.default_rng(seed))
    if depth != 1:
        grown = grow_depth(grown, depth, insert)
    grown.resize_record = {"width": width, "depth": depth, "insert": insert, "split": split, "noise": noise}
    return grown


def shrink(model, width=1, depth=1, data=None):
    """A copy of `model` with its hidden widths ÷ `width` and its residual stack ÷ `depth`.

    Width: each unit's copies (units `u` and `u + n`, `u + 2n`, ... of a
    width `n` grown ×k) are folded into one: along the axes a weight
    produces, the first `n` units are kept; along those it sums over, each
    kept unit's weights are the sum of its copies' times the forward
    multipliers' ratio. Depth: the blocks whose branches add least to the
    stream on `data` are removed (`keras_unitscale.resize.depth`). A model
    just grown by the same factors shrinks back to the original (up to
    float32 rounding: the split is undone in float64 and stored in float32).
    A model trained since is approximated: `record["output_change"]` gives
    the RMS change of its outputs on `data` relative to their RMS.

    Args:
        model: a built Sequential or functional model of `keras_unitscale.layers`.
        width: the factor every hidden width is divided by.
        depth: the factor the number of `TransformerBlock`s is divided by.
        data: a batch of inputs: which blocks to remove is measured on it
            (needed to shrink the depth), and so is the outputs' change.

    Returns:
        The shrunk model, built and uncompiled; its `resize_record` holds
        the arguments, the blocks' contributions and removed blocks (depth),
        and the outputs' change (with `data`).

    Example:

    >>> model = keras_unitscale.models.mlp(8, width=16)
    >>> back = shrink(grow(model, width=2), width=2)
    >>> bool(np.allclose(back.get_layer("hidden1").kernel.numpy(), model.get_layer("hidden1").kernel.numpy(),
    ...                  atol=1e-6))
    True
    """
    width, depth = _factor("width", width), _factor("depth", depth)
    check_model(model, "shrink")
    shrunk, record = model, {"width": width, "depth": depth}
    if depth != 1:
        shrunk, depth_record = shrink_depth(shrunk, depth, data)
        record.update(depth_record)
    if width != 1 or depth == 1:  # at factor 1, a copy
        shrunk = shrink_width(shrunk, width)
    if data is not None:
        before = keras.ops.convert_to_numpy(model(data, training=False)).astype("float64")
        after = keras.ops.convert_to_numpy(shrunk(data, training=False)).astype("float64")
        record["output_change"] = float(np.sqrt(np.mean((after - before) ** 2)) / np.sqrt(np.mean(before**2)))
    shrunk.resize_record = record
    return shrunk
