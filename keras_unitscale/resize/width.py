"""Growing and shrinking a u-μP model's width: the same function, and the same learning rate.

`keras_unitscale.grow(model, width=2)` returns a model whose every hidden
width (units, embedding and residual widths, attention heads, LSTM units)
is twice the original's, and whose outputs equal the original's on any
input. `shrink` folds a grown model back. The learning rate stays right
because u-μP reads every width from the layers: the new model's layers
declare their roles at the new widths when they build, so their forward multipliers
(`rules.mup`: `fan_in^-1/2` for a hidden kernel, `fan_in^-1` for the
readout) and the u-μP optimizers' per-weight learning-rate factors are the
new width's, and its weights are stored at unit scale as a model built at
that width starts.

How the weights are carried. New unit `u` of a width `n` grown to `n'` is a
copy of old unit `u mod n` (an LSTM's or GRU's gate blocks each grow so).
Along a weight's *output* axes (the units it produces) each new unit takes
its old unit's values, so every copy computes the same value. Along its
*contracted* axes (the units it sums over) the copies of unit `j` share its
old values: `Σ_copies W' = W · m(fan_in) / m(fan_in')`, where `m` is the
forward multiplier of the weight's role, so the sum, after the new
multiplier, is the old one's. A bias the op adds inside its output scale (a
`Dense`'s) follows its kernel's ratio.

How the copies share it (`split`):

- `"partition"` (the default): each old entry's whole sum, `W · ratio`,
  goes to one of its copies chosen at random, the others holding 0. For a
  hidden kernel grown ×k (`ratio = √k`) each entry's mean square over its
  copies is then `W²`: the weights stay at the RMS they had. Where a whole
  sum in one copy would be larger than that (a readout, whose ratio is the
  copy count), a fraction of the entries is partitioned and the rest split
  evenly, the fraction that keeps the mean square.
- `"zero_sum"`: each copy holds `W · ratio / copies` plus noise that sums
  to zero over the copies, sized so the RMS stays what it was where the
  ratio allows it (a hidden kernel grown ×k: `W/√k + ε`,
  `E[ε²] = (1 - 1/k)·E[W²]`).
- `"even"`: each copy holds `W · ratio / copies`. Units whose incoming and
  outgoing weights are the same copies get the same gradient and never part.

Under the first two the copies' outgoing weights differ, so their gradients
differ and they part when training; the function is kept (up to float
rounding) because only the copies' sum is computed with. `noise=σ` adds
`σ·RMS(W)·N(0, 1)` to the new copies' incoming weights as well: that breaks
every tie at once, and moves the outputs by about `σ` (their RMS change over
their RMS; `tests/test_resize.py` holds it within 4× of σ either way).

Folding back (`shrink`): the copies are summed along contracted axes and
averaged along output axes (equal for a model just grown; for copies that
parted in training, the mean is the one unit nearest them all), then times
the multipliers' ratio, new over old. The split and the ratio round in
float32, so `grow` then moves each old entry's smallest copy by the last
ulps the fold needs to give the old weight back exactly: a sum of floats is
exact to the ulp of its smallest term, and the partition's empty copies and
the even split's equal shares are small enough, so those splits shrink back
bit for bit. Zero-sum noise larger than an entry's share leaves no such copy
for some entries, which then come back within an ulp.

Which widths grow is data (`WIDTH_ARGUMENTS`): a `Dense`'s `units` unless
its role is "output", an `Embedding`'s `output_dim`, an LSTM's or GRU's
`units`, an attention's `num_heads` (its `key_dim` kept, so the softmax's
`1/key_dim` is unchanged). Which axes of each weight are contracted is data
too (`weight_axes`). A fractional factor duplicates some units and not
others; a norm over such a width would then see other statistics, so it is
refused there. The optimizer's state is not carried (`keras_unitscale.resize`
says why).
"""

import dataclasses
import math

import keras
import numpy as np

from keras_unitscale import layers as L
from keras_unitscale import parametrization
from keras_unitscale.resize.common import GrowthError
from keras_unitscale.resize.common import check_model
from keras_unitscale.resize.common import scaled_count

__all__ = ["grow_width", "shrink_width", "WIDTH_ARGUMENTS", "SPLITS", "weight_axes", "Axes"]

# How the copies of a summed-over unit share its weights (see the module docstring); the first is grow's default.
SPLITS = ("partition", "zero_sum", "even")


def _dense_units(layer):
    # The readout's units are the model's outputs: they keep their size.
    return None if layer.role == "output" else "units"


# Our layer classes and the config argument that holds each one's width (a
# function of the layer, for those whose width depends on its role).
WIDTH_ARGUMENTS = {
    L.Dense: _dense_units,
    L.Embedding: lambda layer: "output_dim",
    L.LSTM: lambda layer: "units",
    L.GRU: lambda layer: "units",
    L.MultiHeadAttention: lambda layer: "num_heads",
    L.TransformerBlock: lambda layer: "num_heads",
    L.RecurrentBlock: lambda layer: "units",
}

# Layers with weights but no width of their own: their weights follow the widths around them.
_FOLLOWERS = (L.LayerNormalization, L.RMSNormalization, L.EinsumDense)
_NORMS = (L.LayerNormalization, L.RMSNormalization)


@dataclasses.dataclass(frozen=True)
class Axes:
    """How one weight grows: the axes it sums over, its gate blocks, and whose ratio it takes.

    contracted: the axes the op sums over (split across copies).
    blocks: {axis: number of blocks} for axes that hold several gates of one
        width side by side (an LSTM's `4·units`).
    ratio_of: the attribute of the weight whose forward-multiplier ratio
        this one takes (a bias inside its kernel's scale), or None for its own.
    """

    contracted: tuple = ()
    blocks: dict = dataclasses.field(default_factory=dict)
    ratio_of: str | None = None


def _einsum_contracted(equation):
    inputs, output = equation.split("->")
    kernel = inputs.split(",")[1]
    return tuple(axis for axis, label in enumerate(kernel) if label not in output)


def weight_axes(layer):
    """{attribute: `Axes`} for a leaf layer's weights, or None if this module has no rule for its class.

    Examples:
        >>> weight_axes(keras_unitscale.layers.Dense(4))["kernel"].contracted
        (0,)
    """
    if isinstance(layer, L.Dense):
        return {"kernel": Axes((0,)), "bias": Axes(ratio_of="kernel")}
    if isinstance(layer, L.EinsumDense):
        return {"kernel": Axes(_einsum_contracted(layer.equation)), "bias": Axes(ratio_of="kernel")}
    if isinstance(layer, L.Embedding):
        return {"embeddings": Axes()}
    if isinstance(layer, L.LayerNormalization):
        return {"gamma": Axes(), "beta": Axes()}
    if isinstance(layer, L.RMSNormalization):
        return {"scale": Axes()}
    for cell, gates in ((L.LSTMCell, 4), (L.GRUCell, 3)):
        if isinstance(layer, cell):
            bias_axis = 1 if getattr(layer, "reset_after", False) else 0  # a reset-after GRU's bias is (2, 3·units)
            return {"kernel": Axes((0,), {1: gates}), "recurrent_kernel": Axes((0,), {1: gates}),
                    "bias": Axes((), {bias_axis: gates})}
    return None


def leaves(model):
    """The layers that own weights directly, in a fixed order (for pairing an old model's with a new one's)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if layer.weights and not any(sub.weights for sub in layer._flatten_layers(include_self=False))]


def _width_argument(layer):
    """The config argument that holds `layer`'s width, None if it has none (a readout), False if no rule knows it."""
    rule = WIDTH_ARGUMENTS.get(type(layer))
    return rule(layer) if rule else False


def width_owners(model):
    """{top-level layer: the config argument that holds its width} for the model's layers that own a width."""
    return {layer: argument for layer in model.layers if (argument := _width_argument(layer))}


def resized_clone(model, factor, what, only=None):
    """The model rebuilt with every width × `factor`, or only layer `only`'s (new weights, to be filled)."""
    check_model(model, what)

    def clone(layer):
        config = layer.get_config()
        argument = _width_argument(layer)
        if argument:
            if only is None or layer is only:
                config[argument] = scaled_count(config[argument], factor, f"{layer.name}'s {argument} of "
                                                f"{config[argument]}", f"widths × {factor:g}")
        elif argument is False and layer.weights and type(layer) not in _FOLLOWERS:
            raise GrowthError(
                f"Layer '{layer.name}' ({type(layer).__name__}) has weights but no rule to resize them: "
                f"{what} knows {sorted(c.__name__ for c in {*WIDTH_ARGUMENTS, *_FOLLOWERS})}."
            )
        return type(layer).from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    old_shapes = [tuple(t.shape) for t in model.outputs]
    new_shapes = [tuple(t.shape) for t in new.outputs]
    if old_shapes != new_shapes:
        raise GrowthError(
            f"The resized model's outputs have other shapes ({new_shapes}, from {old_shapes}): a layer that "
            "produces an output is sized by a width. Give that layer role='output' (a readout keeps its units)."
        )
    return new


def _width_map(old_size, new_size, blocks):
    """For each new index along an axis, the old index it copies (unit `u` of each block copies `u mod n`)."""
    old_n, new_n = old_size // blocks, new_size // blocks
    if old_n * blocks != old_size or new_n * blocks != new_size:
        raise GrowthError(f"An axis of {old_size} → {new_size} does not split into {blocks} gate blocks.")
    return np.concatenate([block * old_n + np.arange(new_n) % old_n for block in range(blocks)])


def _forward_multiplier(variable):
    role = parametrization.role_of(variable)
    return 1.0 if role is None else role.forward_multiplier()


def _grow_weight(old, new, axes, ratio, split, noise, rng):
    """The new weight's values from the old one's (see the module docstring)."""
    values = keras.ops.convert_to_numpy(old.value).astype("float64")
    old_shape, new_shape = values.shape, tuple(new.shape)
    if len(old_shape) != len(new_shape):
        raise GrowthError(f"'{old.path}' changes rank: {old_shape} → {new_shape}.")
    copies = np.ones(new_shape)
    grown_contracted = []
    for axis, (before, after) in enumerate(zip(old_shape, new_shape)):
        if before == after:
            continue
        index = _width_map(before, after, axes.blocks.get(axis, 1))
        values = np.take(values, index, axis=axis)
        if axis in axes.contracted:
            count = np.bincount(index, minlength=before)[index]
            shape = [1] * len(new_shape)
            shape[axis] = after
            copies = copies * count.reshape(shape)
            grown_contracted.append((axis, index, before))
    rms = math.sqrt(float(np.mean(values**2))) if values.size else 0.0
    share = ratio / copies
    values = values * share
    if grown_contracted and split == "zero_sum":
        # Noise that sums to zero over the copies of each old unit, sized so each entry's mean square is the old
        # weight's where the share is at most 1 (removing the copies' mean leaves (1 - 1/c) of the variance).
        axis, index, before = grown_contracted[0]
        count = np.bincount(index, minlength=before)
        shape = [1] * len(new_shape)
        shape[axis] = len(index)
        along = count[index].reshape(shape)
        spread = np.sqrt(np.clip(1.0 - share**2, 0.0, None) / np.where(along > 1, 1.0 - 1.0 / along, 1.0)) * rms
        eps = np.moveaxis(rng.standard_normal(new_shape) * spread * (along > 1), axis, -1)
        copies_of = np.eye(before)[index]  # (new units, old units): which old unit each copies
        mean = (eps @ copies_of / count)[..., index]  # each copy's share of its old unit's sum
        values = values + np.moveaxis(eps - mean, -1, axis)
    if grown_contracted and split == "partition":
        values = _partition(values, share, grown_contracted[0], rng)
    if noise:
        values = values + _new_copies_mask(old_shape, new_shape, axes) * noise * rms * rng.standard_normal(new_shape)
    return values


def _partition(values, share, grown_axis, rng):
    """`split="partition"`: each old entry's whole sum to one of its copies, chosen at random, the others 0.

    Done for a fraction `p` of the entries (the rest split evenly), `p` such
    that the weight's mean square stays the old one's: a copy holds `c·s·W`
    with probability `1/c` (`c` copies, share `s`), so `p·c·s² + (1 - p)·s² = 1`.
    A hidden kernel (`s = 1/√c`) is partitioned whole; a readout (`s = 1`)
    not at all.
    """
    axis, index, before = grown_axis
    count = np.bincount(index, minlength=before)
    shape = [1] * values.ndim
    shape[axis] = len(index)
    along = count[index].reshape(shape)
    rank = np.zeros(len(index), int)  # each new unit's place among its old unit's copies
    for j in range(before):
        rank[index == j] = np.arange(count[j])
    rank = rank.reshape(shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(along > 1, np.clip((1.0 - share**2) / (share**2 * (along - 1)), 0.0, 1.0), 0.0)
    # One draw per old entry, shared by its copies: which copy holds it, and whether it is partitioned.
    drawn_shape = list(values.shape)
    drawn_shape[axis] = before
    holder = np.take(np.floor(rng.random(drawn_shape) * count.reshape(shape[:axis] + [before] + shape[axis + 1:])),
                     index, axis=axis)
    partitioned = np.take(rng.random(drawn_shape), index, axis=axis) < p
    return np.where(partitioned, np.where(rank == holder, values * along, 0.0), values)


def _new_copies_mask(old_shape, new_shape, axes):
    """1 where an entry belongs to a new copy of a unit along an output axis (not the original), else 0."""
    mask = np.zeros(new_shape)
    for axis, (before, after) in enumerate(zip(old_shape, new_shape)):
        if before == after or axis in axes.contracted:
            continue
        blocks = axes.blocks.get(axis, 1)
        new_n, old_n = after // blocks, before // blocks
        is_copy = (np.arange(after) % new_n) >= old_n
        shape = [1] * len(new_shape)
        shape[axis] = after
        mask = np.maximum(mask, is_copy.reshape(shape))
    return mask


def pairs(old_model, new_model):
    """(old leaf, new leaf, `weight_axes` of it) of two models of the same layers, each leaf's rule checked."""
    old_leaves, new_leaves = leaves(old_model), leaves(new_model)
    if [type(layer) for layer in old_leaves] != [type(layer) for layer in new_leaves]:
        raise GrowthError("The resized model's layers do not line up with the original's.")
    for old, new in zip(old_leaves, new_leaves):
        table = weight_axes(old)
        if table is None:
            raise GrowthError(
                f"Layer '{old.name}' ({type(old).__name__}) has weights but no rule to resize them "
                "(`keras_unitscale.resize.weight_axes`)."
            )
        yield old, new, table


def _check_resizable(layer):
    if getattr(layer, "lora_enabled", False):
        raise GrowthError(f"Layer '{layer.name}' has LoRA enabled: merge or disable its adapters before resizing.")
    if getattr(layer, "quantization_mode", None):
        raise GrowthError(
            f"Layer '{layer.name}' is quantized ({layer.quantization_mode}): resize the float model, then quantize."
        )


def _check_norm(layer, old_layer, factor):
    """A norm over a width resized by a fraction would see other statistics: refused."""
    whole = factor if factor >= 1 else 1.0 / factor
    if isinstance(layer, _NORMS) and abs(whole - round(whole)) > 1e-9:
        raise GrowthError(
            f"Layer '{old_layer.name}' ({type(old_layer).__name__}) normalises over a width grown by {whole:g}: "
            "some units would be copied and others not, which changes its mean and variance. Grow by a whole "
            f"factor. Received: width={whole:g}"
        )


def grow_width(model, factor, split, noise, rng):
    """`model` with every hidden width × `factor` and the same function (see the module docstring)."""

    def grown_weight(old, new, axes, multipliers):
        small, large = multipliers
        values = _grow_weight(old, new, axes, small / large, split, noise, rng)
        dtype = keras.backend.standardize_dtype(new.dtype)
        if noise or dtype not in ("float32", "float64"):  # noise moves the fold: no exact way back to keep
            return values
        # The ratio `shrink` will fold with: the same division of the same multipliers.
        return _fold_back_exactly(values.astype(dtype), keras.ops.convert_to_numpy(old.value), axes, large / small)

    return resize(model, factor, "grow", grown_weight)


def resize(model, factor, what, resized_weight):
    """The model rebuilt at `factor` × its widths, each weight from `resized_weight(old, new, axes, multipliers)`.

    `multipliers`: the forward multipliers, at the smaller width and at the
    larger, of the weight (or of the kernel whose scale it is inside).
    """
    new_model = resized_clone(model, factor, what)
    for old_layer, new_layer, table in pairs(model, new_model):
        _check_resizable(old_layer)
        for name, axes in table.items():
            old, new = getattr(old_layer, name, None), getattr(new_layer, name, None)
            if old is None:
                continue
            if tuple(old.shape) != tuple(new.shape):
                _check_norm(new_layer, old_layer, factor)
            source = getattr(old_layer, axes.ratio_of or name)
            target = getattr(new_layer, axes.ratio_of or name)
            multipliers = (_forward_multiplier(source), _forward_multiplier(target))
            if factor < 1:
                multipliers = multipliers[::-1]
            new.assign(resized_weight(old, new, axes, multipliers).astype(new.dtype))
        _carry_other_weights(old_layer, new_layer, table)
    return new_model


def _carry_other_weights(old_layer, new_layer, table):
    """Weights outside the table (multipliers kept as variables, say) must not change shape: copied as they are."""
    named = {id(getattr(old_layer, name)) for name in table if getattr(old_layer, name, None) is not None}
    for old, new in zip(old_layer.weights, new_layer.weights):
        if id(old) in named:
            continue
        if tuple(old.shape) != tuple(new.shape):
            raise GrowthError(f"'{old.path}' changes shape ({tuple(old.shape)} → {tuple(new.shape)}) without a rule.")
        new.assign(old.value)


def shrink_width(model, factor):
    """Every hidden width ÷ `factor`, each unit's copies folded back into it (see `keras_unitscale.resize.shrink`)."""
    return resize(model, 1.0 / factor, "shrink", lambda old, new, axes, multipliers: _fold(
        keras.ops.convert_to_numpy(old.value), tuple(new.shape), axes, multipliers[1] / multipliers[0]))


def _fold(values, small_shape, axes, ratio):
    """A grown weight folded to `small_shape`: its copies summed along contracted axes, averaged along the others.

    The mean of the copies of a unit that parted in training is the one unit
    closest to them all; for a model just grown they are equal, and the mean
    is their value.
    """
    values = np.asarray(values, "float64")
    for axis, (after, before) in enumerate(zip(values.shape, small_shape)):
        if before == after:
            continue
        index = _width_map(before, after, axes.blocks.get(axis, 1))
        moved = np.moveaxis(values, axis, 0)
        folded = np.zeros((before,) + moved.shape[1:])
        np.add.at(folded, index, moved)
        if axis not in axes.contracted:
            folded = folded / np.bincount(index, minlength=before).reshape((before,) + (1,) * (moved.ndim - 1))
        values = np.moveaxis(folded, 0, axis)
    return values * ratio


def _copies(before, after, blocks):
    """For each old index along an axis, the new indices of its copies: (old, most copies), -1 where it has fewer."""
    index = _width_map(before, after, blocks)
    count = np.bincount(index, minlength=before)
    table = np.full((before, int(count.max())), -1)
    for j in range(before):
        found = np.flatnonzero(index == j)
        table[j, : len(found)] = found
    return table, count


def _fold_back_exactly(grown, old, axes, fold_ratio):
    """`grown` (float) nudged so that `_fold` gives `old` back bit for bit, as `shrink` folds it.

    The split and the multipliers' ratio round in float: left as they are,
    a fold gives the old weight back within an ulp or so. For each old
    entry, the copy of smallest magnitude takes the difference (an ulp or a
    few of the fold, a change the function does not see beyond float
    rounding): a sum of floats is exact to the ulp of its smallest term, so
    the fold is exact where one copy is no larger than the old weight's
    share (every copy under `split="even"`, the empty copies under
    `split="partition"`). Zero-sum noise larger than the share leaves no
    such copy for some entries: they may stay an ulp away.
    """
    target = np.asarray(old)
    tables, weight = [], np.ones(target.shape)
    for axis, (before, after) in enumerate(zip(target.shape, grown.shape)):
        table, count = _copies(before, after, axes.blocks.get(axis, 1))
        tables.append(table)
        if axis not in axes.contracted:  # the fold averages these copies: a change moves the fold by 1/count of it
            shape = [1] * target.ndim
            shape[axis] = before
            weight = weight / count.reshape(shape)
    # Every copy of every old entry (one rank per axis), and which of them is smallest.
    ranks = list(np.ndindex(*[table.shape[1] for table in tables]))
    positions = [np.broadcast_arrays(*np.ix_(*[table[:, r] for table, r in zip(tables, rank)])) for rank in ranks]
    valid = np.stack([np.all([p >= 0 for p in position], axis=0) for position in positions])
    magnitudes = np.stack([np.abs(grown[tuple(position)]) for position in positions])
    smallest = np.argmin(np.where(valid, magnitudes, np.inf), axis=0)
    for _ in range(8):
        folded = _fold(grown, target.shape, axes, fold_ratio)
        wrong = folded.astype(target.dtype) != target
        if not wrong.any():
            break
        step = (target.astype("float64") - folded) / fold_ratio / weight
        for r, position in enumerate(positions):
            chosen = wrong & (smallest == r)
            if not chosen.any():
                continue
            where = tuple(p[chosen] for p in position)
            values = grown[where]
            nudged = (values + step[chosen]).astype(target.dtype)
            # Where the difference is under half an ulp of the copy, one ulp towards it.
            towards = np.where(step[chosen] > 0, np.inf, -np.inf).astype(target.dtype)
            grown[where] = np.where(nudged == values, np.nextafter(values, towards), nudged)
    return grown
