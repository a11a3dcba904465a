"""Any activation Keras accepts: resolving names and functions, and the general rule of a function.

Every activation without a derived rule gets the general one, output ×
`1/RMS(f(z))` and input gradient × `1/RMS(f'(z))` for z ~ N(0, 1),
computed once per activation (`rule`): this module evaluates `f` and its
derivative with `keras.ops`, on the CPU, and `rules.activations`
integrates. `ops.activations.apply` applies it.
"""

import functools
import inspect
import threading

import keras
import numpy as np
from keras import ops

from keras_unitscale import autodiff
from keras_unitscale import rules

__all__ = ["keras_names", "resolve", "rule", "is_elementwise", "function_of"]


@functools.lru_cache(maxsize=None)
def keras_names():
    """The names in `keras.activations` that name an activation, with the function each stands for.

    Read from the installed Keras (its public functions that
    `keras.activations.get` returns for their own name), so that a name
    Keras adds is accepted too.

    Examples:
        >>> keras_names()["relu"] is keras.activations.relu
        True
    """
    names = {}
    for name in dir(keras.activations):
        candidate = getattr(keras.activations, name)
        if name.startswith("_") or not callable(candidate):
            continue
        try:
            fn = keras.activations.get(name)
        except ValueError:  # get, serialize, deserialize
            continue
        if fn is candidate:
            names[name] = fn
    return names


def _extra_arguments(fn):
    """The arguments after the input that `fn` needs and has no default for (threshold's two)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: a builtin
        return []
    return [
        p.name for p in parameters
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def resolve(activation):
    """What a layer stores for `activation`: a canonical name for Keras's activations, else the function itself.

    Validates early. Keras's activations, named or given as the function
    (`keras.activations.relu`) or as a serialised config, become the name
    Keras serialises the function under ("swish" → "silu", "hard_swish" →
    "hard_silu"); None becomes "linear". Any other callable (a function of
    a tensor) is returned as it is.

    Args:
        activation: None, a name in `keras.activations`, a config dict, or a
            callable.

    Returns:
        A name in `rules.activations.NAMES` (or another that Keras names),
        or the callable.

    Raises:
        ValueError: for an unknown name, a name that needs arguments Keras
            cannot give it ("threshold"), or anything else that is not
            callable.

    Examples:
        >>> resolve(keras.activations.relu), resolve("swish"), resolve(None)
        ('relu', 'silu', 'linear')
    """
    if activation is None:
        return "linear"
    try:
        return _RESOLVED[activation]
    except (KeyError, TypeError):  # not seen yet, or a config dict (unhashable)
        pass
    resolved = _resolve(activation)
    try:
        _RESOLVED[activation] = resolved
    except TypeError:
        pass
    return resolved


# What `resolve` returned for each activation it has seen. Layers resolve
# their activation at every call; reading Keras's names and signatures each
# time costs eager steps their time and breaks `torch.compile`'s graph.
_RESOLVED = {}


def _resolve(activation):
    names = keras_names()
    activation = _asfunction_of(activation, names)
    if not callable(activation):
        raise ValueError(
            "`activation` must be None, a name in keras.activations or a callable (a function of a tensor). "
            f"Received: activation={activation!r} of type {type(activation).__name__}"
        )
    name = next((n for n, fn in names.items() if fn is activation and n == fn.__name__), None)
    if name is None:
        name = next((n for n, fn in names.items() if fn is activation), None)
    if name is None:
        return activation
    extra = _extra_arguments(activation)
    if extra:
        # Keras accepts the name and fails at the first call; a layer should fail when it is built.
        raise ValueError(
            f"The activation {name!r} needs arguments besides its input ({', '.join(extra)}), which a layer "
            f"cannot pass: give a function instead, e.g. `lambda x: keras.activations.{name}(x, ...)`. "
            f"Received: activation={name!r}"
        )
    return name


def _asfunction_of(activation, names):
    """Keras's function for a name or a serialised config; anything else as it is."""
    if isinstance(activation, str):
        if activation not in names:
            raise ValueError(
                "Unknown activation. Expected None, a callable, or one of the names in keras.activations: "
                f"{sorted(n for n in names if not _extra_arguments(names[n]))}. Received: activation={activation!r}"
            )
        return names[activation]
    if isinstance(activation, dict):
        try:
            return keras.activations.get(activation)
        except Exception as error:
            raise ValueError(
                f"Could not interpret the activation's config. Received: activation={activation!r} ({error})"
            ) from error
    return activation


def _eagerly_on_cpu(compute):
    """`compute()` run now and on the CPU, even when called inside a function being traced.

    A rule is a constant, computed from concrete arrays once, the first
    time it is needed, which may be while a layer is traced (`tf.function`,
    `jax.jit`, Keras's symbolic call, which also turns off PyTorch's
    autograd). A thread of its own starts outside all of these on every
    backend: their state is per thread. (TensorFlow's `init_scope` would
    lift the computation out of a trace, but it also stops every gradient
    tape.) The CPU keeps the numbers the same wherever the model runs.
    """
    result = {}

    def run():
        try:
            with keras.device("cpu:0"):
                result["value"] = compute()
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=run, name="keras_unitscale-activation-rule")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def function_of(activation):
    """The function a resolved activation stands for: Keras's, for a name."""
    return keras_names()[activation] if isinstance(activation, str) else activation


def _evaluate(fn, x, what):
    try:
        return fn(x)
    except Exception as error:
        raise ValueError(
            f"The activation could not be evaluated on a float32 tensor of shape {tuple(x.shape)} ({what}): "
            f"{type(error).__name__}: {error}. Received: activation={fn!r}"
        ) from error


# Computed once per activation (and per size for those acting along an axis): activation → result.
_ELEMENTWISE = {}
_UNTIED = {}
_KEEP_ALIVE = []  # callables that cannot be hashed are cached by id, and kept so that the id stays theirs


def _key(activation):
    try:
        hash(activation)
        return activation
    except TypeError:
        if not any(a is activation for a in _KEEP_ALIVE):
            _KEEP_ALIVE.append(activation)
        return ("id", id(activation))


def _traced(compute):
    """`compute` compiled once under JAX, whose op-by-op dispatch compiles every primitive for every shape.

    TensorFlow and PyTorch run it eagerly: tracing a `tf.function` would
    cost more than the few ops it saves.
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(compute)
    return compute


# The probe of `is_elementwise`: a small normal batch; the same numbers laid out across rows; and the
# batch with its second half tripled. All of one shape, so that each is evaluated by the same code. Its
# spread (3) is wide, so that a function acting along the axis tells the layouts apart even where it
# is flat for most inputs (Keras 3.15's sparsemax is 0 for most unit-normal rows: keras-team/keras#23425).
_PROBE = 3.0 * np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
_PROBE_RELAID = _PROBE.T.reshape(8, 16)
_PROBE_CHANGED = np.concatenate([_PROBE[:4], 3.0 * _PROBE[4:]])


def is_elementwise(activation):
    """Whether `activation` acts on each element alone (else it is taken to act along the last axis).

    Computed, not listed: on a small batch it must keep the shape, give
    the same values for the same numbers laid out across other rows (which
    changes what a softmax normalises over), and the same values on the
    rows kept when the others change (which changes a statistic over the
    whole tensor).

    Examples:
        >>> is_elementwise("elu"), is_elementwise("log_softmax"), is_elementwise("glu")
        (True, False, False)
    """
    activation = resolve(activation)
    key = _key(activation)
    if key not in _ELEMENTWISE:
        fn = function_of(activation)

        def probe():
            evaluate = _traced(fn)
            whole = ops.convert_to_numpy(_evaluate(evaluate, ops.convert_to_tensor(_PROBE), "a probe batch"))
            if whole.shape != _PROBE.shape:
                return False
            relaid = ops.convert_to_numpy(evaluate(ops.convert_to_tensor(_PROBE_RELAID)))
            changed = ops.convert_to_numpy(evaluate(ops.convert_to_tensor(_PROBE_CHANGED)))
            return np.allclose(whole.T.reshape(8, 16), relaid, 1e-5, 1e-6, equal_nan=True) and np.allclose(
                whole[:4], changed[:4], 1e-5, 1e-6, equal_nan=True
            )

        same = _eagerly_on_cpu(probe)
        _ELEMENTWISE[key] = bool(same)
    return _ELEMENTWISE[key]


# Monte-Carlo sample of an activation acting along an axis: about this many elements (at least this
# many rows), seeded, so that the rule at a size is the same in every process.
_MONTE_CARLO_ELEMENTS = 2**20
_MONTE_CARLO_ROWS = 16
_MONTE_CARLO_SEED = 0


def _vjp(fn, x, upstream):
    """`fn(x)` and the VJP of `upstream`, as NumPy arrays: `autodiff.vjp`, compiled once under JAX."""
    try:
        output, (grad,) = _traced(lambda inputs, cotangent: autodiff.vjp_tensors(fn, [inputs], cotangent))(
            ops.convert_to_tensor(x), ops.convert_to_tensor(upstream)
        )
    except Exception as error:
        raise ValueError(
            f"The activation could not be differentiated on a float32 tensor of shape {tuple(x.shape)}: "
            f"{type(error).__name__}: {error}. Received: activation={fn!r}"
        ) from error
    return ops.convert_to_numpy(output), (ops.convert_to_numpy(grad),)


def _untied(activation, size):
    """The general rule, untied: quadrature on the grid for an elementwise function, else Monte Carlo at `size`."""
    fn = function_of(activation)
    if is_elementwise(activation):
        key = (_key(activation), None)
        if key not in _UNTIED:
            # The derivative is the function's own autodiff (a VJP of ones): what backpropagation
            # computes, exact at kinks and 0 across steps, in float32 on every backend. Finite
            # differences would put a spike at each step (threshold-like functions) and lose half
            # the digits of float32.
            grid = rules.common.gaussian_grid().astype("float32")[None, :]
            values, (derivatives,) = _eagerly_on_cpu(lambda: _vjp(fn, grid, np.ones_like(grid)))
            _UNTIED[key] = rules.activations.general(values[0], derivatives[0], constraint=None)
        return _UNTIED[key]
    if not isinstance(size, int) or size <= 0:
        raise ValueError(
            "This activation acts along the last axis, so its rule depends on that axis's size, which must be "
            f"known (static) when the op is built. Received: activation={activation!r}, size={size!r}"
        )
    key = (_key(activation), size)
    if key not in _UNTIED:
        rng = np.random.default_rng(_MONTE_CARLO_SEED)
        rows = max(_MONTE_CARLO_ROWS, -(-_MONTE_CARLO_ELEMENTS // size))
        inputs = rng.normal(size=(rows, size)).astype("float32")

        def sample():
            shape = tuple(ops.convert_to_numpy(_evaluate(_traced(fn), ops.convert_to_tensor(inputs), "a sample")).shape)
            upstream = rng.normal(size=shape).astype("float32")
            return _vjp(fn, inputs, upstream)

        outputs, (grads,) = _eagerly_on_cpu(sample)
        _UNTIED[key] = rules.activations.monte_carlo(outputs, grads, constraint=None)
    return _UNTIED[key]


def rule(activation, mult=1.0, constraint="to_output_scale", size=None):
    """The scales `apply` uses for `activation`: `rules.activations.ElementwiseScales(output, grad)`.

    The derived rule for the names in `rules.activations.DERIVED`; else
    the general rule, computed once and cached.

    Args:
        activation: as for `resolve`.
        mult: the u-μP multiplier, for the names in
            `rules.activations.WITH_MULT` (ignored by the others).
        constraint: see `keras_unitscale.constraints`.
        size: the size of the last axis, for softmax and the activations
            that are not elementwise.

    Examples:
        >>> [round(s, 3) for s in rule("elu", constraint=None)]
        [1.245, 1.223]
    """
    activation = resolve(activation)
    if isinstance(activation, str) and activation in rules.activations.DERIVED:
        return rules.activations.by_name(activation, mult, constraint, size)
    return rules.activations.ElementwiseScales(*rules.common.tie(constraint, *_untied(activation, size)))


def _sample_name(name, size):
    return _untied(resolve(name), size)


# `rules.activations.by_name` gives the general rule of a Keras name through this module.
rules.activations.set_sampler(_sample_name)
