"""Grow and shrink a trained u-μP model: the same function, and the same learning rate.

`grow(model, width=2, depth=2)` returns a model twice as wide and twice as
deep whose outputs are the original's; `shrink` goes the other way. The
base learning rate that trained the original trains the new model: u-μP
reads every width and depth from the layers, which declare them when they
build, so the new model's forward multipliers and per-weight learning-rate
factors are those of its sizes. How widths grow is in
`keras_unitscale.resize.width`, how depths grow in
`keras_unitscale.resize.depth`.

The optimizer's state is not carried: compile the new model afresh (its
moments start at zero, as after any change of shapes). A copy's gradient is
not its old unit's: what reaches a copied unit comes through its outgoing
weights, its share of the old unit's, and under the partition or zero-sum
split the shares differ entry by entry; and each weight's gradient scale
follows the new width's multipliers. Old moments mapped onto the copies
would size Adam's steps wrongly until they decayed (the second moment's
half-life is about 700 steps at β₂ = 0.999).
Restarted, Adam's bias correction makes its first steps the base learning
rate's, as at the start of training; `benchmarks/grow.py` measures what
the restart costs the model it grew from.
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
from keras_unitscale.resize.select import shrink_by_importance
from keras_unitscale.resize.width import SPLITS
from keras_unitscale.resize.width import WIDTH_ARGUMENTS
from keras_unitscale.resize.width import grow_width
from keras_unitscale.resize.width import shrink_width
from keras_unitscale.resize.width import weight_axes

__all__ = ["grow", "shrink", "GrowthError", "WIDTH_ARGUMENTS", "weight_axes", "SPLITS", "INSERTS", "UNITS"]


def grow(model, width=1, depth=1, insert="interleave", split="partition", noise=0.0, seed=None):
    """A copy of `model` with its hidden widths × `width` and its residual stack × `depth`, computing the same.

    Args:
        model: a built Sequential or functional model of
            `keras_unitscale.layers` (`keras_unitscale.models` builds such).
        width: the factor on every hidden width: a whole number, or a
            fraction that gives whole widths (where no norm spans them).
        depth: the factor on the number of residual blocks
            (`TransformerBlock`s or `RecurrentBlock`s; a whole number of
            blocks), a norm following the stack; or on a ReLU MLP's hidden
            layers. A stack of plain LSTMs or GRUs cannot deepen.
        insert: where the new blocks go: "interleave" (after each old
            block), "end" (after the last), or their positions in the new stack.
        split: how the copies of a summed-over unit share its weights:
            "partition" (each weight entry whole in one copy chosen at
            random, the others 0), "zero_sum" (equal shares plus zero-sum
            noise), both keeping the weights' RMS and letting the copies part
            when training, or "even" (equal shares: tied copies). "partition"
            and "even" shrink back bit for bit (`keras_unitscale.resize.width`).
        noise: the RMS, relative to each weight's, of noise added to the new
            units' incoming weights; 0 keeps the function, σ moves the outputs
            by about σ.
        seed: the noise's seed.

    Returns:
        The grown model, built and uncompiled. Its `resize_record` holds the arguments.

    Examples:
        >>> model = keras_unitscale.models.transformer_lm(vocab_size=32, width=32, depth=2, head_dim=16, seq_len=8)
        >>> grown = grow(model, width=2, depth=2)
        >>> tokens = np.random.default_rng(0).integers(0, 32, size=(2, 8))
        >>> bool(np.allclose(grown.predict(tokens, verbose=0), model.predict(tokens, verbose=0), atol=1e-5))
        True
        >>> grown.get_layer("embed").output_dim, len([l for l in grown.layers if "block" in l.name])
        (64, 4)
    """
    width, depth = _factor("width", width, "grow"), _factor("depth", depth, "grow")
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


UNITS = ("copies", "important")


def shrink(model, width=1, depth=1, data=None, units="copies"):
    """A copy of `model` with its hidden widths ÷ `width` and its residual stack ÷ `depth`.

    Width, `units="copies"` (for a grown model): each unit's copies (units
    `u`, `u + n`, `u + 2n`, ... of a width `n` grown ×k) are folded into one:
    summed along the axes a weight sums over, times the forward multipliers'
    ratio, and averaged along those it produces. A model just grown by the
    same factors with `split="partition"` or `"even"` shrinks back to the
    original bit for bit (weights, configs and outputs); with
    `split="zero_sum"`, within an ulp. On a model that was not grown, the
    fold pairs unit `u + n` with `u` whatever they learnt: a crude cut.
    `units="important"` (for any model) keeps each width's units whose
    removal moves the outputs most on `data` (`keras_unitscale.resize.select`).

    Depth: the blocks whose branches add least to the stream on `data` are
    removed (`keras_unitscale.resize.depth`).

    Args:
        model: a built Sequential or functional model of `keras_unitscale.layers`.
        width: the factor every hidden width is divided by.
        depth: the factor the number of residual blocks (or a ReLU MLP's
            hidden layers) is divided by.
        data: a batch of inputs `x`, or `(x, y)`: what shrinking the depth
            and `units="important"` measure on, and what the record's
            changes are measured on. With `y`, the model must be compiled:
            its loss before and after is recorded.
        units: "copies" or "important" (see above).

    Returns:
        The shrunk model, built and uncompiled. Its `resize_record` holds the
        arguments; with depth, the blocks' contributions and the removed
        blocks; with `units="important"`, each width's unit importances and
        kept units; with `data`, `output_change` (the RMS change of the
        outputs over their RMS) and, with `y`, `loss` (before, after).

    Examples:
        >>> model = keras_unitscale.models.mlp(8, width=16)
        >>> back = shrink(grow(model, width=2, split="partition"), width=2)
        >>> bool(np.array_equal(back.get_layer("hidden1").kernel.numpy(), model.get_layer("hidden1").kernel.numpy()))
        True
    """
    width, depth = _factor("width", width, "shrink"), _factor("depth", depth, "shrink")
    if units not in UNITS:
        raise GrowthError(f"`units` must be one of {UNITS}. Received: units={units!r}")
    check_model(model, "shrink")
    x, y = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
    loss = _loss_of(model) if y is not None else None
    shrunk, record = model, {"width": width, "depth": depth, "units": units}
    if depth != 1:
        shrunk, depth_record = shrink_depth(shrunk, depth, x)
        record.update(depth_record)
    if units == "important" and width != 1:
        shrunk, width_record = shrink_by_importance(shrunk, width, x)
        record.update(width_record)
    elif width != 1 or depth == 1:  # at factor 1, a copy
        shrunk = shrink_width(shrunk, width)
    if x is not None:
        record.update(_changes(model, shrunk, x, y, loss))
    shrunk.resize_record = record
    return shrunk


def _changes(model, shrunk, x, y, loss):
    """The outputs' RMS change over their RMS on `x`, and with `y` the loss before and after."""
    before = keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")
    after = keras.ops.convert_to_numpy(shrunk(x, training=False)).astype("float64")
    changes = {"output_change": float(np.sqrt(np.mean((after - before) ** 2)) / np.sqrt(np.mean(before**2)))}
    if loss is not None:
        changes["loss"] = tuple(float(keras.ops.convert_to_numpy(loss(y, outputs))) for outputs in (before, after))
    return changes


def _loss_of(model):
    """The compiled model's loss function, for the record's loss change."""
    loss = getattr(model, "loss", None)
    if loss is None:
        raise GrowthError(
            f"`data=(x, y)` records the loss change with the model's loss: compile '{model.name}' first, or give "
            "`data=x` for the outputs' change alone."
        )
    return keras.losses.get(loss)
