"""`match_epsilon`: the optimizer's epsilon per weight, so that a converted twin trains exactly as its original."""

import math

import keras
import numpy as np
from keras import ops

from keras_unitscale import optimizers
from keras_unitscale.analysis import ScaleReporter
from keras_unitscale.sizes import is_static
from keras_unitscale.sizes import replicas

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
        x: a batch of inputs; each model is differentiated with its own
            compiled loss.
        y: the batch's targets.

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
        ratio = _ratio(grad, source)
        if ratio is not None:
            ratios[variable.path] = ratio
            _follow(optimizer, variable, ratio)
    return ratios


def _ratio(grad, source):
    """`rms(grad) / rms(source)`, or None where either is zero (nothing to measure)."""
    rms, source_rms = _gradient_rms(grad), _gradient_rms(source)
    return float(rms / source_rms) if rms > 0 and source_rms > 0 else None


def _follow(optimizer, variable, ratio):
    """Makes `optimizer`'s step for `variable`, whose gradient is `ratio` times the original's, the original's."""
    if optimizer.epsilon_power is not None:
        optimizer.set_epsilon_multiplier(variable, ratio)
    elif optimizer.family == "sgd":
        # SGD's step is the gradient itself: r times the gradient needs 1/r the learning rate.
        optimizer.set_lr_multiplier(variable, optimizer.default_lr_multiplier(variable) / ratio)
    # Lion steps by a sign, which r does not change.


# The probe's batch sizes: two give each weight's batch power. Sizes the probe's input spec leaves open
# other than the batch are taken as `_OPEN_SIZE`.
PROBE_BATCHES = (32, 64)
_OPEN_SIZE = 16


def _probe_batch(specs, batch):
    """Inputs shaped as `specs` (Keras tensors) with `batch` rows: unit normals, or ones for integer ids (a valid id
    in any vocabulary, and not the padding id 0 that a mask drops), True for booleans."""
    rng = np.random.default_rng(0)

    def one(spec):
        shape = (batch,) + tuple(_OPEN_SIZE if size is None else size for size in spec.shape[1:])
        dtype = keras.backend.standardize_dtype(spec.dtype)
        if "float" in dtype:
            return rng.standard_normal(shape).astype(dtype)
        return np.ones(shape, "bool" if dtype == "bool" else dtype)

    return keras.tree.map_structure(one, specs)


class InPlaceEpsilon:
    """`match_epsilon` for a model converted in place (`UnitScaleCallback`), which has no original left to compare.

    Made before the conversion, it records each trainable weight's gradient
    on probe batches of `PROBE_BATCHES` rows (from the model's input spec,
    `_probe_batch`; a unit-normal gradient at each output, as `scale_report`
    without targets). `install(optimizer)`, after the conversion,
    measures them again. The ratio `r` of a weight's gradient to the plain
    model's is a constant of the model (every backward op is linear in its
    upstream gradient), except for the unit-scaled ops' batch rules:
    `r = r₀ · (rows / rows₀)^-p`, with `p` read from the two probe sizes.
    The optimizer's epsilon multiplier of each weight is set to `r₀` (at
    `rows₀ = PROBE_BATCHES[0]`), and each step multiplies it by
    `(rows₀ / rows)^p` for the rows that step trains on (the model's
    `train_step` is wrapped to read them), so that a batch of any size, a
    smaller last batch included, steps as the script's does.
    The gradients of plain layers a conversion keeps change too (those of
    the converted layers above them reach them rescaled), and are matched
    alike. Where the script's loss is made ours too (`loss`, a
    `convert.loss.InPlaceLoss`), every gradient is moreover `s` times the
    script's, with `s` read from the step's predictions: each step
    multiplies every weight's epsilon by it. An input with an open size other than its batch is probed at
    `_OPEN_SIZE`; there the ratio depends on that size too, and epsilon
    matches batches of that size only.

    `rows₀` and each `p` are saved in the optimizer's state
    (`set_epsilon_batch_rule`), `r₀` in its epsilon multipliers: `resume`
    follows them again on a model saved and loaded after its conversion.
    """

    def __init__(self, model, specs):
        """Probes `model` on inputs shaped as `specs`; None: no probe (`resume`, whose rule is in the optimizer)."""
        self.model, self.specs = model, specs
        self.before = None if specs is None else [self._gradients(batch) for batch in PROBE_BATCHES]
        self.fitted = {}  # {the optimizer's index of a weight: (its path, r₀, p)}
        self.reference_rows = PROBE_BATCHES[0]
        self.optimizer = None
        self.rows = None  # the rows of the step being traced, while `train_step` runs
        self.loss = None  # the script's loss made ours in place, if it is

    @classmethod
    def resume(cls, model, optimizer):
        """Follows the batch rule saved in `optimizer`'s state again (a model converted in place, saved and loaded).

        Returns:
            The `InPlaceEpsilon` it installed, or None where the state holds no rule.
        """
        fitted, reference_rows = {}, None
        for variable in model.trainable_variables:
            rule = optimizer.epsilon_batch_rule(variable)
            if rule is None:
                return None
            reference_rows, power = rule
            fitted[optimizer._get_variable_index(variable)] = (variable.path, optimizer.epsilon_multiplier(variable), power)
        if not fitted:
            return None
        matched = cls(model, None)  # nothing to probe: the conversion happened in the run that saved the state
        matched.fitted, matched.reference_rows = fitted, reference_rows
        matched._follow_steps(optimizer)
        return matched

    def _gradients(self, batch):
        x = _probe_batch(self.specs, batch)
        grads = ScaleReporter(self.model, jit_compile=False).weight_gradients(x)
        return {id(v): grad for v, grad in zip(self.model.trainable_variables, grads)}

    def install(self, optimizer):
        """Measures each weight's ratio and power after the conversion; makes `optimizer` and the model follow them.

        Returns:
            {variable path: (r₀, p)}, for the weights it matched.
        """
        after = [self._gradients(batch) for batch in PROBE_BATCHES]
        for variable in self.model.trainable_variables:
            key = id(variable)
            ratios = [_ratio(a[key], b[key]) if key in a and key in b else None
                      for a, b in zip(after, self.before)]
            if None in ratios:
                continue
            power = math.log(ratios[0] / ratios[1]) / math.log(PROBE_BATCHES[1] / PROBE_BATCHES[0])
            # By the optimizer's index: its update sees the backend's variable, not the Keras one.
            self.fitted[optimizer._get_variable_index(variable)] = (variable.path, ratios[0], power)
            _follow(optimizer, variable, ratios[0])
        for variable in self.model.trainable_variables:  # a weight not matched keeps 1, at any rows
            fitted = self.fitted.get(optimizer._get_variable_index(variable))
            optimizer.set_epsilon_batch_rule(variable, self.reference_rows, 0.0 if fitted is None else fitted[2])
        self._follow_steps(optimizer)
        return {path: (ratio, power) for path, ratio, power in self.fitted.values()}

    def _follow_steps(self, optimizer):
        """Makes `optimizer` read `batch_factor`, and the model's `train_step` record the rows each step trains on."""
        self.optimizer = optimizer
        object.__setattr__(optimizer, "epsilon_batch_factor", self.batch_factor)
        train_step = self.model.train_step

        def train_step_reading_rows(*args):  # (data) on TensorFlow and PyTorch, (state, data) on JAX
            self.rows = ops.shape(keras.tree.flatten(args[-1])[0])[0] * replicas()
            try:
                return train_step(*args)
            finally:
                self.rows = None
                if self.loss is not None:
                    self.loss.factor = None

        object.__setattr__(self.model, "train_step", train_step_reading_rows)

    def batch_factor(self, variable):
        """`(rows₀ / rows)^p` for `variable` in the step being traced (1 for a weight not matched), times the loss's `s`
        where the script's loss is made ours; 1 outside `train_step`."""
        if self.rows is None:
            return 1.0
        loss_factor = 1.0 if self.loss is None or self.loss.factor is None else self.loss.factor
        index = self.optimizer._get_variable_index(variable)
        if index not in self.fitted:
            return loss_factor
        power = self.fitted[index][2]
        if is_static(self.rows) and self.rows > 0:
            # Python arithmetic where the step's rows are known (an eager step
            # pays for each op, per variable).
            return loss_factor * (self.reference_rows / self.rows) ** power
        return loss_factor * ops.power(ops.cast(self.reference_rows, "float32") / ops.cast(self.rows, "float32"), power)
