"""The graph walk of `unit_scale`: each node of a functional graph, converted in order, with each tensor's ratio."""

import math

import keras
import numpy as np
from keras import ops

from keras_unitscale import layers as L
from keras_unitscale import parametrization as P
from keras_unitscale import rules
from keras_unitscale.convert import inside
from keras_unitscale.convert import registry
from keras_unitscale.graph import functional_graph


class TensorRatio:
    """A converted tensor's relation to the original: its value is `value` × the original's.

    `rescale(r)`, where set, multiplies it (and `value`) by `r` by changing
    the weight multipliers of the layer that produced it — only when the
    original tensor had one consumer. `grad_ratio` is the product of the
    backward-only scales of the ops it passed through (1 for true
    gradients), so that a residual join can weight its two paths' gradients
    as the true gradient does.
    """

    def __init__(self, value=1.0, rescale=None, grad_ratio=1.0):
        self.value, self.rescale, self.grad_ratio = value, rescale, grad_ratio


def unit_rms(values):
    """`values` at unit RMS, and the RMS they had (1 for all zeros)."""
    values = np.asarray(values)
    rms = float(np.sqrt(np.mean(np.square(values, dtype="float64")))) if values.size else 0.0
    if not math.isfinite(rms) or rms == 0.0:
        rms = 1.0
    return (values / rms).astype(values.dtype), rms


def copy_random_state(original, copy):
    """Gives `copy` the state of `original`'s random generators (a dropout's): the twin drops what it drops."""
    for source, target in zip(getattr(original, "_seed_generators", []), getattr(copy, "_seed_generators", [])):
        target.state.assign(ops.convert_to_numpy(source.state))


def own_weights(layer):
    return P.owned_variables(layer)


class Conversion:
    """One `unit_scale` call: the new layers, each tensor's ratio, and what could not be made exact."""

    def __init__(self, mode, residual_rule):
        self.equivalent = mode == "equivalent"
        self.residual_rule = residual_rule
        self.converted = {}  # id(original layer) -> (new layer, input ratios of its first call)
        self.out_ratios = {}  # id(original layer) -> output ratios of its first call
        self.ratios = {}  # id(converted tensor) -> TensorRatio
        self.unknown, self.notes = [], []
        self.custom = []  # (name, class) of the layers whose sublayers were converted inside their Python `call`
        self.sources = {}  # converted variable's path -> the original variable's path

    def note(self, name, why):
        if (name, why) not in self.notes:
            self.notes.append((name, why))

    # --- the graph walk ---------------------------------------------------

    def model(self, model, in_ratios, top_level=False):
        """Converts `model`; returns the new model and the `TensorRatio`s of its outputs."""
        graph = functional_graph(model)
        new_inputs = [keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=_input_name(t))
                      for t in graph.inputs]
        walk = _GraphState(self, graph, new_inputs, in_ratios or [TensorRatio() for _ in graph.inputs])
        for tensor in graph.inputs:
            walk.split_if_skip(tensor)
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                if not node.is_input and node.operation:
                    walk.convert_node(node)
        outputs = [walk.values[id(t)] for t in graph.outputs]
        if top_level:
            outputs = [self.at(value, 1.0, t._keras_history.operation.name) for t, value in zip(graph.outputs, outputs)]
        new = keras.Model(new_inputs if len(new_inputs) > 1 else new_inputs[0],
                          keras.tree.pack_sequence_as(graph._outputs_struct, outputs), name=model.name)
        if isinstance(model, keras.Sequential):
            layers = [layer for layer in new.layers if not isinstance(layer, keras.layers.InputLayer)]
            new = keras.Sequential([new_inputs[0], *layers], name=model.name)
        return new, [self.ratios[id(value)] for value in outputs]

    def taus(self, count):
        return rules.residual.residual_taus(self.residual_rule, count)

    def at(self, value, ratio, name):
        """`value` at `ratio` × the original: through its producer's multipliers, else a `Rescaling` layer."""
        current = self.ratios.get(id(value))
        if not self.equivalent or current is None or math.isclose(current.value, ratio, rel_tol=1e-6):
            return value
        if current.rescale is not None:
            current.rescale(ratio / current.value)
            current.value = ratio
            return value
        # The producer feeds other layers too, or its output is not linear in
        # its weights (our tanh is 1.59·tanh): a constant multiply, exact both ways.
        rescaled = keras.layers.Rescaling(ratio / current.value, name=f"{name}_rescale_{len(self.ratios)}")(value)
        self.ratios[id(rescaled)] = TensorRatio(ratio, None, current.grad_ratio)
        return rescaled

    def inputs_at(self, call, ratios, name):
        """`call`'s arguments with their tensors brought to `ratios` (in `node.input_tensors` order)."""
        tensors = [t for t in keras.tree.flatten((call.args, call.kwargs)) if isinstance(t, keras.KerasTensor)]
        fixed = {id(t): self.at(t, ratio, name) for t, ratio in zip(tensors, ratios)}
        args, kwargs = keras.tree.map_structure(
            lambda t: fixed.get(id(t), t) if isinstance(t, keras.KerasTensor) else t, (call.args, call.kwargs)
        )
        return call._replace(args=args, kwargs=kwargs)

    # --- one operation ----------------------------------------------------

    def apply(self, operation, call, node, graph):
        cached = self.converted.get(id(operation))
        if cached is not None:
            return self.reuse(operation, cached, call)
        # A model with a converter of its own (a KerasHub backbone) is converted whole, not walked.
        if (isinstance(operation, keras.Model) and functional_graph(operation) is not None
                and registry.converter_for(operation) is None):
            out, ratios = self.nested(operation, call)
        else:
            convert = registry.converter_for(operation)
            # This package's own layers (the FP8 simulations of `precision`, say) need no converting.
            known = type(operation).__module__.startswith("keras_unitscale")
            converted = None if convert is not None or known else inside.convert(self, operation, call)
            if converted is not None:
                out, ratios = converted
            elif convert is None:
                out, ratios = self.keep(operation, call, known=known)
            else:
                readout = isinstance(operation, (keras.layers.Dense, keras.layers.EinsumDense)) and _is_readout(
                    operation, node, graph
                )
                out, ratios = convert(self, operation, call._replace(readout=readout))
        self.out_ratios[id(operation)] = [ratio.value for ratio in ratios]
        return out, ratios

    def record(self, original, new, inputs):
        self.converted[id(original)] = (new, [ratio.value for ratio in inputs])

    def run(self, model):
        """The converted `model`: its graph walked, or, for a subclassed model, a copy converted inside."""
        if registry.converter_for(model) is not None:
            return self.whole(model)
        if functional_graph(model) is None:
            return self.subclassed(model)
        return self.model(model, None, top_level=True)[0]

    def whole(self, model):
        """A model with a converter of its own: the converter's twin, called once on inputs like the model's."""
        inputs = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=_input_name(t)), model.input
        )
        for tensor in keras.tree.flatten(inputs):
            self.ratios[id(tensor)] = TensorRatio()
        call = registry.Call([inputs], {}, [TensorRatio() for _ in keras.tree.flatten(inputs)], True)
        registry.converter_for(model)(self, model, call)
        return self.converted[id(model)][0]

    def subclassed(self, model):
        """A subclassed model: a copy whose sublayers are converted, called on inputs of its build shape."""
        inputs = inside.symbolic_inputs(model)
        for tensor in keras.tree.flatten(inputs):
            self.ratios[id(tensor)] = TensorRatio()
        # readout=True: the model's output is the output; `inside.convert` finds the dense layer that makes it.
        call = registry.Call([inputs], {}, [TensorRatio() for _ in keras.tree.flatten(inputs)], True)
        converted = inside.convert(self, model, call)
        if converted is None:
            raise ValueError(
                f"`unit_scale` found nothing to convert in the subclassed model '{model.name}': "
                + ("; ".join(why for _, why in self.notes) or "none of its layers has a unit-scaled counterpart")
            )
        return self.converted[id(model)][0]

    def reuse(self, original, cached, call):
        """A shared layer's later call: the same converted layer, so its inputs must come at the same ratios."""
        new, ratios = cached
        call = self.inputs_at(call, ratios, original.name)
        out = new(*call.args, **call.kwargs)
        grad_ratio = call.inputs[0].grad_ratio if call.inputs else 1.0
        return out, [TensorRatio(r, grad_ratio=grad_ratio) for r in self.out_ratios[id(original)]]

    def keep(self, layer, call, known=True):
        """A copy of `layer` with its weights; its floating-point inputs must come at their original scale."""
        # An op of the graph that is not a layer (a mask's `not_equal`, a `keras.ops.multiply` on symbolic
        # tensors) has no weights and no state: the same op, on its inputs at their original scale, is exact.
        is_op = not isinstance(layer, keras.layers.Layer)
        if not known and not is_op:
            self.unknown.append((layer.name, type(layer).__name__))
        call = self.inputs_at(call, [1.0] * len(call.inputs), layer.name)
        new = layer
        if not is_op:
            try:
                new = type(layer).from_config(layer.get_config())
            except (NotImplementedError, TypeError, ValueError):
                self.note(layer.name, "it has no usable config, so the converted model shares it with the original")
        out = new(*call.args, **call.kwargs)
        if new is not layer and self.equivalent and layer.weights:
            new.set_weights(layer.get_weights())
            self.add_sources(new.weights, layer.weights)
        self.record(layer, new, call.inputs)
        return out, [TensorRatio() for _ in keras.tree.flatten(out)]

    def transparent(self, layer, call):
        """A weightless layer that commutes with a positive factor: a copy, and the ratio passes through."""
        new = type(layer).from_config(layer.get_config())
        out = new(*call.args, **call.kwargs)
        self.record(layer, new, call.inputs)
        if self.equivalent:
            copy_random_state(layer, new)
        ratio = call.inputs[0]
        return out, [TensorRatio(ratio.value, ratio.rescale, ratio.grad_ratio)]

    def nested(self, model, call):
        new, out_ratios = self.model(model, call.inputs)
        self.record(model, new, call.inputs)
        return new(*call.args, **call.kwargs), out_ratios

    def residual_join(self, layer, branch_value, skip_value, branch, skip, split, tau):
        """`skip + branch` as `ResidualAdd(tau)`, after `ResidualSplit` at the skip's fork."""
        # Backward, the split weights the branch's gradient tau against the
        # skip's, as the add's forward weights do; a branch whose ops scale
        # its gradient by g (attention does) needs tau/g there.
        split.tau = tau * skip.grad_ratio / branch.grad_ratio if self.equivalent else tau
        branch_ratio, stream_ratio = rules.residual.join_ratios(tau, skip.value)
        branch_value = self.at(branch_value, branch_ratio, layer.name)
        new = L.ResidualAdd(tau, name=layer.name, dtype=layer.dtype_policy)
        out = new([branch_value, skip_value])
        self.record(layer, new, [branch, skip])
        return out, [TensorRatio(stream_ratio, None, skip.grad_ratio)]

    # --- weights ----------------------------------------------------------

    def carry(self, new, originals, op_scales):
        """Sets `new`'s weights to the originals at unit RMS: weight multipliers `rms / op_scale`, fixed LR multipliers `1/rms`."""
        multipliers = {}
        for original, variable, op_scale in zip(originals, own_weights(new), op_scales):
            unit, rms = unit_rms(ops.convert_to_numpy(original))
            variable.assign(unit)
            multipliers[variable.name] = rms / op_scale
            new.set_lr_multiplier(variable.name, 1.0 / rms)
        self.add_sources(own_weights(new), originals)
        for name, value in multipliers.items():
            new.set_weight_multiplier(name, value)
        return multipliers

    def copy_as_is(self, new, original):
        """`new`'s weights, trained or not, set to `original`'s by name; the trained ones step as they did (factor 1)."""
        originals = [next(o for o in original.weights if o.name == v.name) for v in new.weights]
        for variable, source in zip(new.weights, originals):
            variable.assign(ops.convert_to_numpy(source))
            if variable.trainable and hasattr(new, "set_lr_multiplier"):
                new.set_lr_multiplier(variable.name, 1.0)
        self.add_sources(new.weights, originals)

    def add_sources(self, variables, originals):
        self.sources.update((v.path, o.path) for v, o in zip(variables, originals))

    @staticmethod
    def rescaler(new, names):
        """`rescale(r)`: multiplies the weight multipliers of `new`'s weights called `names` by `r`."""
        def rescale(ratio):
            for name in names:
                new.set_weight_multiplier(name, new.weight_multiplier(name) * ratio)
        return rescale


class _GraphState:
    """The walk over one graph: converted values and ratios by original tensor, residual forks and joins."""

    def __init__(self, conversion, graph, new_inputs, in_ratios):
        self.conversion, self.graph = conversion, graph
        self.values = {id(t): v for t, v in zip(graph.inputs, new_inputs)}
        self.ratios = {id(t): r for t, r in zip(graph.inputs, in_ratios)}
        conversion.ratios.update({id(v): r for v, r in zip(new_inputs, in_ratios)})
        self.uses = _uses(graph)
        self.residuals = _residual_adds(graph)
        self.skip_joins = {id(skip): name for _, skip, name in self.residuals.values()}
        self.taus = _branch_taus(conversion, graph, self.residuals)
        self.stream_branches = sum(len(taus) for taus in self.taus.values())
        self.splits = {}  # id(original skip tensor) -> (split layer, skip value)

    def split_if_skip(self, original):
        """A residual's skip forks from its branch here: a `ResidualSplit` weights their gradients."""
        if id(original) not in self.skip_joins:
            return
        split = L.ResidualSplit(name=f"{self.skip_joins[id(original)]}_split")
        residual_value, skip_value = split(self.values[id(original)])
        self.values[id(original)] = residual_value
        self.splits[id(original)] = (split, skip_value)
        ratio = self.ratios[id(original)]
        self.conversion.ratios[id(residual_value)] = self.conversion.ratios[id(skip_value)] = ratio

    def convert_node(self, node):
        operation = node.operation
        args, kwargs = node.arguments.fill_in(self.values)
        inputs = [self.ratios[id(t)] for t in node.input_tensors]
        if id(node) in self.residuals:
            branch, skip, _ = self.residuals[id(node)]
            split, skip_value = self.splits[id(skip)]
            outputs, out_ratios = self.conversion.residual_join(
                operation, self.values[id(branch)], skip_value, self.ratios[id(branch)],
                self.ratios[id(skip)], split, self.taus[id(node)][0],
            )
        else:
            call = registry.Call(args, kwargs, inputs, False, tuple(self.taus.get(id(node), ())), self.stream_branches)
            outputs, out_ratios = self.conversion.apply(operation, call, node, self.graph)
        for original, value, ratio in zip(node.outputs, keras.tree.flatten(outputs), out_ratios):
            if self.uses.get(id(original), 0) != 1:
                ratio.rescale = None
            self.values[id(original)], self.ratios[id(original)] = value, ratio
            self.conversion.ratios[id(value)] = ratio
            self.split_if_skip(original)


def _input_name(tensor):
    history = getattr(tensor, "_keras_history", None)
    return history.operation.name if history is not None else None


def _uses(graph):
    """How many times each original tensor is consumed (a model output counts as a use)."""
    uses = {}
    for nodes in graph._nodes_by_depth.values():
        for node in nodes:
            for tensor in node.input_tensors:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    for tensor in graph.outputs:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    return uses


def _producer_inputs(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return []
    operation, node_index, _ = history
    nodes = operation._inbound_nodes
    return list(nodes[node_index].input_tensors) if node_index < len(nodes) else []


def _is_ancestor(ancestor, tensor):
    seen, stack = set(), [tensor]
    while stack:
        current = stack.pop()
        if current is ancestor:
            return True
        if id(current) in seen:
            continue
        seen.add(id(current))
        stack.extend(_producer_inputs(current))
    return False


def _residual_adds(graph):
    """{id(node): (branch, skip, name)} for the two-input `Add`s one of whose inputs feeds the other, in graph order."""
    residuals = {}
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if type(node.operation) is not keras.layers.Add or len(node.input_tensors) != 2:
                continue
            a, b = node.input_tensors
            if _is_ancestor(a, b):
                residuals[id(node)] = (b, a, node.operation.name)
            elif _is_ancestor(b, a):
                residuals[id(node)] = (a, b, node.operation.name)
    return residuals


def _branch_taus(conversion, graph, residuals):
    """{id(node): its branches' `tau`s}: the residual `Add`s and the layers that hold branches, in graph order."""
    counts = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            count = 1 if id(node) in residuals else registry.residual_branches(node.operation)
            if count:
                counts.append((id(node), count))
    taus = iter(conversion.taus(sum(count for _, count in counts)))
    return {key: [next(taus) for _ in range(count)] for key, count in counts}


def _is_readout(layer, node, graph):
    """A dense layer whose output is a model output, or the last dense layer of a one-output model."""
    outputs = {id(t) for t in graph.outputs}
    if any(id(t) in outputs for t in node.outputs):
        return True
    if len(graph.outputs) != 1:
        return False
    dense = [n.operation for nodes in graph._nodes_by_depth.values() for n in nodes
             if isinstance(n.operation, (keras.layers.Dense, keras.layers.EinsumDense))]
    depth = {id(n.operation): d for d, nodes in graph._nodes_by_depth.items() for n in nodes}
    return bool(dense) and layer is min(dense, key=lambda op: depth[id(op)])
