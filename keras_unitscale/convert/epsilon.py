"""`match_epsilon`: the optimizer's epsilon per weight, so that a converted twin trains exactly as its original."""

import numpy as np

from keras_unitscale import optimizers
from keras_unitscale.analysis import ScaleReporter

__all__ = ["match_epsilon"]


def _gradient_rms(values):
    return np.sqrt(np.mean(np.square(values, dtype="float64")))


def _checked(converted, original):
    """The twin's record of its weights' sources and its optimizer, after checking both."""
    sources = getattr(converted, "unit_scale_sources", None)
    if sources is None:
        raise ValueError(
            "`match_epsilon` needs a model made by `unit_scale(original)`, which records where each weight "
            f"came from. Received: converted={converted.name!r}, which has no `unit_scale_sources`."
        )
    optimizer = optimizers.unwrap(getattr(converted, "optimizer", None))
    if not isinstance(optimizer, optimizers.UnitScaledOptimizer):
        raise ValueError(
            "`match_epsilon` sets the per-weight factors of `keras_unitscale.optimizers`: compile `converted` "
            "with one first (`convert.from_keras(optimizer)` converts a Keras optimizer). "
            f"Received: optimizer={type(optimizer).__name__}"
        )
    for name, model in (("converted", converted), ("original", original)):
        if getattr(model, "loss", None) is None:
            raise ValueError(f"`match_epsilon` differentiates each model's compiled loss; compile `{name}` first.")
    return sources, optimizer


def match_epsilon(converted, original, x, y):
    """Scales the optimizer's `epsilon` per weight of `converted` so that it trains exactly as `original` does.

    The learning-rate multipliers `unit_scale` fixes make our Adam follow the
    original's trajectory up to `epsilon`, the one term of Adam's update that
    sees a gradient's absolute scale, which unit scaling changes (that is its
    point). The converted model's gradient for each weight is a constant
    multiple `r` of the original's; `r` depends on the batch size (the
    unit-scaled ops' batch rules) and the two losses. This measures `r` on
    one batch, as the ratio of the two gradients' RMS, and sets
    `epsilon_multiplier = r` on `converted`'s optimizer (Adam, AdamW,
    RMSprop). SGD's step sees the gradient's scale whole: there it divides
    the weight's learning-rate multiplier by `r` instead. Lion's sign update
    needs nothing. Call it once, after
    compiling both models and before training, on a batch of the training
    batch size. Weights whose gradient is zero in either model keep 1.

    Args:
        converted: a compiled model from `unit_scale(original, mode="equivalent")`,
            with one of `keras_unitscale.optimizers`.
        original: the compiled model it was converted from.
        x, y: a batch of inputs and targets; each model is differentiated
            with its own compiled loss.

    Returns:
        {converted variable path: r}, for the weights it set.
    """
    sources, optimizer = _checked(converted, original)
    if not optimizer.built:
        optimizer.build(converted.trainable_variables)
    converted_grads = ScaleReporter(converted, jit_compile=False).weight_gradients(x, y)
    original_grads = dict(zip(
        (v.path for v in original.trainable_variables),
        ScaleReporter(original, jit_compile=False).weight_gradients(x, y),
    ))
    ratios = {}
    for variable, grad in zip(converted.trainable_variables, converted_grads):
        source = original_grads.get(sources.get(variable.path))
        if source is None:
            continue
        rms, source_rms = _gradient_rms(grad), _gradient_rms(source)
        if rms > 0 and source_rms > 0:
            ratio = ratios[variable.path] = float(rms / source_rms)
            if optimizer.epsilon_power is not None:
                optimizer.set_epsilon_multiplier(variable, ratio)
            elif optimizer.family == "sgd":
                # SGD's step is the gradient itself: r times the gradient needs 1/r the learning rate.
                optimizer.set_lr_multiplier(variable, optimizer.default_lr_multiplier(variable) / ratio)
            # Lion steps by a sign, which r does not change.
    return ratios
