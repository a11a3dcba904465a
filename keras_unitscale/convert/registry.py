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

__all__ = ["Call", "register_converter", "converter_for", "residual_branches", "registered"]


class Call(NamedTuple):
    """One call of an original layer, as a converter sees it."""

    args: Any  # positional arguments, with the converted tensors in place
    kwargs: dict  # keyword arguments, likewise
    inputs: list  # one TensorRatio per input tensor, in the node's order
    readout: bool  # a dense layer that is the model's readout
    taus: tuple = ()  # the residual branches' `tau`s of a layer registered with `residual_branches`
    stream_branches: int = 0  # and how many residual branches its graph's stream has in all


class _Entry(NamedTuple):
    layer_class: type
    converter: Any
    subclasses: bool
    accepts: Any
    residual_branches: Any


_REGISTRY = []  # later entries win: a user's registration overrides a default


def register_converter(layer_class, converter, subclasses=False, accepts=None, residual_branches=None):
    """Registers `converter` for `layer_class` (and its subclasses, with `subclasses=True`).

    Args:
        layer_class: a Keras layer class.
        converter: `fn(conversion, layer, call) -> (outputs, ratios)`, see
            the module docstring.
        subclasses: also for subclasses of `layer_class` (by default only
            that exact class: a subclass may compute something else).
        accepts: optional `fn(layer) -> bool`; a layer it refuses is kept
            unchanged (and named in `unit_scale`'s warning).
        residual_branches: optional `fn(layer) -> int`, for a layer that
            holds residual branches of the model's stream (a pre-norm
            transformer block: 2). The graph walk counts them with the
            graph's residual `Add`s, in order, for the residual rule, and
            gives the layer's converter their `tau`s in `call.taus`.

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
    for name, value in (("accepts", accepts), ("residual_branches", residual_branches)):
        if value is not None and not callable(value):
            raise ValueError(f"`{name}` must be callable or None. Received: {name}={value!r}")
    _REGISTRY.append(_Entry(layer_class, converter, bool(subclasses), accepts, residual_branches))


def _entry_for(layer):
    """The registration that converts `layer`, or None."""
    for entry in reversed(_REGISTRY):
        matches = isinstance(layer, entry.layer_class) if entry.subclasses else type(layer) is entry.layer_class
        if matches:
            return entry if entry.accepts is None or entry.accepts(layer) else None
    return None


def converter_for(layer):
    """The converter registered for `layer`, or None (the layer is kept as it is)."""
    entry = _entry_for(layer)
    return None if entry is None else entry.converter


def residual_branches(layer):
    """How many residual branches of the model's stream `layer`'s converter weighs (0 for most layers)."""
    entry = _entry_for(layer)
    return 0 if entry is None or entry.residual_branches is None else int(entry.residual_branches(layer))


def registered():
    """The registered layer classes, in registration order."""
    return [entry.layer_class for entry in _REGISTRY]
