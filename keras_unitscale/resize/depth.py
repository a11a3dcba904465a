"""Growing and shrinking a residual stack's depth: u-μP's depth rule at the new depth, the function kept.

A stack of residual blocks (`TransformerBlock`s, two branches each, or
`RecurrentBlock`s, one) joins each branch `f` to the stream as
`x ← a·f(x) + b·x`, with `(a, b) = rules.residual.branch_weights(tau)` and
each branch's `tau` given by u-μP's depth rule for its index in the stack
(`rules.residual.transformer_residual_scaling_rule`): a deeper stack gives
every branch a smaller `tau`. Every branch starts with a norm and ends with
a linear projection. Going from N blocks to N':

- an inserted block's branches add nothing at first: their output
  projections (attention's and the MLP's, or the recurrent block's) start
  at zero;
- every block takes its new index and the depth N', so its `tau` and u-μP's
  `depth^-1/2` learning-rate factor are those of the new depth;
- the stream then reaches each kept branch at `c` times its old value, `c`
  tracked branch by branch: a kept branch multiplies it by `b'/b`, an
  inserted one by `b'`, a removed one divides it by `b`. A pre-norm branch
  sees `norm(c·x)`, which is `norm(x)` when the norm's epsilon is `c²·ε`
  (the block's `norm_epsilon`). Its output is multiplied by
  `γ = c_after·a/a'` through its output projection's weight multiplier
  (the stored weights stay as they were, at unit scale), so the stream
  after it is `c_after` times the old one. The norm after the stack (one
  must follow it) takes `c_end²·ε`, and the outputs are the old ones.

Growing ×k with the new blocks interleaved gives every kept branch
`γ = √k`: its `tau` fell by about √k.

A stack of plain LSTMs or GRUs cannot deepen so: a new one cannot compute
the identity (its gates bound it), and there is no residual join in which
one could add nothing. A recurrent language model that should grow deeper
is built of `RecurrentBlock`s (`models.lstm_lm(residual=True)`).

A stack of hidden `Dense` layers (an MLP, with no residual joins and no
depth rule) deepens by layers that start as the identity on what reaches
them: after a ReLU layer, a ReLU layer whose kernel is the identity over
its measured response (its op's and activation's scales divided out), or
with no activation, any input. Other activations cannot start as the
identity, and are refused.

Shrinking removes the blocks whose branches add least to the stream on a
batch the caller gives (a plain layer: the RMS of `layer(x) - x` over the
RMS of `layer(x)`): the RMS of `block(x) - (Π b)·x` over the RMS of
`block(x)`, with `Π b` the product of the block's skip weights: the part of
a block's output its branches put there. A block just inserted adds
nothing, so a grown model shrinks back to the original; otherwise the
removed branches are dropped as if they had added nothing, and the record
says how far the outputs moved.
"""

import dataclasses
import math

import keras
import numpy as np

from keras_unitscale import layers as L
from keras_unitscale import rules
from keras_unitscale.layers import activation as activations
from keras_unitscale.resize.common import GrowthError
from keras_unitscale.resize.common import scaled_count

__all__ = ["grow_depth", "shrink_depth", "INSERTS"]

INSERTS = ("interleave", "end")
_NORMS = (L.LayerNormalization, L.RMSNormalization)
_RESIDUAL_BLOCKS = (L.TransformerBlock, L.RecurrentBlock)


@dataclasses.dataclass(frozen=True)
class _Branch:
    """A residual branch of a block: its `tau`, its norm, and its output projection (with its multipliers' path)."""

    tau: float
    norm: keras.layers.Layer
    projection: keras.layers.Layer
    path: str  # the projection's path within the block, as the block's `weight_multipliers` keys start


def _branches(block):
    """The block's residual branches, in the order its `branch_taus` gives their `tau`s."""
    if isinstance(block, L.TransformerBlock):
        return [_Branch(block.attention_tau, block.attention_norm, block.attention._output_dense,
                        "attention/attention_output"),
                _Branch(block.mlp_tau, block.mlp_norm, block.mlp_down, "mlp_down")]
    return [_Branch(block.tau, block.pre_norm, block.projection, "projection")]


def _chain(model):
    """The model's layers after its input when each takes the previous one's output (a chain), else None."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        nodes = layer._inbound_nodes
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1 or nodes[0].input_tensors[0] is not previous:
            return None
        previous = nodes[0].output_tensors[0]
    return layers if previous is model.outputs[0] else None


def _stack(model, what):
    """The chain of layers and the positions of its stack, checked: residual blocks, else hidden Dense layers."""
    chain = _chain(model)
    if chain is None:
        raise GrowthError(
            f"{what} of the depth takes a model whose layers form one chain, each taking the one before's output "
            f"(as `keras_unitscale.models.transformer_lm` and `mlp` do). Received: '{model.name}', which branches."
        )
    names = [layer.name for layer in chain]
    positions = [i for i, layer in enumerate(chain) if _is_residual(layer)]
    if not positions:
        positions = [i for i, layer in enumerate(chain) if isinstance(layer, L.Dense) and layer.role != "output"]
        if not positions:
            recurrent = [layer.name for layer in chain if isinstance(layer, (L.LSTM, L.GRU))]
            why = (f" An LSTM or GRU ({recurrent}) cannot compute the identity, so a stack of them cannot deepen "
                   "with its function kept: build it of `layers.RecurrentBlock`s (residual, each with a "
                   "projection that can start at zero), as `models.lstm_lm(residual=True)` does." if recurrent
                   else "")
            raise GrowthError(
                f"{what} of the depth needs a stack of residual blocks (TransformerBlock, RecurrentBlock) or of "
                f"hidden Dense layers.{why} Received layers: {names}"
            )
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise GrowthError(f"The stack's layers must follow one another. Received layers: {names}")
    kinds = {type(chain[i]).__name__ for i in positions}
    if len(kinds) > 1:
        raise GrowthError(f"The stack's blocks must be of one class. Received: {sorted(kinds)} in layers {names}")
    after = positions[-1] + 1
    if _is_residual(chain[positions[0]]) and (after == len(chain) or not isinstance(chain[after], _NORMS)):
        raise GrowthError(
            "A norm must follow the stack: it takes the stream's change of scale (see `keras_unitscale.resize.depth`). "
            f"Received layers: {names}"
        )
    return chain, positions


def _is_residual(layer):
    return isinstance(layer, _RESIDUAL_BLOCKS)


def _output_keys(branch):
    """The block's multiplier keys of a branch's output projection (its kernel, and its bias if any)."""
    return [f"{branch.path}/{variable.name}" for variable in branch.projection.weights]


def _plan_configs(entries, depth, taken):
    """The new blocks' configs from `entries` ("keep" | "insert" | "drop", block), and the stream's final scale.

    See the module docstring for `c`, `γ` and the norms' epsilons. `taken`:
    the model's layer names, which an inserted block's name must avoid.
    """
    scale, configs, index, taken = 1.0, [], 0, set(taken)
    for kind, block in entries:
        if not _is_residual(block):  # a plain layer: kept as it is, or inserted as the identity
            if kind != "drop":
                configs.append((kind, block, _inserted_config(block, index, taken) if kind == "insert"
                                else block.get_config()))
                index += 1
            continue
        branches = _branches(block)
        if kind == "drop":
            for branch in branches:
                scale /= rules.residual.branch_weights(branch.tau)[1]
            continue
        config = block.get_config()
        new_taus = block.branch_taus(index, depth)
        if kind == "insert":
            for tau in new_taus:
                scale *= rules.residual.branch_weights(tau)[1]
            config = _inserted_config(block, index, taken)
            config.update(norm_epsilon=None)
        else:
            multipliers, epsilons = dict(config["weight_multipliers"]), []
            for branch, new_tau in zip(branches, new_taus):
                (a, b), (a_new, b_new) = (rules.residual.branch_weights(t) for t in (branch.tau, new_tau))
                epsilons.append(_stored(branch.norm.epsilon * scale**2))
                scale *= b_new / b
                for key in _output_keys(branch):
                    multipliers[key] = _stored(multipliers.get(key, 1.0) * scale * a / a_new)
                    if multipliers[key] == 1.0:  # a multiplier of 1 is none (and a round trip leaves none)
                        del multipliers[key]
            defaults = [type(branch.norm)().epsilon for branch in branches]
            # A block of one branch takes one epsilon; a TransformerBlock takes a pair.
            config.update(weight_multipliers=multipliers,
                          norm_epsilon=None if epsilons == defaults else epsilons if len(epsilons) > 1 else epsilons[0])
        config.update(index=index, depth=depth)
        configs.append((kind, block, config))
        index += 1
    return configs, scale


def _stored(value):
    """A multiplier or epsilon as the config stores it: a short decimal where it is one up to float64 rounding.

    A round trip multiplies by `c` and then by `1/c`; in float64 that can end
    an ulp or two from where it started (1.0000000000000002 for 1). A value
    within 1e-14 (relative) of a 12-digit decimal is stored as that decimal,
    so the round trip gives back the number it started from; no float32
    computation can tell the two apart.
    """
    short = float(f"{value:.12g}")
    return short if abs(short - value) <= 1e-14 * abs(value) else value


def _inserted_config(template, index, taken):
    """An inserted layer's config: the layer before it's, a new name (added to `taken`), no multipliers.

    A fixed learning-rate factor (set where `unit_scale` moved a weight to
    unit scale) belongs to the template's weights, not to a layer born in u-μP.
    """
    name = f"{template.name}_grown{index}"
    while name in taken:
        name += "_"
    taken.add(name)
    config = {**template.get_config(), "name": name, "weight_multipliers": {}}
    if "lr_multipliers" in config:
        config["lr_multipliers"] = {}
    return config


def _start_inserted(layer):
    """An inserted layer computes what leaves its input as it is (see the module docstring)."""
    if _is_residual(layer):  # its branches add nothing
        for branch in _branches(layer):
            for variable in branch.projection.weights:
                variable.assign(np.zeros(tuple(variable.shape), variable.dtype))
        return
    # A hidden Dense: the identity on what reaches it. Its response to the identity kernel (the op's and the
    # activation's scales, whatever their rules) is measured once, then divided out.
    width = layer.units
    if layer.bias is not None:
        layer.bias.assign(np.zeros((width,), layer.bias.dtype))
    layer.kernel.assign(np.eye(width, dtype=layer.kernel.dtype))
    response = float(keras.ops.convert_to_numpy(layer(np.ones((1, width), "float32")))[0, 0])
    layer.kernel.assign(np.eye(width, dtype=layer.kernel.dtype) / response)


def _rebuild(model, chain, positions, configs, scale):
    """The chain with the new stack (kept layers' weights carried, inserted ones started as in `_start_inserted`)."""
    pairs = []
    for i, layer in enumerate(chain):
        if i == positions[0]:
            pairs += [(block if kind == "keep" else None, type(block).from_config(config))
                      for kind, block, config in configs]
        elif i not in positions:
            config = layer.get_config()
            if i == positions[-1] + 1 and _is_residual(chain[positions[0]]):
                config["epsilon"] = _stored(config["epsilon"] * scale**2)
            pairs.append((layer, type(layer).from_config(config)))
    source = model.inputs[0]
    # A functional model's input keeps its name (a Sequential's is not one of its layers).
    name = None if isinstance(model, keras.Sequential) else source.name
    inputs = keras.Input(batch_shape=tuple(source.shape), dtype=source.dtype, name=name)
    layers = [new for _, new in pairs]
    if isinstance(model, keras.Sequential):
        new_model = keras.Sequential([inputs, *layers], name=model.name)
    else:
        x = inputs
        for layer in layers:
            x = layer(x)
        new_model = keras.Model(inputs, x, name=model.name)
    for old, new in pairs:
        if old is None:
            _start_inserted(new)
        else:
            for old_variable, new_variable in zip(old.weights, new.weights):
                new_variable.assign(old_variable.value)
    return new_model


def _insert_positions(old, new, insert):
    """The new stack's positions of the inserted blocks."""
    if insert == "interleave":
        kept = {i * new // old for i in range(old)}
        return [j for j in range(new) if j not in kept]
    if insert == "end":
        return list(range(old, new))
    positions = sorted(set(int(j) for j in insert))
    if len(positions) != new - old or len(list(insert)) != len(positions) or not all(0 <= j < new for j in positions):
        raise GrowthError(
            f"`insert` must be one of {INSERTS} or {new - old} distinct positions in the new stack of {new} blocks. "
            f"Received: insert={insert!r}"
        )
    return positions


def grow_depth(model, factor, insert):
    """`model` with its stack of N blocks grown to `factor`·N, the function kept (see the module docstring)."""
    chain, positions = _stack(model, "Growth")
    blocks = [chain[i] for i in positions]
    depth = scaled_count(len(blocks), factor, f"grow: {len(blocks)} blocks", f"depth={factor:g}")
    inserted = set(_insert_positions(len(blocks), depth, insert))
    entries, kept, template = [], iter(blocks), None
    for j in range(depth):
        if j in inserted:
            entries.append(("insert", _insertable(template or blocks[0], template is not None)))
        else:
            template = next(kept)
            entries.append(("keep", template))
    configs, scale = _plan_configs(entries, depth, [layer.name for layer in chain])
    return _rebuild(model, chain, positions, configs, scale)


# A hidden Dense can start as the identity on what reaches it: any input with no activation, or, with a ReLU,
# the non-negative outputs of the ReLU layer it follows.
_IDENTITY_ACTIVATIONS = ("linear", "relu")


def _insertable(template, after_it):
    """The layer an inserted one copies, checked: a plain layer is inserted after it, as the identity."""
    if _is_residual(template):
        return template
    if not after_it:
        raise GrowthError(
            "A new Dense layer goes after an old one, as the identity on that layer's outputs: position 0 of a "
            f"plain stack is taken. Received: a new layer before '{template.name}'"
        )
    name = activations.resolve(template.activation)
    if name not in _IDENTITY_ACTIVATIONS:
        raise GrowthError(
            f"Layer '{template.name}' has the activation {name!r}: a layer after it cannot start as the identity on "
            f"its outputs (that takes one of {_IDENTITY_ACTIVATIONS}), so its stack cannot deepen with its function kept."
        )
    return template


def _rms(x):
    return float(np.sqrt(np.mean(np.square(keras.ops.convert_to_numpy(x).astype("float64")))))


def block_contributions(chain, positions, data):
    """Each block's share of its output that its branches add, on `data` (see the module docstring)."""
    x = data
    for layer in chain[: positions[0]]:
        x = layer(x, training=False)
    shares = []
    for i in positions:
        block = chain[i]
        y = block(x, training=False)
        if _is_residual(block):
            skip = math.prod(rules.residual.branch_weights(branch.tau)[1] for branch in _branches(block))
            shares.append(_rms(y - skip * x) / _rms(y))
        else:  # a plain layer adds what it changes; one that changes the width cannot go
            shares.append(_rms(y - x) / _rms(y) if tuple(y.shape) == tuple(x.shape) else math.inf)
        x = y
    return shares


def shrink_depth(model, factor, data):
    """`model` with its stack of N blocks cut to N/`factor`, the blocks that add least removed.

    Returns:
        `(model, record)`: the record gives each block's contribution and the removed blocks' names.
    """
    chain, positions = _stack(model, "Shrinking")
    blocks = [chain[i] for i in positions]
    depth = scaled_count(len(blocks), 1.0 / factor, f"shrink: {len(blocks)} blocks", f"depth={factor:g}")
    if data is None:
        raise GrowthError("Shrinking the depth removes the blocks that add least on a batch: give it as `data=`.")
    shares = block_contributions(chain, positions, data)
    keep = set(np.argsort(shares, kind="stable")[::-1][:depth].tolist())
    removed = [block.name for i, block in enumerate(blocks) if i not in keep]
    if any(math.isinf(shares[i]) for i in range(len(blocks)) if i not in keep):
        raise GrowthError(f"Shrinking to {depth} layers would remove layers that change the width. Removed: {removed}")
    entries = [("keep" if i in keep else "drop", block) for i, block in enumerate(blocks)]
    configs, scale = _plan_configs(entries, depth, [layer.name for layer in chain])
    record = {"contributions": {block.name: share for block, share in zip(blocks, shares)},
              "removed": removed}
    return _rebuild(model, chain, positions, configs, scale), record
