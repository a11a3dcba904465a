"""The default converters: one per Keras layer that has a unit-scaled counterpart.

Each is `fn(conversion, layer, call) -> (outputs, ratios)` (see
`keras_unitscale.convert.registry`). In equivalent mode a converter carries
the weights over at unit RMS and puts the rest of each weight's scale, over
the constant the unit-scaled op applies (read from `keras_unitscale.rules`),
into the weight's multiplier, so that the twin computes what the original
did.
"""

import math
import re

import keras

from keras_unitscale import layers as L
from keras_unitscale import rules
from keras_unitscale import weights
from keras_unitscale.convert.registry import register_converter
from keras_unitscale.convert.walk import TensorRatio
from keras_unitscale.convert.walk import own_weights
from keras_unitscale.layers import activation as activations
from keras_unitscale.ops import activations as ops_activations

# An einsum that is a plain dense projection of the last axis: "ab,bc->ac", "...b,bc->...c".
# The key length at which an equivalent twin's attention output is unit-scaled where the original fixes none (a
# sequence of any length, Llama's rotary embedding): Llama 2's training context. One fixed length makes the
# output scale one constant, so the twin computes what the original does at every length.
EQUIVALENT_KEY_LENGTH = 2048

_PROJECTION = re.compile(r"^(\.\.\.|[a-z]*)([a-z]),\2([a-z])->\1\3$")
# Activations that commute with a positive factor, f(c·x) = c·f(x): a ratio passes through them.
_HOMOGENEOUS = ("linear", "relu")


def activation_name(layer_activation):
    name = keras.activations.serialize(layer_activation)
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name"))
    return "linear" if name in (None, "linear") else name


def _activation_ratio(name, layer):
    """The constant by which our unit-scaled activation `name`, as `layer` applies it, multiplies Keras's."""
    return rules.activations.by_name(name, layer.mult, layer.constraint).output


def dense(conversion, layer, call):
    """A `Dense`, or an `EinsumDense` that is a plain projection: the same kernel and bias layout."""
    kernel, bias, units = layer.kernel, layer.bias, int(layer.kernel.shape[-1])
    name = activation_name(layer.activation)
    new = L.Dense(
        units, activation=None if name == "linear" else name, use_bias=bias is not None,
        role="output" if call.readout else None, name=layer.name, dtype=layer.dtype_policy,
    )
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio()]
    fan_in = int(kernel.shape[0])
    rule = rules.linear.readout if new.role == "output" else rules.linear.dense
    op_scale = rule(fan_in, units, constraint=new.constraint).output
    values = [kernel] + ([bias] if bias is not None else [])
    multipliers = conversion.carry(new, values, [op_scale * call.inputs[0].value] + [op_scale] * (len(values) - 1))
    plain = new.role == "output" or name in activations.PROBABILITIES
    ratio = 1.0 if plain else _activation_ratio(name, new)
    # Outputs of homogeneous activations scale with the multipliers; the others do not.
    rescale = conversion.rescaler(new, multipliers) if name in _HOMOGENEOUS else None
    return out, [TensorRatio(ratio, rescale, call.inputs[0].grad_ratio)]


# Keras's convolutions and ours, class by class (exact classes: a user's
# subclass may change the call, and is kept).
_CONVOLUTIONS = {
    getattr(keras.layers, name): getattr(L, name)
    for name in (
        "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
        "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    )
}


def convolution(conversion, layer, call):
    """Any of Keras's convolutions: ours from its config (regularisers, constraints, dtype policy kept), as `dense`."""
    ours_class = _CONVOLUTIONS[type(layer)]
    name = activation_name(layer.activation)
    config = layer.get_config()
    for key in ours_class._KERNEL_INITIALIZERS:  # unit-normal, as our layers start
        config.pop(key, None)
    config.update(activation=None if name == "linear" else name, role="output" if call.readout else None)
    new = ours_class.from_config(config)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio()]
    op_scales = new.weight_op_scales()
    op_scales[0] = op_scales[0] * call.inputs[0].value  # the first op meets the input's ratio
    multipliers = conversion.carry(new, own_weights(layer), op_scales)
    plain = new.role == "output" or name in activations.PROBABILITIES
    ratio = 1.0 if plain else _activation_ratio(name, new)
    rescale = conversion.rescaler(new, multipliers) if name in _HOMOGENEOUS else None
    return out, [TensorRatio(ratio, rescale, call.inputs[0].grad_ratio)]


def embedding(conversion, layer, call):
    new = L.Embedding(layer.input_dim, layer.output_dim, mask_zero=layer.mask_zero, name=layer.name,
                      dtype=layer.dtype_policy)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio()]
    # The lookup applies no forward scale (`rules.linear.embedding_grad` scales only the gradient).
    multipliers = conversion.carry(new, [layer.embeddings], [1.0])
    return out, [TensorRatio(1.0, conversion.rescaler(new, multipliers))]


def layer_norm(conversion, layer, call):
    config = layer.get_config()
    ratio = call.inputs[0].value if conversion.equivalent else 1.0
    # Normalising c·x with epsilon c²·ε is normalising x with ε.
    common = dict(axis=config["axis"], epsilon=config["epsilon"] * ratio**2, name=layer.name,
                  dtype=layer.dtype_policy)
    if isinstance(layer, keras.layers.LayerNormalization):
        new = L.LayerNormalization(center=config["center"], scale=config["scale"],
                                   rms_scaling=config.get("rms_scaling", False), **common)
    else:
        new = L.RMSNormalization(**common)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio()]
    conversion.copy_as_is(new, layer)
    gain = new.gamma if isinstance(new, L.LayerNormalization) else new.scale
    rescale = None if gain is None else conversion.rescaler(new, [v.name for v in own_weights(new)])
    return out, [TensorRatio(1.0, rescale, call.inputs[0].grad_ratio)]


def batch_norm(conversion, layer, call):
    """A `BatchNormalization` or `GroupNormalization`: ours from the config, the weights and statistics as they are."""
    new = getattr(L, type(layer).__name__).from_config(layer.get_config())
    call = conversion.inputs_at(call, [1.0] * len(call.inputs), layer.name)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio()]
    conversion.copy_as_is(new, layer)  # the moving statistics too
    affine = [v.name for v in (new.gamma, new.beta) if v is not None]
    return out, [TensorRatio(1.0, conversion.rescaler(new, affine) if affine else None, call.inputs[0].grad_ratio)]


def activation(conversion, layer, call):
    name = activation_name(layer.activation)
    if name in activations.PROBABILITIES or not _elementwise_rule(name):
        # A prediction head (probabilities), or a function we have no unit-scaled
        # version of, or one that acts along an axis (log_softmax, glu): its
        # output does not scale with its input, so no ratio passes through it.
        return conversion.keep(layer, call, known=name in activations.NAMES)
    new = L.Activation(name, name=layer.name, dtype=layer.dtype_policy)
    return _elementwise(conversion, layer, new, call, _activation_ratio(name, new), name in _HOMOGENEOUS)


def _elementwise(conversion, layer, new, call, ratio, homogeneous):
    """Calls `new`, which is `ratio` × `layer`'s function: the input's ratio passes through a homogeneous one."""
    source = call.inputs[0]
    if not homogeneous:
        call = conversion.inputs_at(call, [1.0], layer.name)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if conversion.equivalent and layer.weights:  # PReLU's slopes: as they were, stepped as they were
        conversion.copy_as_is(new, layer)
    if homogeneous:
        return out, [TensorRatio(source.value * ratio, source.rescale, source.grad_ratio)]
    return out, [TensorRatio(ratio, None, source.grad_ratio)]


# Keras's activation layers and ours (exact classes). Keras's `Softmax` is kept: as a layer it
# most often makes the predictions, whose values mean something.
_ACTIVATION_LAYERS = {getattr(keras.layers, name): getattr(L, name) for name in ("ReLU", "LeakyReLU", "ELU", "PReLU")}


def activation_layer(conversion, layer, call):
    """`ReLU`, `LeakyReLU`, `ELU`, `PReLU`: ours from the config, as `activation` converts an `Activation`."""
    new = _ACTIVATION_LAYERS[type(layer)].from_config(layer.get_config())
    return _elementwise(conversion, layer, new, call, new.scales().output, new.homogeneous())


def softmax_layer(conversion, layer, call):
    """Keras's `Softmax`, kept (a copy): its inputs at the original's scale."""
    return conversion.keep(layer, call, known=True)


def dropout(conversion, layer, call):
    if conversion.equivalent:
        # Keras's dropout, kept: ours rescales by sqrt(1 - rate) in training only.
        return conversion.transparent(layer, call)
    new = L.Dropout(layer.rate, noise_shape=layer.noise_shape, seed=layer.seed, name=layer.name)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    return out, [TensorRatio()]


def add(conversion, layer, call):
    if len(call.inputs) != 2:
        return conversion.keep(layer, call, known=False)
    first, second = call.inputs
    # Both at one ratio: the first's, unless only the first can be rescaled.
    target = second.value if second.rescale is None and first.rescale is not None else first.value
    call = conversion.inputs_at(call, [target, target], layer.name)
    if not math.isclose(first.grad_ratio, second.grad_ratio, rel_tol=1e-6):
        conversion.note(layer.name, "its two inputs' gradients are scaled differently, so training differs")
    new = L.Add(name=layer.name, dtype=layer.dtype_policy)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    shapes = [tuple(t.shape) for t in keras.tree.flatten(call.args) if isinstance(t, keras.KerasTensor)]
    return out, [TensorRatio(target * rules.linear.add_output(*shapes), None, first.grad_ratio)]


def _recurrent_twin(layer):
    """Our LSTM or GRU with `layer`'s settings (unbuilt), the scale of its output and of its returned states."""
    cell = layer.cell
    common = dict(
        use_bias=cell.use_bias, dropout=cell.dropout, recurrent_dropout=cell.recurrent_dropout,
        return_sequences=layer.return_sequences, return_state=layer.return_state,
        go_backwards=layer.go_backwards, stateful=layer.stateful, unroll=layer.unroll,
        zero_output_for_mask=layer.zero_output_for_mask, seed=cell.seed, use_cudnn=layer.use_cudnn,
        name=layer.name, dtype=layer.dtype_policy,
    )
    if isinstance(layer, keras.layers.LSTM):
        new = L.LSTM(cell.units, unit_forget_bias=cell.unit_forget_bias, **common)
        hidden_scale = rules.lstm.lstm_rule(new.cell.forget_bias).output_scale
        return new, hidden_scale, [hidden_scale, 1.0]  # h, and the cell state as it is
    new = L.GRU(cell.units, reset_after=cell.reset_after, **common)
    hidden_scale = rules.gru.gru_rule(cell.reset_after).output_scale
    return new, hidden_scale, [hidden_scale]


def _carry_recurrent(conversion, layer, new, input_ratio):
    """The original's weights into `new`'s cell, through the multipliers that make the same pre-activations."""
    cell = layer.cell
    if cell.dropout or cell.recurrent_dropout:
        conversion.note(layer.name, "its dropout rescales differently in training (predictions are equal)")
    if isinstance(layer, keras.layers.LSTM):
        scales = rules.lstm.weights(int(cell.kernel.shape[0]), cell.units, forget_bias=new.cell.forget_bias)
    else:
        scales = rules.gru.weights(int(cell.kernel.shape[0]), cell.units, reset_after=cell.reset_after)
    originals = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.use_bias else [])
    op_scales = [scales.kernel.forward * input_ratio, scales.recurrent_kernel.forward, scales.bias.forward]
    conversion.carry(new.cell, originals, op_scales[: len(originals)])


def _given_initial_state(call):
    return len(call.args) > 1 or call.kwargs.get("initial_state") is not None


def recurrent(conversion, layer, call):
    """An `LSTM` or a `GRU`: the same recurrence on the plain hidden state, its output times the rule's scale."""
    if _given_initial_state(call):
        conversion.note(layer.name, "it is given initial states, which are not rescaled to the unit-scaled state")
    new, hidden_scale, states = _recurrent_twin(layer)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    ratios = [hidden_scale] + (states if layer.return_state else [])
    if not conversion.equivalent:
        return out, [TensorRatio() for _ in ratios]
    _carry_recurrent(conversion, layer, new, call.inputs[0].value)
    return out, [TensorRatio(r) for r in ratios]


# How a merge mode combines two outputs at one ratio r: the merged output's ratio.
_MERGED_RATIO = {"concat": lambda r: r, "sum": lambda r: r, "ave": lambda r: r, "mul": lambda r: r * r}


def bidirectional(conversion, layer, call):
    """A `Bidirectional` LSTM or GRU: both directions converted; the merge commutes with their common scale."""
    if _given_initial_state(call):
        conversion.note(layer.name, "it is given initial states, which are not rescaled to the unit-scaled state")
    forward, hidden_scale, states = _recurrent_twin(layer.forward_layer)
    backward, _, _ = _recurrent_twin(layer.backward_layer)
    new = keras.layers.Bidirectional(forward, merge_mode=layer.merge_mode, backward_layer=backward,
                                     name=layer.name, dtype=layer.dtype_policy)
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if layer.merge_mode is None:
        ratios = [hidden_scale, hidden_scale]
    else:
        ratios = [_MERGED_RATIO[layer.merge_mode](hidden_scale)]
    ratios += states * 2 if layer.return_state else []
    if not conversion.equivalent:
        return out, [TensorRatio() for _ in ratios]
    for original, twin in ((layer.forward_layer, new.forward_layer), (layer.backward_layer, new.backward_layer)):
        _carry_recurrent(conversion, original, twin, call.inputs[0].value)
    return out, [TensorRatio(r) for r in ratios]


def _bidirectional_ok(layer):
    return all(
        type(direction) in (keras.layers.LSTM, keras.layers.GRU) and _recurrent_ok(direction)
        for direction in (layer.forward_layer, layer.backward_layer)
    ) and layer.merge_mode in (None, *_MERGED_RATIO)


def _attention_parts(layer, call, conversion):
    """The ratios of the query, key and value tensors, and the key length: the product of the attention axes."""
    query_value = call.args[0]
    value_value = call.args[1] if len(call.args) > 1 else call.kwargs["value"]
    key_value = call.args[2] if len(call.args) > 2 else call.kwargs.get("key")
    key_value = value_value if key_value is None else key_value
    query, value, key = (conversion.ratios[id(v)] for v in (query_value, value_value, key_value))
    # After building, Keras keeps the attention axes as non-negative indices
    # of the projected tensors, which are the input's own indices too.
    sizes = [key_value.shape[axis] for axis in layer._attention_axes]
    if any(size is None for size in sizes):
        sizes = [EQUIVALENT_KEY_LENGTH]
    if call.kwargs.get("attention_mask") is not None:
        conversion.note(layer.name, "it is given an attention_mask: where the mask is causal, our attention "
                                    "applies the causal scale, and the conversion is exact for non-causal masks only")
    return query, key, value, math.prod(sizes)


def attention(conversion, layer, call):
    """A `MultiHeadAttention`: each projection carried as a dense layer is, the attention scale into the output's.

    In equivalent mode the output scale is the rule's at one key length (the
    call's, or `EQUIVALENT_KEY_LENGTH` where it is not fixed), so the twin
    computes what the original does at every length.
    """
    config = layer.get_config()
    key_dim, use_gate = config["key_dim"], bool(config.get("use_gate"))
    # Keras's logits are q·k/sqrt(key_dim); ours q·k·mult/key_dim (`rules.attention`).
    mult = key_dim**-0.5 / rules.attention.attention(key_dim, 1).logits if conversion.equivalent else 1.0
    parts = _attention_parts(layer, call, conversion) if conversion.equivalent else None
    new = L.MultiHeadAttention(
        config["num_heads"], key_dim, value_dim=config.get("value_dim"), dropout=config["dropout"],
        use_bias=config["use_bias"], output_shape=config.get("output_shape"),
        attention_axes=config.get("attention_axes"), sliding_window=config.get("sliding_window"),
        flash_attention=getattr(layer, "_flash_attention", None), use_gate=use_gate, seed=config.get("seed"),
        mult=mult, rule_key_length=parts[3] if parts else None, name=layer.name, dtype=layer.dtype_policy,
    )
    out = new(*call.args, **call.kwargs)
    conversion.record(layer, new, call.inputs)
    if not conversion.equivalent:
        return out, [TensorRatio() for _ in keras.tree.flatten(out)]
    if config["dropout"]:
        conversion.note(layer.name, "its attention dropout rescales differently in training (predictions are equal)")
    query, key, value, key_length = parts
    causal = bool(call.kwargs.get("use_causal_mask"))
    # The output projection's input: attention × the rule's scale, times our
    # gate's over Keras's plain sigmoid (the gate's pre-activation is Keras's).
    output_ratio = rules.attention.attention(key_dim, key_length, new.mult, causal).output
    projections = [("query_dense", query.value), ("key_dense", key.value), ("value_dense", value.value)]
    if use_gate:
        projections.append(("_gate_dense", query.value))
        output_ratio *= _activation_ratio("sigmoid", new._gate_dense)
    projections.append(("output_dense", output_ratio))
    for attribute, input_ratio in projections:
        original, projection = getattr(layer, attribute), getattr(new, attribute)
        op_scale = rules.linear.dense(weights.role(projection._kernel).fan_in, 1).output
        values = [original.kernel] + ([original.bias] if original.bias is not None else [])
        conversion.carry(projection, values, [op_scale * input_ratio] + [op_scale] * (len(values) - 1))
    output_names = [v.name for v in own_weights(new.output_dense)]
    ratios = [TensorRatio(1.0, conversion.rescaler(new.output_dense, output_names), query.grad_ratio)]
    return out, ratios + [TensorRatio() for _ in keras.tree.flatten(out)[1:]]


def ours(conversion, layer, call):
    """A layer of `keras_unitscale.layers`: already unit-scaled, kept."""
    return conversion.keep(layer, call, known=True)


def _elementwise_rule(name):
    return name in activations.NAMES and ops_activations.is_elementwise(name)


def _dense_activation_ok(layer):
    name = activation_name(layer.activation)
    return name in activations.PROBABILITIES or _elementwise_rule(name)


def _conv_activation_ok(layer):
    return not getattr(layer, "lora_enabled", False) and _dense_activation_ok(layer)


def _plain_projection(layer):
    equation = _PROJECTION.match(layer.equation)
    plain = equation and layer.bias_axes in (None, "", equation.group(3)) and len(layer.kernel.shape) == 2
    return bool(plain) and _dense_activation_ok(layer)


def _recurrent_ok(layer):
    return (activation_name(layer.cell.activation) == "tanh"
            and activation_name(layer.cell.recurrent_activation) == "sigmoid")


# Weightless layers that commute with a positive factor: kept as they are, and the ratio passes through.
_TRANSPARENT = [
    getattr(keras.layers, name)
    for name in (
        "Flatten", "Reshape", "Permute", "RepeatVector", "Identity", "Cropping1D", "Cropping2D",
        "ZeroPadding1D", "ZeroPadding2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
        "GlobalMaxPooling1D", "GlobalMaxPooling2D", "AveragePooling1D", "AveragePooling2D",
        "MaxPooling1D", "MaxPooling2D", "SpatialDropout1D",
    )
    if hasattr(keras.layers, name)
]


def _transparent(conversion, layer, call):
    return conversion.transparent(layer, call)


def register_defaults():
    """Registers the converters above (done once, when `keras_unitscale.convert` loads)."""
    for layer_class in _TRANSPARENT:
        register_converter(layer_class, _transparent, subclasses=True)
    register_converter(keras.layers.Dense, dense, subclasses=True, accepts=_dense_activation_ok)
    register_converter(keras.layers.EinsumDense, dense, subclasses=True, accepts=_plain_projection)
    register_converter(keras.layers.Embedding, embedding)
    for keras_class in _CONVOLUTIONS:
        register_converter(keras_class, convolution, accepts=_conv_activation_ok)
    register_converter(keras.layers.LayerNormalization, layer_norm)
    register_converter(keras.layers.BatchNormalization, batch_norm)
    register_converter(keras.layers.GroupNormalization, batch_norm)
    if hasattr(keras.layers, "RMSNormalization"):
        register_converter(keras.layers.RMSNormalization, layer_norm)
    register_converter(keras.layers.Activation, activation)
    for keras_class in _ACTIVATION_LAYERS:
        register_converter(keras_class, activation_layer)
    register_converter(keras.layers.Softmax, softmax_layer)
    register_converter(keras.layers.Dropout, dropout)
    register_converter(keras.layers.Add, add)
    register_converter(keras.layers.LSTM, recurrent, accepts=_recurrent_ok)
    register_converter(keras.layers.GRU, recurrent, accepts=_recurrent_ok)
    register_converter(keras.layers.Bidirectional, bidirectional, accepts=_bidirectional_ok)
    register_converter(keras.layers.MultiHeadAttention, attention)
    for name in L.__all__:
        register_converter(getattr(L, name), ours)
