"""`unit_scale(model)`: an existing Keras model's unit-scaled twin, in one call.

Seed 000 does it by hand: take the weights, scale them, rebuild the model
from unit-scaled layers, set the weights. `unit_scale` walks a Sequential or
functional model's graph (Keras's own nodes, nested models included) and
builds the same graph from `keras_unitscale.layers`.

`mode="equivalent"` carries the weights over. Each weight is stored at unit
RMS and its old scale, with the unit-scaled op's own constant, goes into the
layer's weight multiplier, so the model computes what it computed before.
Our ops multiply some tensors by constants the original did not (a relu's
1.71, an LSTM's output scale, a residual add's weights): the walk tracks
each tensor's *factor* (converted = factor × original) and absorbs it in
the next layer that can take it — a dense kernel's multiplier, a layer
norm's epsilon — or, where the next op needs its operands at given
factors (a residual add, a model output, a layer kept as it is), in the
multipliers of the layer that produced them; where that layer cannot take
it either (it feeds other layers too, or its output is not linear in its
weights), a `keras.layers.Rescaling` by the constant does. Each weight also gets a fixed learning-rate factor
`1/rms` (its layer's `lr_multipliers`), so `keras_unitscale.optimizers`
move the converted model along the original's Adam trajectory;
`match_epsilon` makes Adam's epsilon act as it did on the original too.

`mode="reinit"` builds the same architecture with fresh unit-scaled / u-μP
initialisation.

Residual adds — a Keras `Add` of a tensor and a branch computed from it —
become `ResidualSplit` + `ResidualAdd` with u-μP's depth rule for tau;
another `Add` of two tensors becomes the unit-scaled `Add`. The final
`Dense` becomes a readout (`role="output"`).
"""

import math
import re
import warnings

import keras
import numpy as np
from keras import ops

from keras_unitscale import analysis
from keras_unitscale import functional as U
from keras_unitscale import optimizers
from keras_unitscale import parametrization as P
from keras_unitscale import layers as L
from keras_unitscale.layers import activation as activations

__all__ = ["unit_scale", "match_epsilon", "MODES"]

MODES = ("equivalent", "reinit")

# Plain layers without weights that commute with a positive factor: kept as
# they are, and the factor passes through.
_FACTOR_TRANSPARENT = tuple(
    getattr(keras.layers, name)
    for name in (
        "Flatten", "Reshape", "Permute", "RepeatVector", "Identity", "Cropping1D", "Cropping2D",
        "ZeroPadding1D", "ZeroPadding2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "AveragePooling1D", "AveragePooling2D",
        "MaxPooling1D", "MaxPooling2D", "SpatialDropout1D",
    )
    if hasattr(keras.layers, name)
)
# An einsum that is a plain dense projection of the last axis: "ab,bc->ac", "...b,bc->...c".
_PROJECTION = re.compile(r"^(\.\.\.|[a-z]*)([a-z]),\2([a-z])->\1\3$")


def unit_scale(model, mode="equivalent", residual_rule="depth"):
    """Returns the unit-scaled twin of a Keras model; `model` is left untouched.

    Converts `Dense`, `EinsumDense` (where it is a plain projection),
    `Embedding`, `LSTM`, `MultiHeadAttention`, `LayerNormalization`,
    `RMSNormalization`, `Activation` (and activations named inside layers),
    `Dropout` and `Add`.
    Weightless layers that commute with a scale (`Flatten`, pooling, ...)
    are kept. Any other layer is kept unchanged (a copy, with its weights)
    and named in one warning.

    Args:
        model: a built `keras.Sequential` or functional `keras.Model`
            (nested ones and shared layers included).
        mode: "equivalent" (carry the weights over: the converted model's
            predictions equal the original's, and with `keras_unitscale.optimizers`
            its training follows the original's Adam trajectory, epsilon
            included after `match_epsilon`) or "reinit"
            (fresh unit-scaled initialisation; train it with u-μP's rules).
        residual_rule: tau of the residual adds: "depth" (u-μP's depth rule,
            `functional.transformer_residual_scaling_rule`, over the residual
            adds in graph order) or a number for all.

    Returns:
        A new model of the same kind. Its `unit_scale_sources` maps each
        converted variable's path to the original's. Its `unit_scale_notes` lists
        `(layer, why)` for what could not be made exactly equivalent (also
        warned): dropout inside an LSTM or attention (training rescales
        differently), an LSTM given initial states, attention over keys of
        unfixed length.

    Example:

    >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(64, activation="relu"),
    ...                           keras.layers.Dense(1, activation="sigmoid")])
    >>> twin = unit_scale(model)
    >>> x = np.random.default_rng(0).normal(size=(8, 30)).astype("float32")
    >>> bool(np.allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5))
    True
    >>> [type(layer).__name__ for layer in twin.layers], twin.layers[-1].role
    (['Dense', 'Dense'], 'output')
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if not (residual_rule == "depth" or (
        isinstance(residual_rule, (int, float)) and not isinstance(residual_rule, bool) and residual_rule >= 0
    )):
        raise ValueError(
            f"`residual_rule` must be 'depth' or a number >= 0 (tau). Received: residual_rule={residual_rule!r}"
        )
    if not isinstance(model, keras.Model) or _graph_of(model) is None:
        raise ValueError(
            "`unit_scale` converts Sequential and functional Keras models; it cannot see inside a "
            f"subclassed model's `call`. Received: a {type(model).__name__}. Build the model from "
            "`keras_unitscale.layers` instead, or convert its functional parts and call them from yours."
        )
    if not model.built:
        raise ValueError(
            f"`unit_scale` needs a built model; '{model.name}' is not. Start it with `keras.Input(shape)` "
            "or call `model.build(input_shape)`."
        )
    converter = _Converter(mode, residual_rule)
    converted, _ = converter.model(model, None, top_level=True)
    if converter.unknown:
        warnings.warn(
            "unit_scale kept these layers unchanged (no unit-scaled counterpart): "
            + ", ".join(f"'{name}' ({kind})" for name, kind in converter.unknown),
            stacklevel=2,
        )
    if converter.notes:
        warnings.warn(
            "unit_scale could not make these exactly equivalent: "
            + "; ".join(f"'{name}': {why}" for name, why in converter.notes),
            stacklevel=2,
        )
    converted.unit_scale_notes = list(converter.notes)
    # Paths, not variables: a model tracks the variables it holds in attributes.
    converted.unit_scale_sources = dict(converter.sources)
    return converted


def match_epsilon(converted, original, x, y):
    """Scales Adam's `epsilon` per weight of `converted` so that it trains exactly as `original` does.

    The learning-rate factors `unit_scale` fixes make our Adam follow the
    original's trajectory up to `epsilon`, the one term of Adam's update that
    sees a gradient's absolute scale, which unit scaling changes (that is its
    point). The converted model's gradient for each weight is a constant
    multiple `r` of the original's; `r` depends on the batch size (the
    unit-scaled ops' batch rules) and the two losses. This measures `r` on
    one batch, as the ratio of the two gradients' RMS, and sets
    `epsilon_multiplier = r` on `converted`'s optimizer. Call it once, after
    compiling both models and before training, on a batch of the training
    batch size. Weights whose gradient is zero in either model keep factor 1.

    Args:
        converted: a compiled model from `unit_scale(original, mode="equivalent")`,
            with `keras_unitscale.optimizers.Adam` or `AdamW`.
        original: the compiled model it was converted from.
        x, y: a batch of inputs and targets; each model is differentiated
            with its own compiled loss.

    Returns:
        {converted variable path: r}, for the weights it set.
    """
    sources = getattr(converted, "unit_scale_sources", None)
    if sources is None:
        raise ValueError(
            "`match_epsilon` needs a model made by `unit_scale(original)`, which records where each weight "
            f"came from. Received: converted={converted.name!r}, which has no `unit_scale_sources`."
        )
    optimizer = optimizers.unwrap(getattr(converted, "optimizer", None))
    if not isinstance(optimizer, optimizers.UnitScaledOptimizer) or optimizer.family != "adam":
        raise ValueError(
            "`match_epsilon` sets the epsilon of `keras_unitscale.optimizers.Adam` or `AdamW`: compile "
            f"`converted` with one first. Received: optimizer={type(optimizer).__name__}"
        )
    for name, model in (("converted", converted), ("original", original)):
        if getattr(model, "loss", None) is None:
            raise ValueError(f"`match_epsilon` differentiates each model's compiled loss; compile `{name}` first.")
    if not optimizer.built:
        optimizer.build(converted.trainable_variables)
    converted_grads = analysis.ScaleReporter(converted, jit_compile=False).weight_gradients(x, y)
    original_grads = dict(zip(
        (v.path for v in original.trainable_variables),
        analysis.ScaleReporter(original, jit_compile=False).weight_gradients(x, y),
    ))
    ratios = {}
    for variable, grad in zip(converted.trainable_variables, converted_grads):
        source = original_grads.get(sources.get(variable.path))
        if source is None:
            continue
        rms, source_rms = np.sqrt(np.mean(np.square(grad, dtype="float64"))), np.sqrt(
            np.mean(np.square(source, dtype="float64")))
        if rms > 0 and source_rms > 0:
            ratios[variable.path] = float(rms / source_rms)
            optimizer.set_epsilon_multiplier(variable, ratios[variable.path])
    return ratios


def _graph_of(model):
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_nodes_by_depth") and hasattr(model, "_run_through_graph") else None


def _unit(values):
    """`values` at unit RMS, and the RMS they had (1 for all zeros)."""
    values = np.asarray(values)
    rms = float(np.sqrt(np.mean(np.square(values, dtype="float64")))) if values.size else 0.0
    if not math.isfinite(rms) or rms == 0.0:
        rms = 1.0
    return (values / rms).astype(values.dtype), rms


def _activation_name(layer_activation):
    name = keras.activations.serialize(layer_activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return "linear" if name in (None, "linear") else name


def _activation_factor(name):
    """The constant our unit-scaled `name` multiplies Keras's by, or None if it is not a constant."""
    if name == "linear":
        return 1.0
    points = np.array([[-1.5, -0.25, 0.5, 2.0]], "float32")
    ours = ops.convert_to_numpy(activations.apply(points, name)).astype("float64")
    plain = ops.convert_to_numpy(keras.activations.get(name)(points)).astype("float64")
    ratio = ours[plain != 0] / plain[plain != 0]
    return float(ratio[0]) if np.allclose(ratio, ratio[0], rtol=1e-5) else None


class _Tensor:
    """A converted tensor: its value is `factor` × the original's.

    `rescale(r)`, where set, multiplies it (and its factor) by `r` by
    changing the multipliers of the layer that produced it — only when the
    original tensor had one consumer. `grad_factor` is the product of the
    backward-only scales of the ops it passed through (1 for true
    gradients), so that a residual join can weight its two paths' gradients
    as the true gradient does.
    """

    def __init__(self, factor=1.0, rescale=None, grad_factor=1.0):
        self.factor, self.rescale, self.grad_factor = factor, rescale, grad_factor


class _Converter:
    def __init__(self, mode, residual_rule):
        self.equivalent = mode == "equivalent"
        self.residual_rule = residual_rule
        self.converted = {}  # id(original layer) -> (new layer, input factors of its first call)
        self.out_factors = {}  # id(original layer) -> output factors of its first call
        self.infos = {}  # id(converted tensor) -> _Tensor
        self.unknown, self.notes = [], []
        self.sources = {}  # converted variable's path -> the original variable's path
        self._depth_rule = U.transformer_residual_scaling_rule()

    def note(self, name, why):
        if (name, why) not in self.notes:
            self.notes.append((name, why))

    # --- the graph walk ---------------------------------------------------

    def model(self, model, in_tensors, top_level=False):
        """Converts `model`; returns the new model and, for nested ones, the `_Tensor`s of its outputs."""
        graph = _graph_of(model)
        new_inputs = [keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=_input_name(t))
                      for t in graph.inputs]
        in_tensors = in_tensors or [_Tensor() for _ in graph.inputs]
        values = {id(t): v for t, v in zip(graph.inputs, new_inputs)}
        infos = {id(t): i for t, i in zip(graph.inputs, in_tensors)}
        self.infos.update({id(v): i for v, i in zip(new_inputs, in_tensors)})
        uses = _uses(graph)
        residuals = _residual_adds(graph)
        skip_joins = {id(skip): name for _, skip, name in residuals.values()}
        taus = self._taus(len(residuals))
        splits = {}  # id(original skip tensor) -> (split layer, skip value)

        def split_if_skip(original):
            # A residual's skip forks from its branch here: ResidualSplit weights their gradients.
            if id(original) in skip_joins:
                split = L.ResidualSplit(name=f"{skip_joins[id(original)]}_split")
                residual_value, skip_value = split(values[id(original)])
                values[id(original)] = residual_value
                splits[id(original)] = (split, skip_value)
                self.infos[id(residual_value)] = self.infos[id(skip_value)] = infos[id(original)]

        for tensor in graph.inputs:
            split_if_skip(tensor)
        for depth in sorted(graph._nodes_by_depth, reverse=True):
            for node in graph._nodes_by_depth[depth]:
                if node.is_input or not node.operation:
                    continue
                operation = node.operation
                args, kwargs = node.arguments.fill_in(values)
                inputs = [infos[id(t)] for t in node.input_tensors]
                if id(node) in residuals:
                    branch, skip, _ = residuals[id(node)]
                    split, skip_value = splits[id(skip)]
                    outputs, out_infos = self.residual_add(
                        operation, values[id(branch)], skip_value, infos[id(branch)], infos[id(skip)],
                        split, taus[list(residuals).index(id(node))],
                    )
                else:
                    outputs, out_infos = self.apply(operation, args, kwargs, inputs, node, graph)
                for original, value, info in zip(node.outputs, keras.tree.flatten(outputs), out_infos):
                    if uses.get(id(original), 0) != 1:
                        info.rescale = None
                    values[id(original)], infos[id(original)] = value, info
                    self.infos[id(value)] = info
                    split_if_skip(original)
        outputs = [values[id(t)] for t in graph.outputs]
        if top_level:
            outputs = [self.at(value, 1.0, t._keras_history.operation.name) for t, value in zip(graph.outputs, outputs)]
        new = keras.Model(new_inputs if len(new_inputs) > 1 else new_inputs[0],
                          keras.tree.pack_sequence_as(graph._outputs_struct, outputs), name=model.name)
        if isinstance(model, keras.Sequential):
            layers = [layer for layer in new.layers if not isinstance(layer, keras.layers.InputLayer)]
            new = keras.Sequential([new_inputs[0], *layers], name=model.name)
        return new, [self.infos[id(value)] for value in outputs]

    def _taus(self, count):
        if self.residual_rule == "depth":
            return [self._depth_rule(i, count) for i in range(count)]
        return [float(self.residual_rule)] * count

    def at(self, value, factor, name):
        """`value` at `factor` × the original: through its producer's multipliers, else a `Rescaling` layer."""
        info = self.infos.get(id(value))
        if not self.equivalent or info is None or math.isclose(info.factor, factor, rel_tol=1e-6):
            return value
        if info.rescale is not None:
            info.rescale(factor / info.factor)
            info.factor = factor
            return value
        # The producer feeds other layers too, or its output is not linear in
        # its weights (our tanh is 1.59·tanh): a constant multiply, exact both ways.
        rescaled = keras.layers.Rescaling(factor / info.factor, name=f"{name}_rescale_{len(self.infos)}")(value)
        self.infos[id(rescaled)] = _Tensor(factor, None, info.grad_factor)
        return rescaled

    def inputs_at(self, args, kwargs, factors, name):
        """`args` and `kwargs` with their tensors brought to `factors` (in `node.input_tensors` order)."""
        tensors = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
        fixed = {id(t): self.at(t, factor, name) for t, factor in zip(tensors, factors)}
        return keras.tree.map_structure(
            lambda t: fixed.get(id(t), t) if isinstance(t, keras.KerasTensor) else t, (args, kwargs)
        )

    # --- one operation ----------------------------------------------------

    def apply(self, operation, args, kwargs, inputs, node, graph):
        cached = self.converted.get(id(operation))
        if cached is not None:
            return self.reuse(operation, cached, args, kwargs, inputs)
        if isinstance(operation, keras.Model) and _graph_of(operation) is not None:
            out, out_infos = self.nested(operation, args, kwargs, inputs)
        else:
            convert = self._converter_for(operation)
            if convert is None:
                out, out_infos = self.keep(operation, args, kwargs, inputs, known=False)
            else:
                readout = isinstance(operation, (keras.layers.Dense, keras.layers.EinsumDense)) and _is_readout(
                    operation, node, graph
                )
                out, out_infos = convert(operation, args, kwargs, inputs, readout=readout)
        self.out_factors[id(operation)] = [info.factor for info in out_infos]
        return out, out_infos

    def _converter_for(self, layer):
        if isinstance(layer, keras.layers.Dense):
            return self.dense if self._activation_ok(layer) else None
        if isinstance(layer, keras.layers.EinsumDense):
            equation = _PROJECTION.match(layer.equation)
            plain = equation and layer.bias_axes in (None, "", equation.group(3)) and len(layer.kernel.shape) == 2
            return self.dense if plain and self._activation_ok(layer) else None
        if type(layer) is keras.layers.LayerNormalization and layer.get_config().get("rms_scaling"):
            return None  # Keras's deprecated variant divides by the standard deviation, without centring.
        simple = {
            keras.layers.Embedding: self.embedding,
            keras.layers.LayerNormalization: self.layer_norm,
            getattr(keras.layers, "RMSNormalization", keras.layers.LayerNormalization): self.layer_norm,
            keras.layers.Activation: self.activation,
            keras.layers.Dropout: self.dropout,
            keras.layers.Add: self.add,
        }
        for kind, convert in simple.items():
            if type(layer) is kind:
                return convert
        if type(layer) is keras.layers.LSTM and _activation_name(layer.cell.activation) == "tanh" and (
            _activation_name(layer.cell.recurrent_activation) == "sigmoid"
        ):
            return self.lstm
        if type(layer) is keras.layers.MultiHeadAttention and layer.get_config().get("attention_axes") in (
            None, (1,), [1],
        ):
            return self.attention
        if isinstance(layer, _FACTOR_TRANSPARENT):
            return self.transparent
        if type(layer).__module__.startswith("keras_unitscale"):
            return self.ours
        return None

    @staticmethod
    def _activation_ok(layer):
        name = _activation_name(layer.activation)
        return name in activations.NAMES and (name in activations.PROBABILITIES or _activation_factor(name))

    def record(self, original, new, inputs):
        self.converted[id(original)] = (new, [i.factor for i in inputs])

    def reuse(self, original, cached, args, kwargs, inputs):
        """A shared layer's later call: the same converted layer, so its inputs must come at the same factors."""
        new, factors = cached
        args, kwargs = self.inputs_at(args, kwargs, factors, original.name)
        out = new(*args, **kwargs)
        grad_factor = inputs[0].grad_factor if inputs else 1.0
        return out, [_Tensor(f, grad_factor=grad_factor) for f in self.out_factors[id(original)]]

    def keep(self, layer, args, kwargs, inputs, known=True):
        """A copy of `layer` with its weights; its floating-point inputs must come at their original scale."""
        if not known:
            self.unknown.append((layer.name, type(layer).__name__))
        args, kwargs = self.inputs_at(args, kwargs, [1.0] * len(inputs), layer.name)
        try:
            new = type(layer).from_config(layer.get_config())
        except (NotImplementedError, TypeError, ValueError):
            self.note(layer.name, "it has no usable config, so the converted model shares it with the original")
            new = layer
        out = new(*args, **kwargs)
        if new is not layer and self.equivalent and layer.weights:
            new.set_weights(layer.get_weights())
            self._sources(new.weights, layer.weights)
        self.record(layer, new, inputs)
        return out, [_Tensor() for _ in keras.tree.flatten(out)]

    def ours(self, layer, args, kwargs, inputs, readout=False):
        return self.keep(layer, args, kwargs, inputs, known=True)

    def transparent(self, layer, args, kwargs, inputs, readout=False):
        new = type(layer).from_config(layer.get_config())
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        info = inputs[0]
        return out, [_Tensor(info.factor, info.rescale, info.grad_factor)]

    def nested(self, model, args, kwargs, inputs):
        new, out_infos = self.model(model, inputs)
        self.record(model, new, inputs)
        return new(*args, **kwargs), out_infos

    # --- the conversions -------------------------------------------------

    def dense(self, layer, args, kwargs, inputs, readout=False):
        """A `Dense`, or an `EinsumDense` that is a plain projection: the same kernel and bias layout."""
        kernel, bias, units = layer.kernel, layer.bias, int(layer.kernel.shape[-1])
        name = _activation_name(layer.activation)
        new = L.Dense(
            units, activation=None if name == "linear" else name, use_bias=bias is not None,
            role="output" if readout else None, name=layer.name, dtype=layer.dtype_policy,
        )
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        if not self.equivalent:
            return out, [_Tensor()]
        fan_in = int(kernel.shape[0])
        op_scale = 1.0 / fan_in if new.role == "output" else fan_in**-0.5
        values = [kernel] + ([bias] if bias is not None else [])
        multipliers = self._carry(new, values, [op_scale * inputs[0].factor] + [op_scale] * (len(values) - 1))
        plain = new.role == "output" or name in activations.PROBABILITIES
        factor = 1.0 if plain else _activation_factor(name)
        # Linear and relu outputs scale with the multipliers; the others do not.
        rescale = self._rescaler(new, multipliers) if name in ("linear", "relu") else None
        return out, [_Tensor(factor, rescale, inputs[0].grad_factor)]

    def _carry(self, new, originals, op_scales):
        """Sets `new`'s weights to the originals at unit RMS; multipliers `rms / op_scale`, LR factors `1/rms`."""
        multipliers = {}
        for original, variable, op_scale in zip(originals, _own_weights(new), op_scales):
            unit, rms = _unit(ops.convert_to_numpy(original))
            variable.assign(unit)
            multipliers[variable.name] = rms / op_scale
            new.set_lr_multiplier(variable.name, 1.0 / rms)
        self._sources(_own_weights(new), originals)
        for name, value in multipliers.items():
            new.set_weight_multiplier(name, value)
        return multipliers

    def _sources(self, variables, originals):
        self.sources.update((v.path, o.path) for v, o in zip(variables, originals))

    @staticmethod
    def _rescaler(new, names):
        def rescale(ratio):
            for name in names:
                new.set_weight_multiplier(name, new.weight_multiplier(name) * ratio)
        return rescale

    def embedding(self, layer, args, kwargs, inputs, readout=False):
        new = L.Embedding(layer.input_dim, layer.output_dim, mask_zero=layer.mask_zero, name=layer.name,
                          dtype=layer.dtype_policy)
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        if not self.equivalent:
            return out, [_Tensor()]
        multipliers = self._carry(new, [layer.embeddings], [1.0])
        return out, [_Tensor(1.0, self._rescaler(new, multipliers))]

    def layer_norm(self, layer, args, kwargs, inputs, readout=False):
        config = layer.get_config()
        factor = inputs[0].factor if self.equivalent else 1.0
        # Normalising c·x with epsilon c²·ε is normalising x with ε.
        common = dict(axis=config["axis"], epsilon=config["epsilon"] * factor**2, name=layer.name,
                      dtype=layer.dtype_policy)
        if isinstance(layer, keras.layers.LayerNormalization):
            new = L.LayerNormalization(center=config["center"], scale=config["scale"], **common)
        else:
            new = L.RMSNormalization(**common)
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        if not self.equivalent:
            return out, [_Tensor()]
        for variable, original in zip(_own_weights(new), layer.weights):
            variable.assign(ops.convert_to_numpy(original))
            new.set_lr_multiplier(variable.name, 1.0)
        self._sources(_own_weights(new), layer.weights)
        names = [v.name for v in _own_weights(new)]
        rescale = self._rescaler(new, names) if "gamma" in names else None
        return out, [_Tensor(1.0, rescale, inputs[0].grad_factor)]

    def activation(self, layer, args, kwargs, inputs, readout=False):
        name = _activation_name(layer.activation)
        if name in activations.PROBABILITIES or name not in activations.NAMES:
            # A prediction head (probabilities), or a function we have no unit-scaled version of.
            return self.keep(layer, args, kwargs, inputs, known=name in activations.NAMES)
        factor = _activation_factor(name)
        if factor is None:
            return self.keep(layer, args, kwargs, inputs, known=False)
        new = L.Activation(name, name=layer.name, dtype=layer.dtype_policy)
        info = inputs[0]
        if name not in ("linear", "relu"):
            args, kwargs = self.inputs_at(args, kwargs, [1.0], layer.name)
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        if name in ("linear", "relu"):  # positively homogeneous: the factor passes through
            return out, [_Tensor(info.factor * factor, info.rescale, info.grad_factor)]
        return out, [_Tensor(factor, None, info.grad_factor)]

    def dropout(self, layer, args, kwargs, inputs, readout=False):
        if self.equivalent:
            # Keras's dropout, kept: ours rescales by sqrt(1 - rate) in training only.
            return self.transparent(layer, args, kwargs, inputs)
        new = L.Dropout(layer.rate, noise_shape=layer.noise_shape, seed=layer.seed, name=layer.name)
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        return out, [_Tensor()]

    def add(self, layer, args, kwargs, inputs, readout=False):
        if len(inputs) != 2:
            return self.keep(layer, args, kwargs, inputs, known=False)
        first, second = inputs
        # Both at one factor: the first's, unless only the first can be rescaled.
        target = second.factor if second.rescale is None and first.rescale is not None else first.factor
        args, kwargs = self.inputs_at(args, kwargs, [target, target], layer.name)
        if not math.isclose(first.grad_factor, second.grad_factor, rel_tol=1e-6):
            self.note(layer.name, "its two inputs' gradients are scaled differently, so training differs")
        new = L.Add(name=layer.name, dtype=layer.dtype_policy)
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        return out, [_Tensor(target * 0.5**0.5, None, first.grad_factor)]

    def residual_add(self, layer, branch_value, skip_value, branch, skip, split, tau):
        """`skip + branch` as `ResidualAdd(tau)`, after `ResidualSplit` at the skip's fork."""
        # Backward, the split weights the branch's gradient tau against the
        # skip's, as the add's forward weights do; a branch whose ops scale
        # its gradient by g (attention does) needs tau/g there.
        split.tau = tau * skip.grad_factor / branch.grad_factor if self.equivalent else tau
        weight_branch, weight_skip = tau / (1 + tau**2) ** 0.5, 1 / (1 + tau**2) ** 0.5
        branch_value = self.at(branch_value, weight_skip * skip.factor / weight_branch, layer.name)
        new = L.ResidualAdd(tau, name=layer.name, dtype=layer.dtype_policy)
        out = new([branch_value, skip_value])
        self.record(layer, new, [branch, skip])
        return out, [_Tensor(weight_skip * skip.factor, None, skip.grad_factor)]

    def lstm(self, layer, args, kwargs, inputs, readout=False):
        cell = layer.cell
        if len(inputs) > 1:
            self.note(layer.name, "it is given initial states, which are not rescaled to the unit-scaled state")
        new = L.LSTM(
            cell.units, use_bias=cell.use_bias, unit_forget_bias=cell.unit_forget_bias, dropout=cell.dropout,
            recurrent_dropout=cell.recurrent_dropout, return_sequences=layer.return_sequences,
            return_state=layer.return_state, go_backwards=layer.go_backwards, stateful=layer.stateful,
            unroll=layer.unroll, name=layer.name, dtype=layer.dtype_policy,
        )
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        hidden_scale = float(ops.convert_to_numpy(U.lstm_hidden_out(np.ones((1,), "float32"),
                                                                     new.cell.forget_bias))[0])
        factors = [hidden_scale] + ([hidden_scale, 1.0] if layer.return_state else [])
        if not self.equivalent:
            return out, [_Tensor() for _ in factors]
        if cell.dropout or cell.recurrent_dropout:
            self.note(layer.name, "its dropout rescales differently in training (predictions are equal)")
        features, units = int(cell.kernel.shape[0]), cell.units
        originals = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.use_bias else [])
        op_scales = [features**-0.5 * inputs[0].factor, units**-0.5, 1.0][: len(originals)]
        self._carry(new.cell, originals, op_scales)
        return out, [_Tensor(f) for f in factors]

    def attention(self, layer, args, kwargs, inputs, readout=False):
        config = layer.get_config()
        key_dim = config["key_dim"]
        new = L.MultiHeadAttention(
            config["num_heads"], key_dim, value_dim=config.get("value_dim"), dropout=config["dropout"],
            use_bias=config["use_bias"], output_shape=config.get("output_shape"),
            # Our logits are q·k·mult/key_dim; Keras's q·k/sqrt(key_dim).
            mult=key_dim**0.5 if self.equivalent else 1.0, name=layer.name, dtype=layer.dtype_policy,
        )
        out = new(*args, **kwargs)
        self.record(layer, new, inputs)
        if not self.equivalent:
            return out, [_Tensor() for _ in keras.tree.flatten(out)]
        if config["dropout"]:
            self.note(layer.name, "its attention dropout rescales differently in training (predictions are equal)")
        query_value = args[0]
        value_value = args[1] if len(args) > 1 else kwargs["value"]
        key_value = args[2] if len(args) > 2 else kwargs.get("key")
        key_value = value_value if key_value is None else key_value
        query, value, key = (self.infos[id(v)] for v in (query_value, value_value, key_value))
        key_length = key_value.shape[1]
        if key_length is None:
            self.note(layer.name, "its key length is not fixed, and our attention's output scale depends on it")
            key_length = 1
        attention_scale = U._attention_scale(key_dim, key_length, new.mult, bool(kwargs.get("use_causal_mask")), 0.0)
        parts = [("query", query), ("key", key), ("value", value)]
        originals, op_scales = [], []
        sublayers = {"query": layer._query_dense, "key": layer._key_dense, "value": layer._value_dense}
        for part, info in parts:
            dense = sublayers[part]
            fan_in = int(dense.kernel.shape[0])
            originals += [dense.kernel] + ([dense.bias] if config["use_bias"] else [])
            op_scales += [fan_in**-0.5 * info.factor] + ([fan_in**-0.5] if config["use_bias"] else [])
        output = layer._output_dense
        fan_in = int(np.prod(output.kernel.shape[:-1]))
        originals += [output.kernel] + ([output.bias] if config["use_bias"] else [])
        op_scales += [fan_in**-0.5 * attention_scale] + ([fan_in**-0.5] if config["use_bias"] else [])
        self._carry(new, originals, op_scales)
        output_names = ["output_kernel"] + (["output_bias"] if config["use_bias"] else [])
        tensors = [_Tensor(1.0, self._rescaler(new, output_names), query.grad_factor)]
        return out, tensors + [_Tensor() for _ in keras.tree.flatten(out)[1:]]


def _own_weights(layer):
    return P.owned_variables(layer)


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
    """{id(node): (branch, skip, name)} for the two-input `Add`s one of whose inputs feeds the other."""
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
