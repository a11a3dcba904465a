"""Keras's own layer test files, run against our layers with only the class under test swapped.

`tests/test_keras_layers.py` collects what this module builds. For each entry of
`SUITES` it reads a test file of the *installed* `keras` package (for example
`keras/src/layers/core/dense_test.py`), compiles its unmodified source and
executes it in a fresh module namespace whose `import` statements go through
`_SwappingImporter`. Nothing is copied or edited by hand, so the suite follows
whatever Keras version is installed.

How the swap works, and why this way:

- The name a test file uses to reach the class is resolved when the file's own
  import statements run (`from keras.src import layers`, then `layers.Dense`;
  or `from keras.src.layers.core.dense import Dense`). The executed module's
  `__builtins__` carry an `__import__` that returns, for every Keras module on
  the way to the class under test, a read-through view (`_SwappedModule`) whose
  attribute for that class is ours and whose every other attribute is Keras's
  own object. Swapping at import time, rather than patching the module's
  globals after it ran, also covers what a file evaluates while it is being
  executed, e.g. `merging_test.py`'s parameter table
  `{"layer_class": layers.Add, ...}`, which is read when the class body is
  built.
- Only the class under test is swapped, in that file only: `sys.modules` and
  Keras itself are untouched, so other test modules in the same process (and
  Keras's internals, e.g. `RNN` or `Sequential` deserialising a config) see
  Keras's classes. Every other layer a file uses stays Keras's on purpose:
  `layers.Input`, the `layers.Embedding` that `multi_head_attention_test.py`
  uses only to produce a padding mask for the attention layer under test,
  the `GRUCell`/`SimpleRNNCell` stacks in `stacked_rnn_cells_test.py`, and
  `merging_test.py`'s `Subtract`, `Concatenate`, ... Those are Keras's layers
  under Keras's own tests; running them would count Keras's results as ours.
  So for files that test several classes (`only_tests_using_class=True`) only
  the tests that reach the class under test are collected: those whose code
  names it, or whose `parameterized` parameters contain it.
- Keras's test files use one marker that Keras's repository conftest defines,
  `pytest.mark.requires_trainable_backend`. The executed file sees a `pytest`
  whose `mark.requires_trainable_backend` is what that conftest turns it into
  (skip on the NumPy and OpenVINO backends, which cannot train), so nothing is
  added to `tests/conftest.py` and `--strict-markers` would not trip on it.

The expected exceptions are listed, with their reasons, in
`tests/keras_suite_exceptions.py`.
"""

import ast
import builtins
import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import sys
import tokenize
import types
import unittest

import keras
import pytest
from keras.src import layers as keras_src_layers

import keras_unitscale.layers
from keras_unitscale.scale import scaling_disabled


@dataclasses.dataclass(frozen=True)
class Suite:
    """One Keras test file and the class swapped in it.

    Attributes:
        keras_module: the test file as a module name of the installed keras,
            e.g. `"keras.src.layers.core.dense_test"`.
        class_name: the class swapped, by its name in both `keras.layers` and
            `keras_unitscale.layers`.
        only_tests_using_class: collect only the tests that reach the class
            (files whose other tests exercise other Keras layers).
    """

    keras_module: str
    class_name: str
    only_tests_using_class: bool = False

    @property
    def file(self):
        return self.keras_module.replace(".", "/") + ".py"


# Keras 3.15 has no test file of its own for `LSTMCell` or `GRUCell`; the
# stacked-cells tests are where Keras exercises them directly (and `LSTM` and
# `GRU`, ours, build their own cells).
SUITES = (
    Suite("keras.src.layers.core.dense_test", "Dense"),
    Suite("keras.src.layers.core.einsum_dense_test", "EinsumDense"),
    Suite("keras.src.layers.core.embedding_test", "Embedding"),
    Suite("keras.src.layers.attention.multi_head_attention_test", "MultiHeadAttention"),
    Suite("keras.src.layers.rnn.lstm_test", "LSTM"),
    Suite("keras.src.layers.rnn.stacked_rnn_cells_test", "LSTMCell", only_tests_using_class=True),
    Suite("keras.src.layers.rnn.gru_test", "GRU"),
    Suite("keras.src.layers.rnn.stacked_rnn_cells_test", "GRUCell", only_tests_using_class=True),
    Suite("keras.src.layers.normalization.layer_normalization_test", "LayerNormalization"),
    Suite("keras.src.layers.normalization.rms_normalization_test", "RMSNormalization"),
    Suite("keras.src.layers.normalization.batch_normalization_test", "BatchNormalization"),
    Suite("keras.src.layers.normalization.group_normalization_test", "GroupNormalization"),
    Suite("keras.src.layers.regularization.dropout_test", "Dropout"),
    Suite("keras.src.layers.merging.merging_test", "Add", only_tests_using_class=True),
    Suite("keras.src.layers.activations.activation_test", "Activation"),
    Suite("keras.src.layers.activations.relu_test", "ReLU"),
    Suite("keras.src.layers.activations.leaky_relu_test", "LeakyReLU"),
    Suite("keras.src.layers.activations.elu_test", "ELU"),
    Suite("keras.src.layers.activations.prelu_test", "PReLU"),
    Suite("keras.src.layers.activations.softmax_test", "Softmax"),
    Suite("keras.src.layers.convolutional.conv_test", "Conv1D", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.conv_test", "Conv2D", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.conv_test", "Conv3D", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.conv_transpose_test", "Conv1DTranspose", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.conv_transpose_test", "Conv2DTranspose", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.conv_transpose_test", "Conv3DTranspose", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.depthwise_conv_test", "DepthwiseConv1D", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.depthwise_conv_test", "DepthwiseConv2D", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.separable_conv_test", "SeparableConv1D", only_tests_using_class=True),
    Suite("keras.src.layers.convolutional.separable_conv_test", "SeparableConv2D", only_tests_using_class=True),
)

# The executed test files are registered in `sys.modules` under this prefix,
# never under Keras's own module names.
GENERATED_PACKAGE = "_keras_suite_generated"


class _SwappedModule(types.ModuleType):
    """A read-through view of a Keras module in which one class is ours.

    Attributes are looked up on the real module at each access, so the view
    never goes stale; the class under test is replaced, and submodules on the
    way to it are returned as views too (`keras.src.layers.core.dense`).
    """

    def __init__(self, real, swap):
        super().__init__(real.__name__, real.__doc__)
        for name in ("__file__", "__path__", "__package__", "__spec__", "__loader__"):
            if hasattr(real, name):
                self.__dict__[name] = getattr(real, name)
        self.__dict__["_swap_real"] = real
        self.__dict__["_swap"] = swap

    def __getattr__(self, name):
        return self._swap.substitute(getattr(self._swap_real, name))

    def __setattr__(self, name, value):
        raise AttributeError(
            f"A test file tried to set `{self.__name__}.{name}`; the swapped "
            "view of a Keras module is read-only so that no Keras module "
            "changes for the rest of the process."
        )

    def __dir__(self):
        return dir(self._swap_real)

    def __repr__(self):
        return f"<view of {self._swap_real!r} with {self._swap.class_name} swapped>"


class _Swap:
    """Maps Keras's class under test to ours, and the modules on the way to it to views."""

    def __init__(self, class_name, keras_cls, our_cls):
        self.class_name = class_name
        self.keras_cls = keras_cls
        self.our_cls = our_cls
        # Modules that hold the class itself (`keras.src.layers`,
        # `keras.src.layers.core.dense`, `keras.layers`, ...), read from their
        # `__dict__` so that no lazy loader is triggered; every package above
        # one of them leads to it (`keras.src` -> `.layers`).
        holders = [
            name
            for name, module in list(sys.modules.items())
            if name.split(".")[0] == "keras"
            and isinstance(module, types.ModuleType)
            and vars(module).get(class_name) is keras_cls
        ]
        self.carriers = {
            ".".join(name.split(".")[: i + 1])
            for name in holders
            for i in range(name.count(".") + 1)
        }
        self._views = {}

    def substitute(self, value):
        if value is self.keras_cls:
            return self.our_cls
        if isinstance(value, types.ModuleType) and value.__name__ in self.carriers:
            if value.__name__ not in self._views:
                self._views[value.__name__] = _SwappedModule(value, self)
            return self._views[value.__name__]
        return value


@contextlib.contextmanager
def _defaults_changed(our_cls, fill_defaults):
    """Within this context `our_cls`'s constructor first lets `fill_defaults(arguments)` fill missing arguments.

    The class stays the same object, so exact-type checks (`quantize`
    refusing subclasses) and serialisation see our layer. Tests run one at a
    time in a process (pytest-xdist uses processes), so the change is seen
    by that test only.
    """
    own = our_cls.__dict__.get("__init__")
    inherited = our_cls.__init__
    signature = inspect.signature(inherited)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        fill_defaults(bound.arguments)
        inherited(*bound.args, **bound.kwargs)

    # Keras's `Operation.__new__` reads the constructor's signature to
    # record its arguments: it must be ours, not `(*args, **kwargs)`.
    __init__.__signature__ = signature
    our_cls.__init__ = __init__
    try:
        yield signature
    finally:
        if own is None:
            del our_cls.__init__
        else:
            our_cls.__init__ = own


@contextlib.contextmanager
def keras_initialisers(our_cls, keras_cls):
    """Within this context `our_cls`'s initialiser arguments default to `keras_cls`'s.

    Our layers default their kernels to unit-normal; a test whose bound is
    calibrated to the magnitude of Keras's default weights (e.g. an absolute
    quantization error) runs in this context in its twin. Only defaults
    change: an initialiser the test passes is kept.
    """
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(keras_cls.__init__).parameters.items()
        if name.endswith("_initializer") and parameter.default is not inspect.Parameter.empty
    }
    if not defaults:
        raise ValueError(
            f"`{keras_cls.__name__}.__init__` has no initialiser argument with a default; "
            "a 'keras initialisers' exception cannot apply to it."
        )
    missing = sorted(set(defaults) - set(inspect.signature(our_cls.__init__).parameters))
    if missing:
        raise TypeError(
            f"`{our_cls.__name__}.__init__` does not take Keras's initialiser arguments {missing}."
        )

    def fill(arguments):
        for name, default in defaults.items():
            arguments.setdefault(name, default)

    with _defaults_changed(our_cls, fill):
        yield


@contextlib.contextmanager
def keras_temperature(our_cls):
    """Every scale op removed, and attention's logits at Keras's temperature.

    u-μP's logits are `mult · q·k / head_dim`, Keras's `q·k / sqrt(key_dim)`:
    the softmax's temperature, part of the computation rather than a scale
    op, so `scaling_disabled` alone leaves it. Here `our_cls`'s `mult`
    defaults to `sqrt(key_dim)` (a `mult` the test passes is kept), which
    gives Keras's logits: with every scale op removed as well, our layer
    must then compute Keras's numbers.
    """

    def fill(arguments):
        arguments.setdefault("mult", arguments["key_dim"] ** 0.5)

    with _defaults_changed(our_cls, fill), scaling_disabled():
        yield


class _MarkGenerator:
    """`pytest.mark` as Keras's repository conftest extends it."""

    def __getattr__(self, name):
        if name == "requires_trainable_backend":
            # keras/conftest.py: these tests train, which the NumPy and
            # OpenVINO backends cannot; everywhere else the marker is a no-op.
            return pytest.mark.skipif(
                keras.backend.backend() in ("numpy", "openvino"),
                reason="Trainer not implemented for NumPy and OpenVINO backend.",
            )
        return getattr(pytest.mark, name)


class _PytestView(types.ModuleType):
    """The `pytest` module, but with `_MarkGenerator` as `mark`."""

    def __init__(self):
        super().__init__("pytest", pytest.__doc__)
        self.__dict__["mark"] = _MarkGenerator()

    def __getattr__(self, name):
        return getattr(pytest, name)


_PYTEST_VIEW = _PytestView()


class _SwappingImporter:
    """The `__import__` of an executed test file: real imports, swapped views."""

    def __init__(self, swap):
        self.swap = swap

    def __call__(self, name, globals=None, locals=None, fromlist=(), level=0):
        module = builtins.__import__(name, globals, locals, fromlist, level)
        if module is pytest:
            return _PYTEST_VIEW
        return self.swap.substitute(module)


@dataclasses.dataclass
class Loaded:
    """What loading one suite gave: its test classes, or why it cannot run."""

    suite: Suite
    classes: dict = dataclasses.field(default_factory=dict)  # generated name -> class
    swap: _Swap = None
    skip_reason: str = None
    # The generated names of the file's classes, known even when it is skipped
    # for want of our class (read from its source, not executed).
    class_names: tuple = ()


def load(suite):
    """Executes `suite`'s Keras test file with the class swapped; returns `Loaded`.

    A missing class in `keras_unitscale.layers` or a test file the installed
    keras does not have is not an error: the suite is skipped with the reason.
    """
    # The file is read, not imported: importing it would register Keras's
    # own module (and, under pytest, go through its assertion rewriter).
    package, _, stem = suite.keras_module.rpartition(".")
    path = os.path.join(os.path.dirname(importlib.import_module(package).__file__), stem + ".py")
    if not os.path.isfile(path):
        return Loaded(suite, skip_reason=(
            f"the installed keras {keras.__version__} has no {suite.file}"))
    with tokenize.open(path) as f:
        source = f.read()
    class_names = tuple(
        generated_name(suite, node.name) for node in ast.parse(source).body if isinstance(node, ast.ClassDef)
    )
    our_cls = getattr(keras_unitscale.layers, suite.class_name, None)
    if our_cls is None:
        return Loaded(suite, class_names=class_names, skip_reason=(
            f"keras_unitscale.layers has no `{suite.class_name}`: "
            f"keras/{suite.file.split('/', 1)[1]} cannot run"))
    keras_cls = getattr(keras_src_layers, suite.class_name)

    name = f"{GENERATED_PACKAGE}.{suite.keras_module}"
    module = types.ModuleType(name)
    module.__file__ = path
    # Keras's files import absolutely; a relative import would resolve
    # against the real package, as in the original.
    module.__package__ = package
    swap = _Swap(suite.class_name, keras_cls, our_cls)
    module.__builtins__ = dict(vars(builtins), __import__=_SwappingImporter(swap))
    # Registered so that anything the file defines (custom layers, pickling,
    # `inspect`) can find its module by name.
    sys.modules[name] = module
    # Compiled with the original path: tracebacks show Keras's source lines.
    exec(compile(source, path, "exec"), module.__dict__)

    loaded = Loaded(suite, class_names=class_names, swap=swap)
    for attr, value in vars(module).items():
        if (
            isinstance(value, type)
            and issubclass(value, unittest.TestCase)
            and value.__module__ == name
        ):
            loaded.classes[generated_name(suite, attr)] = value
    return loaded


def generated_name(suite, test_class_name):
    """`Keras<test class>`, and `_<class under test>` after it where several suites run the file.

    `conv_test.py`, for one, tests `Conv1D`, `Conv2D` and `Conv3D`: it runs
    once for each, with that class swapped.
    """
    shared = sum(other.keras_module == suite.keras_module for other in SUITES) > 1
    return f"Keras{test_class_name}" + (f"_{suite.class_name}" if shared else "")


def method_names(cls):
    """The test methods of `cls`, in unittest's (and so pytest's) order."""
    return unittest.TestLoader().getTestCaseNames(cls)


def _uses(obj, cls, seen=None):
    """Whether `cls` is `obj` or inside it (containers, absl's bound parameters)."""
    if obj is cls:
        return True
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, dict):
        return any(_uses(v, cls, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_uses(v, cls, seen) for v in obj)
    return False


def _code_names(code, name):
    """Whether `code` (or a function, comprehension or lambda inside it) names `name`."""
    if name in code.co_names:
        return True
    return any(
        _code_names(const, name) for const in code.co_consts if isinstance(const, types.CodeType)
    )


def uses_class(method, class_name, our_cls):
    """Whether a test method reaches the class under test.

    absl's `parameterized` turns each parameter set into a function that
    wraps the test (`functools.wraps`, so `__wrapped__`) and holds the
    parameters in its closure.
    """
    function = method
    while function is not None:
        if _code_names(function.__code__, class_name):
            return True
        for cell in function.__closure__ or ():
            try:
                if _uses(cell.cell_contents, our_cls):
                    return True
            except ValueError:  # an empty cell
                continue
        function = getattr(function, "__wrapped__", None)
    return False


def _marked_copy(method, mark):
    """A new function that runs `method`, with `mark` added to `method`'s marks."""

    @functools.wraps(method)
    def test(self):
        return method(self)

    return mark(test)


def _twin(method, context):
    """`method`'s body run inside `context()`."""

    @functools.wraps(method)
    def test(self):
        with context():
            return method(self)

    return test


PLAIN_NUMBERS = "plain numbers"
KERAS_INITIALISERS = "keras initialisers"
KERAS_TEMPERATURE = "keras temperature"

# The twin each category gets: (suffix of its name, what it runs the body
# in, given the file's `_Swap`). Each twin changes one thing only.
TWINS = {
    # Every scale op removed: our layer must compute Keras's numbers.
    PLAIN_NUMBERS: ("__scaling_disabled", lambda swap: scaling_disabled),
    # Our layer (scales kept) with Keras's default initialisers instead of
    # unit-normal ones: for bounds calibrated to Keras's weight magnitudes.
    KERAS_INITIALISERS: (
        "__keras_initialisers",
        lambda swap: functools.partial(keras_initialisers, swap.our_cls, swap.keras_cls),
    ),
    # Every scale op removed and attention's softmax at Keras's temperature
    # (`mult = sqrt(key_dim)`): our layer must compute Keras's numbers.
    KERAS_TEMPERATURE: ("__keras_temperature", lambda swap: functools.partial(keras_temperature, swap.our_cls)),
}

# `KERAS_SUITE_TWINS=all python -m pytest tests/test_keras_layers.py` gives
# every test that is not an exception its "plain numbers" twin: a failing
# test whose twin passes is a candidate for that category (then check that
# the difference is only the scale).
TWINS_ENV = "KERAS_SUITE_TWINS"


def build_test_class(generated_name, cls, loaded, exceptions):
    """A subclass of Keras's test class `cls` for pytest, under `generated_name`.

    Only the tests that concern the class under test (`loaded.suite`); the
    exceptions' tests are strict xfails, and those of a category in `TWINS`
    get their twin.

    Returns:
        (the class, the test ids it holds, the exception ids it used).
    """
    suite, swap = loaded.suite, loaded.swap
    twin_all = os.environ.get(TWINS_ENV) == "all"
    namespace = {"__module__": __name__, "__qualname__": generated_name}
    kept, used = [], []
    for method_name in method_names(cls):
        method = getattr(cls, method_name)
        if suite.only_tests_using_class and not uses_class(method, suite.class_name, swap.our_cls):
            # Hidden from collection: a test of another Keras layer.
            namespace[method_name] = None
            continue
        test_id = f"{generated_name}::{method_name}"
        kept.append(test_id)
        if test_id in exceptions:
            category, reason = exceptions[test_id]
            used.append(test_id)
            namespace[method_name] = _marked_copy(
                method, pytest.mark.xfail(strict=True, reason=f"{category}: {reason}")
            )
        elif twin_all:
            category = PLAIN_NUMBERS
        else:
            continue
        if category in TWINS:
            suffix, context = TWINS[category]
            namespace[method_name + suffix] = _twin(method, context(swap))
            kept.append(test_id + suffix)
    generated = type(cls)(generated_name, (cls,), namespace)
    return generated, kept, used
