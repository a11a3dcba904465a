"""Sizes and scale arithmetic that stay Python numbers whenever shapes are static.

A size is a Python int when the shape is static, and a float32 scalar tensor
only where TensorFlow traces with an unknown (`None`) dimension. Keeping
Python arithmetic whenever possible keeps every scale a compile-time constant.
"""

import functools
import math
import sys

import keras
from keras import ops


# `is_static` and `shape` loop where `all(generator)` would do: an eager step calls them many times per layer, and
# in CPython a loop costs no generator frame.


def is_static(*values):
    for value in values:
        if not isinstance(value, (int, float)):
            return False
    return True


def shape(x):
    """`x`'s shape: ints where static, float32 scalar tensors where not."""
    static = tuple(x.shape)
    for dim in static:
        if not isinstance(dim, int):
            break
    else:
        # Every size known: no op to run (an eager step pays for each `ops.shape`).
        return static
    return tuple(dim if isinstance(dim, int) else ops.cast(dim, "float32") for dim in ops.shape(x))


def numel(x, axes=None):
    """The number of elements of `x` (or of the given axes)."""
    dims = shape(x) if axes is None else [shape(x)[a] for a in axes]
    if is_static(*dims):
        return math.prod(dims)
    size = 1.0
    for dim in dims:
        size = size * dim
    return size


def replicas():
    """How many replicas each hold one slice of the batch here: 1 outside a data-parallel replica.

    Under `tf.distribute` (MirroredStrategy, ...) every replica traces the
    model on its own slice, so a batch size read from a shape is the local
    one. The scales that depend on the batch (a weight gradient's
    `batch^-1/2`, a loss's `1/batch`) must use the global batch, the local
    one times this, to match training on one device. JAX's
    `keras.distribution` traces the global batch, sharded, so it needs no
    correction.
    """
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def as_float(size):
    return float(size) if is_static(size) else ops.cast(size, "float32")


def power(size, exponent):
    if is_static(size):
        return float(size) ** exponent
    return ops.power(ops.cast(size, "float32"), exponent)


def log(value):
    return math.log(value) if is_static(value) else ops.log(ops.cast(value, "float32"))


def at_least_one(count):
    """`max(count, 1)`: the count a rule divides by.

    An empty batch (a replica's share of a short last batch under
    `tf.distribute`, say) has a zero gradient; any finite scale keeps it
    zero, where `0^-1/2` would make it `0·inf = NaN` (or raise, eagerly).
    """
    return max(count, 1) if is_static(count) else ops.maximum(ops.cast(count, "float32"), 1.0)


def exp(value):
    return math.exp(value) if is_static(value) else ops.exp(ops.cast(value, "float32"))


def global_numel(x, axes=None):
    """`numel(x)` over the whole data-parallel batch: the local size times `replicas()`."""
    return numel(x, axes) * replicas()


# How many results a `static_memo` keeps per function before starting afresh (variable sequence lengths make new keys).
_MEMO_SIZE = 4096


def static_memo(fn):
    """`fn` computed once per distinct static arguments: a rule an eager step meets again at every call.

    The arguments must be Python numbers, strings, None and tuples of them
    (sizes where the shape is static); with anything else (a traced size)
    `fn` simply runs, as it does while PyTorch's Dynamo traces (which
    would trace the cache itself). `fn` must be a pure function of them.
    """
    cache = {}

    @functools.wraps(fn)
    def memoized(*args):
        if _dynamo_traces():
            return fn(*args)
        # Looked up first: only static arguments are ever stored, so a hit
        # is theirs (a traced size is unhashable, or a tensor hashed by
        # identity, equal to no stored number), and the check below runs
        # once per new key, not at every call.
        try:
            return cache[args]
        except KeyError:
            pass
        except TypeError:
            return fn(*args)
        if not _is_static_key(args):
            return fn(*args)
        if len(cache) >= _MEMO_SIZE:
            cache.clear()
        cache[args] = result = fn(*args)
        return result

    return memoized


def _is_static_key(value):
    if isinstance(value, tuple):
        for item in value:
            if not _is_static_key(item):
                return False
        return True
    return value is None or isinstance(value, (int, float, str))


def _dynamo_traces():
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()
