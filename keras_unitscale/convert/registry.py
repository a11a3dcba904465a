"""The converters' registry: which function turns a Keras layer into its unit-scaled twin.

A converter is `fn(conversion, layer, call) -> (outputs, ratios)`: it builds
the new layer, calls it on `call.args` / `call.kwargs` (the converted
tensors), and returns its outputs with one `TensorRatio` per output, the
ratio of each converted output to the original's. `conversion` is the
`Conversion` in progress (see `keras_unitscale.convert.walk`): it records the
new layer, carries weights over (`carry`), moves tensors to a ratio (`at`,
`inputs_at`), keeps a layer as it is (`keep`) and notes what is not exact.
"""

from typing import Any
from typing import NamedTuple

__all__ = ["Call", "register_converter", "converter_for", "registered"]


class Call(NamedTuple):
    """One call of an original layer, as a converter sees it."""

    args: Any  # positional arguments, with the converted tensors in place
    kwargs: dict  # keyword arguments, likewise
    inputs: list  # one TensorRatio per input tensor, in the node's order
    readout: bool  # a dense layer that is the model's readout


class _Entry(NamedTuple):
    layer_class: type
    converter: Any
    subclasses: bool
    accepts: Any


_REGISTRY = []  # later entries win: a user's registration overrides a default


def register_converter(layer_class, converter, subclasses=False, accepts=None):
    """Registers `converter` for `layer_class` (and its subclasses, with `subclasses=True`).

    Args:
        layer_class: a Keras layer class.
        converter: `fn(conversion, layer, call) -> (outputs, ratios)`, see
            the module docstring.
        subclasses: also for subclasses of `layer_class` (by default only
            that exact class: a subclass may compute something else).
        accepts: optional `fn(layer) -> bool`; a layer it refuses is kept
            unchanged (and named in `unit_scale`'s warning).

    Examples:
        >>> class Doubler(keras.layers.Layer):
        ...     def call(self, x):
        ...         return 2 * x
        >>> def convert_doubler(conversion, layer, call):
        ...     return conversion.transparent(layer, call)
        >>> register_converter(Doubler, convert_doubler)
        >>> converter_for(Doubler()) is convert_doubler
        True
    """
    if not isinstance(layer_class, type):
        raise ValueError(f"`layer_class` must be a class. Received: layer_class={layer_class!r}")
    if not callable(converter):
        raise ValueError(f"`converter` must be callable. Received: converter={converter!r}")
    if accepts is not None and not callable(accepts):
        raise ValueError(f"`accepts` must be callable or None. Received: accepts={accepts!r}")
    _REGISTRY.append(_Entry(layer_class, converter, bool(subclasses), accepts))


def converter_for(layer):
    """The converter registered for `layer`, or None (the layer is kept as it is)."""
    for entry in reversed(_REGISTRY):
        matches = isinstance(layer, entry.layer_class) if entry.subclasses else type(layer) is entry.layer_class
        if matches:
            return entry.converter if entry.accepts is None or entry.accepts(layer) else None
    return None


def registered():
    """The registered layer classes, in registration order."""
    return [entry.layer_class for entry in _REGISTRY]
