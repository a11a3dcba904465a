"""Converting a built model in place: the same layer objects become their unit-scaled classes.

`UnitScaleCallback` works on the model `fit` is training, so it cannot swap
it for a twin. Our layers *are* Keras's layers (subclasses), so a plain
layer can become its unit-scaled class in place: its converted twin is
built on the inputs the layer saw (one recorded trace of the model), in
`equivalent` mode with its output at the original's scale (`inside`), and
then the layer takes the twin's class, its unit-scaling attributes, its
weights' values (at unit RMS) and their records (role, weight multiplier,
fixed learning-rate multiplier). The model keeps computing what it
computed; the converted layers now run the unit-scaled ops, whose
gradients are near unit scale, and their weights sit at unit scale.
"""

import keras

from keras_unitscale import weights
from keras_unitscale.convert import inside
from keras_unitscale.convert.walk import Conversion
from keras_unitscale.graph import functional_graph


def plain_candidates(model):
    """The plain Keras layers of `model` that have a converter to one of our classes, at any depth."""
    found = {id(layer): layer for _, layer in inside.convertible_sublayers(model)}  # a shared layer once
    return [layer for layer in found.values()
            if type(layer).__module__.startswith("keras.") and not isinstance(layer, keras.layers.Dropout)]


def model_inputs(model):
    graph = functional_graph(model)
    return inside.symbolic_inputs(model) if graph is None else graph.inputs


def _same_structure(layer, new):
    """Whether `new` has `layer`'s sublayers, each of the same class or of ours for it, in the same order."""
    pairs = list(zip(inside.children(layer), inside.children(new)))
    return len(pairs) == len(inside.children(layer)) == len(inside.children(new)) and all(
        isinstance(new_child, type(child)) and _same_structure(child, new_child) for child, new_child in pairs)


def _transplant(layer, new):
    """`layer` becomes `new`: its class, the attributes it lacks, its own weights' values and records; its sublayers likewise."""
    sources = {v.name: v for v in inside.own_state(new)}
    values = {name: keras.ops.convert_to_numpy(v) for name, v in sources.items()}
    layer.__class__ = type(new)
    for key, value in vars(new).items():
        if key not in vars(layer):  # the unit-scaling options (role, constraint, multipliers waiting, ...)
            object.__setattr__(layer, key, value)
    if hasattr(new, "activation"):
        layer.activation = new.activation
    for variable in inside.own_state(layer):
        variable.assign(values[variable.name])
        weights.copy_record(sources[variable.name], variable)
    for child, new_child in zip(inside.children(layer), inside.children(new)):
        if type(child) is not type(new_child):
            _transplant(child, new_child)


def convert_in_place(model):
    """Turns the plain layers of `model` that have unit-scaled classes into them, keeping the function.

    Returns:
        `(converted, notes)`: the names of the layers converted, and
        `(layer, why)` for those left as they were.
    """
    candidates = plain_candidates(model)
    if not candidates:
        return [], []
    conversion = Conversion("equivalent", "depth")
    inputs = model_inputs(model)
    if isinstance(inputs, list) and len(inputs) == 1:
        inputs = inputs[0]
    with inside.recording(candidates) as records:
        keras.src.backend.compute_output_spec(model.call, inputs)
    converted, notes = [], []
    for layer in candidates:
        new = inside.convert_sublayer(conversion, layer, records[id(layer)]) if records[id(layer)] else None
        if new is None or type(new) is type(layer) or not type(new).__module__.startswith("keras_unitscale"):
            continue
        if not _same_structure(layer, new):
            notes.append((layer.name, "its unit-scaled class builds other sublayers, so it cannot become it in place"))
            continue
        _transplant(layer, new)
        converted.append(layer.name)
    # Functions traced before hold the old calls.
    model.train_function = model.test_function = model.predict_function = None
    return converted, notes + [note for note in conversion.notes if note not in notes]
