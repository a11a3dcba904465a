"""Conversion inside layers whose `call` is Python: custom `Layer` subclasses, subclassed models, wrappers.

`unit_scale` walks a functional graph node by node, but the code between a
custom layer's sublayers (a residual `x + y`, a scaling, a reshape) is
Python it cannot see. So inside such a layer each sublayer is converted on
its own, and in `equivalent` mode its output is brought back to the
original's scale (its ratio moved into its weight multipliers): the code
between the sublayers then computes what it computed before, whatever it
is. A sublayer whose ratio nothing can absorb (an LSTM's output scale, a
gelu's) is kept as it is, and noted.

The twin of such a layer is a copy built from its config, which shares
nothing with the original. Its sublayers are swapped for their converted
counterparts before the copy is built (Keras does not let a built layer
take new sublayers), so the copy and the original must create the same
sublayers in their constructors; the weights the copy keeps (its own, its
kept sublayers') are carried over in `equivalent` mode and stay freshly
initialised in `reinit` mode. The converters need each sublayer's inputs:
a second copy, a probe, is called once with each sublayer's `call`
recorded.
"""

import contextlib
import inspect

import keras

from keras_unitscale.convert import registry
from keras_unitscale.convert import walk  # the module, not its names: walk imports this one


def symbolic_inputs(model):
    """`keras.Input`s for a built subclassed model, of the input shape it was built with."""
    input_shape = (model.get_build_config() or {}).get("input_shape")
    if input_shape is None:
        raise ValueError(
            f"The subclassed model '{model.name}' records no single input shape (it is not built, or its "
            "`call` takes several inputs, which this does not handle yet). Call it once on a batch of one "
            f"input first, or write it as a functional model. Received: build config {model.get_build_config()}"
        )
    return keras.tree.map_shape_structure(lambda shape: keras.Input(batch_shape=tuple(shape)), input_shape)


def children(layer):
    """The layers `layer` tracks directly (Keras keeps them in construction order)."""
    return layer._flatten_layers(include_self=False, recursive=False)


def convertible_sublayers(layer):
    """(parent, sublayer) for the sublayers that have a converter, depth first; what those contain is theirs."""
    found = []
    for child in children(layer):
        if registry.converter_for(child) is not None:
            found.append((layer, child))
        else:
            found.extend(convertible_sublayers(child))
    return found


def copy_layer(layer):
    """`layer` rebuilt from its config, or None where it has none that rebuilds it."""
    try:
        config = layer.get_config()
    except (NotImplementedError, TypeError, ValueError):
        return None
    try:
        return type(layer).from_config(config)
    except TypeError:
        # The Keras examples write constructors without `**kwargs`: Keras's automatic config then
        # holds base arguments (`trainable`, `dtype`) they do not take. Call it with its own only.
        parameters = inspect.signature(type(layer).__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return None
        try:
            copy = type(layer)(**{key: value for key, value in config.items() if key in parameters})
        except (TypeError, ValueError):
            return None
        copy.name, copy.trainable, copy.dtype_policy = layer.name, layer.trainable, layer.dtype_policy
        return copy
    except (NotImplementedError, ValueError, KeyError):
        return None


def _aligned(*layer_lists):
    return len({len(layers) for layers in layer_lists}) == 1 and all(
        len({type(layer) for layer in group}) == 1 for group in zip(*layer_lists)
    )


class _Records(dict):
    """{id(layer): [(args, kwargs) of each call]}, with `outputs`: (id(layer), output) of every call, in call order."""

    def __init__(self, layers):
        super().__init__({id(layer): [] for layer in layers})
        self.outputs = []


@contextlib.contextmanager
def recording(layers):
    """Records the arguments of each call of `layers` (their `call`, wrapped on the instances for the time being)."""
    layers = list({id(layer): layer for layer in layers}.values())  # a layer two parents hold is wrapped once
    records = _Records(layers)
    for layer in layers:
        def recorder(*args, _calls=records[id(layer)], _call=layer.call, _key=id(layer), **kwargs):
            _calls.append((args, kwargs))
            output = _call(*args, **kwargs)
            records.outputs.append((_key, output))
            return output

        # An instance attribute, outside Keras's tracking: removed below.
        object.__setattr__(layer, "call", recorder)
    try:
        yield records
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _is_tensor(value):
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, type)


def _symbolic_call(calls):
    """The first recorded call as `keras.Input`s: a dimension that differs between traces, and the batch, unknown."""
    structure = calls[0]
    flat = [keras.tree.flatten(call) for call in calls]

    def symbolic(index, value):
        if not _is_tensor(value):
            return value
        shape = [None if axis == 0 or any(tuple(other[index].shape)[axis] != size for other in flat[1:]) else size
                 for axis, size in enumerate(tuple(value.shape))]
        return keras.Input(batch_shape=tuple(shape), dtype=keras.backend.standardize_dtype(value.dtype))

    args, kwargs = keras.tree.pack_sequence_as(structure, [symbolic(i, v) for i, v in enumerate(flat[0])])
    return list(args), dict(kwargs)


@contextlib.contextmanager
def _scope_of(original):
    """The name scopes the original sublayer's variables were made in (its parents' names), so paths match."""
    path = original.weights[0].path if original.weights else ""
    parents = path.rsplit(f"{original.name}/", 1)[0].strip("/").split("/") if f"{original.name}/" in path else []
    with contextlib.ExitStack() as stack:
        for name in filter(None, parents):
            stack.enter_context(keras.name_scope(name))
        yield


def _readout_of(sublayers, records, output):
    """The id of the dense sublayer that is the readout of a model whose `call` returned `output`, or None.

    As `walk` decides it in a graph: the dense layer whose output is the
    model's output, else, for one output, the last dense layer called.
    """
    dense = {id(layer) for layer in sublayers if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))}
    outputs = {id(tensor) for tensor in keras.tree.flatten(output)}
    calls = [(key, out) for key, out in records.outputs if key in dense]
    direct = [key for key, out in calls if any(id(tensor) in outputs for tensor in keras.tree.flatten(out))]
    if direct:
        return direct[-1]
    return calls[-1][0] if calls and len(outputs) == 1 else None


def convert_sublayer(conversion, original, calls, readout=False):
    """The converted counterpart of `original`, called on its recorded inputs, its output at ratio 1; or None."""
    args, kwargs = _symbolic_call(calls)
    tensors = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
    for tensor in tensors:
        conversion.ratios[id(tensor)] = walk.TensorRatio()
    convert = registry.converter_for(original)
    sources = dict(conversion.sources)
    with _scope_of(original):
        _, ratios = convert(conversion, original,
                            registry.Call(args, kwargs, [walk.TensorRatio() for _ in tensors], readout))
    new, _ = conversion.converted[id(original)]
    for ratio in ratios:
        if abs(ratio.value - 1.0) <= 1e-7:
            continue
        if ratio.rescale is None:
            # Undo: the original stays (a copy, in the layer's copy).
            del conversion.converted[id(original)]
            conversion.sources = sources
            conversion.note(original.name, "its unit-scaled output differs from the original's by a constant that "
                                           "nothing around it can absorb (it feeds Python code), so it is kept")
            return None
        ratio.rescale(1.0 / ratio.value)
    conversion.out_ratios[id(original)] = [1.0] * len(ratios)
    return new


def _converted_at_ratio_one(conversion, original, calls, parent, readout=False):
    """The converted `original` whose output is the original's, made now or earlier (a shared layer); or None."""
    cached = conversion.converted.get(id(original))
    if cached is None:
        return convert_sublayer(conversion, original, calls, readout) if calls else None
    if all(abs(ratio - 1.0) <= 1e-7 for ratio in conversion.out_ratios.get(id(original), [1.0])):
        return cached[0]
    conversion.note(original.name, f"it is shared with '{parent}', whose Python code needs its output at the "
                                   "original's scale, which its converted twin elsewhere does not give: a copy is kept")
    return None


def substitute(parent, old, new):
    """Puts `new` wherever `parent` holds `old` (an attribute, a list or dict entry), in `old`'s place among its layers."""
    # A built layer's tracker is locked against new state; swapping a sublayer for its twin adds none of its own
    # (KerasHub's attention layers are built by their block's `build`, before the swap).
    tracker = getattr(parent, "_tracker", None)
    locked = tracker is not None and tracker.locked
    if locked:
        tracker.unlock()
    try:
        for name, value in list(vars(parent).items()):
            if value is old:
                setattr(parent, name, new)  # Keras tracks the new layer
            elif isinstance(value, list):
                value[:] = [new if item is old else item for item in value]
            elif isinstance(value, dict):
                value.update({key: new for key, item in value.items() if item is old})
    finally:
        if locked:
            tracker.lock(tracker._lock_violation_msg)
    unique, seen = [], set()
    for layer in parent._layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            unique.append(layer)
    parent._layers[:] = unique


def own_state(layer):
    """A layer's own variables, trained or not (a counter, moving statistics), not its sublayers'."""
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _carry_kept(conversion, original, copy, new_ids):
    """The copy's own weights, and those of the sublayers it kept, from the original's (equivalent mode)."""
    for variable, source in zip(own_state(copy), own_state(original)):
        variable.assign(keras.ops.convert_to_numpy(source))
        conversion.add_sources([variable], [source])
    walk.copy_random_state(original, copy)
    for original_child, copy_child in zip(children(original), children(copy)):
        if id(copy_child) not in new_ids:
            _carry_kept(conversion, original_child, copy_child, new_ids)


def _name_as(copy, original):
    """Gives the copy's sublayers the original's names (a constructor names them anew), so variable paths match."""
    originals, copies = original._flatten_layers(include_self=False), copy._flatten_layers(include_self=False)
    if _aligned(originals, copies):
        for original_layer, copied in zip(originals, copies):
            copied.name = original_layer.name


def _refuse_config(copy):
    """Makes the copy's `get_config` fail with the fix: its constructor would make Keras's sublayers again."""
    def get_config():
        raise ValueError(
            f"The unit-scaled twin of '{copy.name}' ({type(copy).__name__}) holds converted sublayers that "
            "its config cannot describe: rebuilt from it, its constructor would make Keras's layers again. "
            "Save the twin's weights (`twin.save_weights('twin.weights.h5')`) and restore them into a new "
            "twin: `unit_scale(model)` of the script's model, then `load_weights`."
        )

    object.__setattr__(copy, "get_config", get_config)  # this instance only, outside Keras's tracking


def convert(conversion, layer, call):
    """A copy of `layer` whose convertible sublayers are converted; or None where it cannot be copied so."""
    if not isinstance(layer, keras.layers.Layer):
        return None  # an op of the graph (a mask's `not_equal`): it has no sublayers
    found = convertible_sublayers(layer)
    if not found:
        return None
    copy, probe = copy_layer(layer), copy_layer(layer)
    if copy is None:
        conversion.note(layer.name, "it has no usable config, so its sublayers could not be converted")
        return None
    found_in_copy, found_in_probe = convertible_sublayers(copy), convertible_sublayers(probe)
    if not _aligned([s for _, s in found], [s for _, s in found_in_copy], [s for _, s in found_in_probe]):
        conversion.note(layer.name, "its copy from its config does not create the same sublayers in its "
                                    "constructor (they are made in `build`?), so they could not be converted")
        return None
    _name_as(copy, layer)
    call = conversion.inputs_at(call, [1.0] * len(call.inputs), layer.name)
    with recording([s for _, s in found_in_probe]) as records:
        output = probe(*call.args, **call.kwargs)
        if not all(records.values()):
            # A layer with its own `compute_output_shape` (a wrapper) is not
            # traced by its symbolic call: trace its `call`, as Keras does otherwise.
            output = keras.src.backend.compute_output_spec(probe.call, *call.args, **call.kwargs)
    # `call.readout` here: `layer` is a model whose output is the whole model's (a subclassed model).
    readout = _readout_of([s for _, s in found_in_probe], records, output) if call.readout else None
    new_ids = set()  # the converted sublayers put into the copy
    for (_, original), (parent, copied), (_, probed) in zip(found, found_in_copy, found_in_probe):
        calls = records[id(probed)]
        new = _converted_at_ratio_one(conversion, original, calls, layer.name, readout=id(probed) == readout)
        if new is not None:
            substitute(parent, copied, new)
            new_ids.add(id(new))
    out = copy(*call.args, **call.kwargs)
    if conversion.equivalent:
        _carry_kept(conversion, layer, copy, new_ids)
    conversion.record(layer, copy, call.inputs)
    if new_ids:
        conversion.custom.append((layer.name, type(layer).__name__))
        _refuse_config(copy)
    else:  # nothing converted: the copy is the layer kept as it is
        conversion.unknown.append((layer.name, type(layer).__name__))
    return out, [walk.TensorRatio() for _ in keras.tree.flatten(out)]
