"""Running a library's own code with some of the names it looks up bound to ours.

Keras's `MultiHeadAttention.build` constructs its projections through the
module-level name `EinsumDense`; KerasHub's blocks construct theirs through
`keras.layers.Dense`, `LlamaAttention`, `LlamaLayerNorm`. `with_names` gives
a copy of such a function whose global names are rebound (the module itself
is untouched, so this is safe across threads and leaves every other caller
as it was), so that our layers are built exactly where, how and under the
names theirs are, and follow their version.
"""

import types

__all__ = ["with_names", "Namespace"]


class Namespace:
    """`base` (a module or another `Namespace`) with the attributes `replaced` replaced: `keras` with `layers.Dense` ours."""

    def __init__(self, base, **replaced):
        self._base, self._replaced = base, replaced

    def __getattr__(self, name):
        if name in self._replaced:
            return self._replaced[name]
        return getattr(self._base, name)


def with_names(function, **names):
    """A copy of `function` that finds each global in `names` bound to the given object.

    Raises `NotImplementedError` where `function` does not look one of them
    up: the library changed how it builds, and the caller needs updating.

    Examples:
        >>> def make():
        ...     return list("ab")
        >>> with_names(make, list=tuple)()
        ('a', 'b')
    """
    missing = [name for name in names if name not in function.__code__.co_names]
    if missing:
        raise NotImplementedError(
            f"`{function.__qualname__}` (module {function.__module__}) no longer looks up {missing}: the "
            "installed version builds differently from the one keras_unitscale was written for, and "
            "keras_unitscale needs updating for it."
        )
    namespace = dict(function.__globals__, **names)
    return types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)
