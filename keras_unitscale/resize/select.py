"""Shrinking the width of a model that was not grown: keep the units that matter most, measured on data.

`keras_unitscale.shrink(model, width=2, data=x, units="important")` keeps,
in every width of the model, the half of its units whose removal moves the
model's outputs most on `x`, and drops the rest.

- **Widths.** A width is a set of weight axes that index the same units: a
  `Dense`'s units are its kernel's and bias's output axis and the next
  layer's input axis; a transformer's residual width runs through the
  embedding, every block and the final norm. The widths are found, not
  declared: the model is rebuilt with one layer's width argument
  (`width.WIDTH_ARGUMENTS`) doubled, and the axes that change are that
  layer's width; those that change by another size inside one layer (a
  block's MLP, `mlp_ratio` times the residual width) are a width of their own.
- **Importance** of unit `u` of a width: the RMS change of the model's
  outputs on `data`, over their RMS, when every weight entry on the width's
  axes at `u` is zero (the unit computes nothing and nothing reads it),
  one unit at a time: one forward pass per unit.
- **The smaller model** keeps each width's most important units in their
  order. A kept weight is the old one; along the axes an op sums over it is
  multiplied by the forward multipliers' ratio, so each kept unit adds what
  it added before under the smaller width's multiplier, and the dropped
  units' share is gone. A norm over a shrunk width normalises over the kept
  units only, which moves its output where the dropped ones were large.
  `resize_record` holds each width's importances and kept units, and (from
  `keras_unitscale.shrink`) the outputs' change and the loss's.
"""

import keras
import numpy as np

from keras_unitscale.resize.common import GrowthError
from keras_unitscale.resize.common import scaled_count
from keras_unitscale.resize.width import leaves
from keras_unitscale.resize.width import pairs
from keras_unitscale.resize.width import resize
from keras_unitscale.resize.width import resized_clone
from keras_unitscale.resize.width import width_owners

__all__ = ["width_groups", "unit_importance", "shrink_by_importance"]


def _top_level(model):
    """{id(leaf layer): the top-level layer that holds it}."""
    return {id(leaf): layer for layer in model.layers for leaf in layer._flatten_layers(include_self=True)}


def width_groups(model):
    """{name: [(leaf index, weight attribute, axis, gate blocks), ...]}: the weight axes that index each width's units.

    Examples:
        >>> model = keras_unitscale.models.mlp(8, width=16, depth=2)
        >>> sorted(width_groups(model))
        ['hidden0.units', 'hidden1.units']
        >>> width_groups(model)["hidden0.units"]
        [(0, 'kernel', 1, 1), (0, 'bias', 0, 1), (1, 'kernel', 0, 1)]
    """
    old_leaves = leaves(model)
    holder = _top_level(model)
    groups = {}
    for owner, argument in width_owners(model).items():
        width = owner.get_config()[argument]
        doubled = resized_clone(model, 2, "shrink", only=owner)
        for index, (old, new, table) in enumerate(pairs(model, doubled)):
            for name in table:
                before, after = getattr(old, name, None), getattr(new, name, None)
                if before is None:
                    continue
                for axis, (size, new_size) in enumerate(zip(before.shape, after.shape)):
                    if size == new_size:
                        continue
                    blocks = table[name].blocks.get(axis, 1)
                    units = size // blocks
                    # The owner's own width, or a width derived from it inside one layer (a block's MLP).
                    key = (f"{owner.name}.{argument}" if units == width
                           else f"{holder[id(old_leaves[index])].name}.{units} units")
                    groups.setdefault(key, []).append((index, name, axis, blocks))
    return groups


def _unit_entries(blocks, unit, units):
    """The indices along an axis of `blocks` gate blocks of `units` each that belong to unit(s) `unit`."""
    return np.concatenate([block * units + np.atleast_1d(unit) for block in range(blocks)])


def _outputs(model, data):
    # `predict_on_batch` runs the backend's compiled predict step: one trace, then a pass per unit.
    return np.asarray(model.predict_on_batch(data), "float64")


def unit_importance(model, groups, data):
    """{width: each unit's importance}: the outputs' RMS change over their RMS on `data` with the unit zeroed."""
    old_leaves = leaves(model)
    reference = _outputs(model, data)
    scale = float(np.sqrt(np.mean(reference**2))) or 1.0
    importance = {}
    for key, entries in groups.items():
        variables = {}
        for index, name, axis, blocks in entries:
            variables.setdefault((index, name), []).append((axis, blocks))
        saved = {where: keras.ops.convert_to_numpy(getattr(old_leaves[where[0]], where[1]).value)
                 for where in variables}
        units = {tuple(saved[where].shape[axis] // blocks for axis, blocks in axes) for where, axes in variables.items()}
        if len({n for sizes in units for n in sizes}) != 1:
            raise GrowthError(f"The axes of width '{key}' have different sizes: {sorted(units)}.")
        count = next(iter(units))[0]
        scores = []
        try:
            for unit in range(count):
                for where, axes in variables.items():
                    values = saved[where].copy()
                    for axis, blocks in axes:
                        index = [slice(None)] * values.ndim
                        index[axis] = _unit_entries(blocks, unit, count)
                        values[tuple(index)] = 0
                    getattr(old_leaves[where[0]], where[1]).assign(values)
                change = _outputs(model, data) - reference
                scores.append(float(np.sqrt(np.mean(change**2))) / scale)
        finally:  # the user's model gets its weights back, whatever happened
            for where, values in saved.items():
                getattr(old_leaves[where[0]], where[1]).assign(values)
        importance[key] = scores
    return importance


def shrink_by_importance(model, factor, data):
    """Every hidden width ÷ `factor`, keeping each width's most important units (see the module docstring).

    Returns:
        `(model, record)`: the record's "importance" and "kept" give each
        width's units' importances and the kept units.
    """
    if data is None:
        raise GrowthError("Shrinking by importance measures each unit's on a batch: give it as `data=`.")
    groups = width_groups(model)
    old_leaves = leaves(model)
    keeps = {}
    for key, ((index, name, axis, blocks), *_) in groups.items():  # checked before the passes over the data
        count = getattr(old_leaves[index], name).shape[axis] // blocks
        keeps[key] = scaled_count(count, 1.0 / factor, f"width '{key}' of {count} units", f"width={factor:g}")
    importance = unit_importance(model, groups, data)
    kept, axes_kept = {}, {}
    for key, scores in importance.items():
        count = len(scores)
        chosen = np.sort(np.argsort(-np.asarray(scores), kind="stable")[: keeps[key]])  # ties: the first
        kept[key] = chosen.tolist()
        for index, name, axis, blocks in groups[key]:
            variable = getattr(old_leaves[index], name)
            axes_kept[(id(variable), axis)] = _unit_entries(blocks, chosen, count)

    def selected_weight(old, new, axes, multipliers):
        values = keras.ops.convert_to_numpy(old.value).astype("float64")
        for axis in range(values.ndim):
            chosen = axes_kept.get((id(old), axis))
            if chosen is not None:
                values = np.take(values, chosen, axis=axis)
        if tuple(values.shape) != tuple(new.shape):
            raise GrowthError(f"'{old.path}' selects to {values.shape}, not the smaller model's {tuple(new.shape)}.")
        # The larger width's forward multiplier over the smaller's: 1 unless the weight's fan-in shrank (see `resize`).
        small, large = multipliers
        return values * (large / small)

    shrunk = resize(model, 1.0 / factor, "shrink", selected_weight)
    return shrunk, {"importance": importance, "kept": kept}
