"""`unit_scale(model)`: an existing Keras model's unit-scaled twin, in one call.

`unit_scale` walks a Sequential or functional model's graph (Keras's own
nodes, nested models included) and builds the same graph from
`keras_unitscale.layers`, looking each layer's converter up in a public
registry (`register_converter`), so that users can add their own.

`mode="equivalent"` carries the weights over. Each weight is stored at unit
RMS and its old scale, over the unit-scaled op's own constant (read from
`keras_unitscale.rules`), goes into the weight's multiplier, so the model
computes what it computed before. Our ops multiply some tensors by constants
the original did not (a relu's √2, an LSTM's output scale, a residual add's
weights): the walk tracks each tensor's *ratio* (converted = ratio ×
original) and absorbs it in the next layer that can take it — a dense
kernel's multiplier, a layer norm's epsilon — or, where the next op needs
its operands at given ratios (a residual add, a model output, a layer kept as
it is), in the multipliers of the layer that produced them; where that layer
cannot take it either (it feeds other layers too, or its output is not linear
in its weights), a `keras.layers.Rescaling` by the constant does. Each weight
also gets a fixed learning-rate multiplier `1/rms`, so
`keras_unitscale.optimizers` move the converted model along the original's
Adam trajectory; `match_epsilon` makes Adam's epsilon act as it did on the
original too.

`mode="reinit"` builds the same architecture with fresh unit-scaled / u-μP
initialisation.

Layers whose `call` is Python (custom `Layer` subclasses, subclassed models,
wrappers) are copied from their configs with their sublayers converted
inside, each brought back to its original scale (`keras_unitscale.convert.inside`).

Residual adds — a Keras `Add` of a tensor and a branch computed from it —
become `ResidualSplit` + `ResidualAdd` with u-μP's depth rule for tau;
another `Add` of two tensors becomes the unit-scaled `Add`. The final
`Dense` becomes a readout (`role="output"`).
"""

import warnings

import keras

from keras_unitscale import checks
from keras_unitscale import hub
from keras_unitscale import optimizers
from keras_unitscale import precision
from keras_unitscale.convert import converters
from keras_unitscale.convert import loss as loss_conversion
from keras_unitscale.convert import optimizer as optimizer_conversion
from keras_unitscale.convert.epsilon import match_epsilon
from keras_unitscale.convert.optimizer import adopt
from keras_unitscale.convert.registry import Call
from keras_unitscale.convert.registry import converter_for
from keras_unitscale.convert.registry import register_converter
from keras_unitscale.convert.walk import Conversion
from keras_unitscale.convert.walk import TensorRatio

__all__ = [
    "unit_scale", "match_epsilon", "from_keras", "adopt", "MODES", "register_converter", "converter_for", "Call", "Conversion",
    "TensorRatio",
]

MODES = ("equivalent", "reinit")

converters.register_defaults()


def _check_arguments(model, mode, residual_rule):
    checks.one_of("mode", mode, MODES)
    if not (residual_rule == "depth" or (
        isinstance(residual_rule, (int, float)) and not isinstance(residual_rule, bool) and residual_rule >= 0
    )):
        raise ValueError(
            f"`residual_rule` must be 'depth' or a number >= 0 (tau). Received: residual_rule={residual_rule!r}"
        )
    if not isinstance(model, keras.Model):
        raise ValueError(f"`unit_scale` converts a Keras model. Received: a {type(model).__name__}")
    checks.built(model, "unit_scale")


def unit_scale(model, mode="equivalent", residual_rule="depth"):
    """Returns the unit-scaled twin of a Keras model; `model` is left untouched.

    Converts the layers that have a registered converter (`Dense`,
    `EinsumDense` where it is a plain projection, `Embedding`, `LSTM`, `GRU`,
    `MultiHeadAttention`, the norms (`LayerNormalization`, `RMSNormalization`,
    `BatchNormalization`, `GroupNormalization`),
    `Activation` and activations named inside layers, the activation
    layers `ReLU`, `LeakyReLU`, `ELU` and `PReLU`, `Dropout`, `Add`, and
    the convolutions: `Conv1D`/`2D`/`3D` and their transposes,
    `DepthwiseConv1D`/`2D`, `SeparableConv1D`/`2D`, their regularisers,
    constraints and dtype policies carried over).
    Weightless layers that commute with a scale (`Flatten`, pooling, ...)
    are kept. A layer whose `call` is Python (a custom layer, a wrapper)
    becomes a copy whose sublayers are converted (`convert.inside`), the
    Python between them named in one warning. Any other layer is kept
    (a copy, with its weights) and named in one warning.

    Args:
        model: a built `keras.Sequential`, functional or subclassed
            `keras.Model` (nested ones and shared layers included).
        mode: "equivalent" (carry the weights over: the converted model's
            predictions equal the original's, and with `keras_unitscale.optimizers`
            its training follows the original's Adam trajectory, epsilon
            included after `match_epsilon`) or "reinit"
            (fresh unit-scaled initialisation; train it with u-μP's rules).
        residual_rule: tau of the residual adds: "depth" (u-μP's depth rule,
            `rules.residual.transformer_residual_scaling_rule`, over the
            residual adds in graph order) or a number for all.

    Returns:
        A new model of the same kind (a subclassed model: a copy of it). Its
        `unit_scale_sources` maps each converted variable's path to the original's. Its `unit_scale_notes`
        lists `(layer, why)` for what could not be made exactly equivalent
        (also warned): dropout inside an LSTM, a GRU or attention (training
        rescales differently), an LSTM or GRU given initial states, attention over keys of
        unfixed length.

    Examples:
        >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(64, activation="relu"),
        ...                           keras.layers.Dense(1, activation="sigmoid")])
        >>> twin = unit_scale(model)
        >>> x = np.random.default_rng(0).normal(size=(8, 30)).astype("float32")
        >>> bool(np.allclose(twin.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5))
        True
        >>> [type(layer).__name__ for layer in twin.layers], twin.layers[-1].role
        (['Dense', 'Dense'], 'output')
    """
    _check_arguments(model, mode, residual_rule)
    hub.register_if_imported()
    conversion = Conversion(mode, residual_rule)
    converted = conversion.run(model)
    _warn(conversion)
    _check_compile(converted, mode)
    converted.unit_scale_notes = list(conversion.notes)
    # Paths, not variables: a model tracks the variables it holds in attributes.
    converted.unit_scale_sources = dict(conversion.sources)
    return converted


def from_keras(optimizer_or_loss, parametrization="u-mup"):
    """The script's optimizer or loss, made ours: how a twin is compiled as the script compiles.

    An optimizer (`keras.optimizers.Adam`, `AdamW`, `SGD`, `RMSprop`, `Lion`,
    or a name Keras knows) becomes ours with its arguments
    (`convert.optimizer.from_keras`, which `parametrization` is passed to). A
    loss (`SparseCategoricalCrossentropy`, `CategoricalCrossentropy`,
    `BinaryCrossentropy`, `MeanSquaredError`, an object, function or name)
    becomes the unit-scaled one of `keras_unitscale.losses`: the same value,
    its gradient not divided by the rows it averages, which FP8's E5M2 needs
    for per-token losses (`convert.loss`). With a twin, call `match_epsilon`
    after compiling, and its training follows the script's.

    Examples:
        >>> type(from_keras("adam")).__module__, type(from_keras("sparse_categorical_crossentropy")).__module__
        ('keras_unitscale.optimizers', 'keras_unitscale.losses')
    """
    if loss_conversion.is_loss(optimizer_or_loss):
        return loss_conversion.loss_from_keras(optimizer_or_loss)
    return optimizer_conversion.from_keras(optimizer_or_loss, parametrization)


def _averaged_gradient_is_at_risk(model):
    """Whether the twin will compute in FP8, where a gradient divided by its rows can fall below E5M2's range."""
    return any(precision.uses_fp8(getattr(layer, "fp8", False)) for layer in model._flatten_layers(include_self=False))


def _check_compile(model, mode):
    """Makes `model.compile` warn, once each, when the optimizer cannot read the twin's learning-rate multipliers,
    and when a Keras loss divides the gradient by its rows where FP8 cannot hold it."""
    keras_compile = model.compile
    why = {
        "equivalent": "stores each weight at unit scale with a fixed learning-rate multiplier, so that our "
                      "optimizers follow the original model's trajectory",
        "reinit": "is initialised for u-μP, which gives each weight its own learning rate",
    }[mode]

    def compile(*args, **kwargs):
        keras_compile(*args, **kwargs)
        _check_loss(model)
        optimizer = optimizers.unwrap(getattr(model, "optimizer", None))
        if optimizer is None or isinstance(optimizer, optimizers.UnitScaledOptimizer):
            return
        if not getattr(model, "_plain_optimizer_warned", False):
            object.__setattr__(model, "_plain_optimizer_warned", True)
            warnings.warn(
                f"Model '{model.name}' comes from `unit_scale(mode='{mode}')`, which {why}; "
                f"Keras's {type(optimizer).__name__} applies one learning rate to all, so training will not "
                "follow the original script. Compile with `keras_unitscale.convert.from_keras(optimizer)`: "
                "the same optimizer, arguments and schedule, with the multipliers.",
                stacklevel=2,
            )

    # An attribute of this model only: the twin is a plain Keras model otherwise.
    object.__setattr__(model, "compile", compile)


def _check_loss(model):
    loss = getattr(model, "loss", None)
    if (getattr(model, "_averaged_loss_warned", False) or isinstance(loss, (list, dict, tuple))
            or loss_conversion.counterpart(loss) is None or not _averaged_gradient_is_at_risk(model)):
        return
    object.__setattr__(model, "_averaged_loss_warned", True)
    name = loss if isinstance(loss, str) else getattr(loss, "name", type(loss).__name__)
    warnings.warn(
        f"Model '{model.name}' is compiled with Keras's loss {name!r} and runs its matmuls in FP8: Keras's loss "
        "divides its gradient by the rows it averages over, so with many rows (a loss per token) the logits' "
        "gradient of unlikely classes falls below what E5M2 holds, and FP8 rounds it to zero. Compile with "
        "`keras_unitscale.convert.from_keras(loss)`, the same loss value with a unit-scaled gradient, and call "
        "`convert.match_epsilon(twin, script, x, y)` to keep following the script.",
        stacklevel=3,  # the user's `compile`
    )


def _warn(conversion):
    """One warning for the layers kept, one for Python code it cannot see, one for what could not be made exact."""
    if conversion.unknown:
        warnings.warn(
            "unit_scale kept these layers unchanged (no unit-scaled counterpart): "
            + ", ".join(f"'{name}' ({kind})" for name, kind in conversion.unknown),
            stacklevel=3,
        )
    if conversion.custom:
        warnings.warn(
            "unit_scale converted the layers inside these layers, whose `call` is Python it cannot see: "
            + ", ".join(f"'{name}' ({kind})" for name, kind in conversion.custom)
            + ". Each converted sublayer's output keeps the original's scale, so their code computes as it did; "
            "it is not unit-scaled itself. A residual `x + y` written there adds two unit-scale tensors into "
            "one of scale about sqrt(2), a growth that compounds over a stack of blocks, and a scaling keeps "
            "its constant. To have the conversion see them, write them as layers (`keras.layers.Add`, "
            "or `keras_unitscale.layers.ResidualSplit`/`ResidualAdd` for u-μP's residual rule) in a functional "
            "model.",
            stacklevel=3,
        )
    if conversion.notes:
        warnings.warn(
            "unit_scale could not make these exactly equivalent: "
            + "; ".join(f"'{name}': {why}" for name, why in conversion.notes),
            stacklevel=3,
        )
