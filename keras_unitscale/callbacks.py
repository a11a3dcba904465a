"""Callbacks: `UnitScaleCallback`, which moves a model's weights to unit scale when training starts, and
`ScaleTracker` (from `keras_unitscale.analysis.tracker`), which records their scales as they train."""

import math
import warnings

import keras
import numpy as np
from keras import ops
from keras.src.utils import io_utils

from keras_unitscale import checks
from keras_unitscale import optimizers
from keras_unitscale.convert import epsilon
from keras_unitscale.convert import in_place
from keras_unitscale.convert import loss as loss_conversion
from keras_unitscale.convert import optimizer as optimizer_conversion
from keras_unitscale import parametrization as P
from keras_unitscale import weights
from keras_unitscale.analysis.tracker import ScaleTracker

__all__ = ["UnitScaleCallback", "ScaleTracker"]

MODES = ("unit", "factor", "l2")
LR_SCALES = ("auto", "inverse", None)
# Where the record of what the callback did is kept on the model object.
_RECORD = "_keras_unitscale_record"


def _geometric_mean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


class UnitScaleCallback(keras.callbacks.Callback):
    """Moves the model's weights to unit scale when training starts, and adjusts the learning rate.

    Add it to `model.fit` of a training script you already have. At the
    start of training it rescales the selected weights, `w → α·w`, then
    multiplies their learning rate by `β`:

    - `mode="unit"`: every selected weight moves to unit scale. First, each
      plain Keras layer that has a unit-scaled class (`Dense`, the
      convolutions, `Embedding`, the norms, `MultiHeadAttention`) becomes it
      *in place* (`convert.in_place`), where its unit-scaled output can be
      brought back to its old scale (not an activation layer's, an LSTM's or a GRU's): the same object, its function kept,
      its weights at unit RMS with the rest of their scale in their weight
      multipliers and a fixed learning-rate factor `1/rms`; a Keras Adam,
      AdamW, RMSprop or Lion becomes ours in place (`convert.adopt`, its
      state kept), so that the training follows the script's; Adam's and
      RMSprop's epsilon, which sees the gradient's scale, is matched per
      weight (`convert.epsilon.InPlaceEpsilon`); and the script's loss, where
      `keras_unitscale.losses` has its counterpart, takes our loss's gradient
      (`convert.loss.InPlaceLoss`: the same value, its gradient not divided
      by the rows it averages, which FP8 would round to zero in a per-token
      loss), epsilon following it. Under SGD
      (whose step grows with the gradient the unit-scaled ops rescale) or an
      optimizer we have no counterpart for, plain layers are left as they are,
      and named. Then in every `keras_unitscale` layer the stored weight gets
      unit RMS (`α = 1/rms(w)`).
    - `mode="factor"`: `α = weight_scale`, the parameter scaling of `θ = α·θ₀`.
    - `mode="l2"`: `α = 1/‖w‖₂`, each selected tensor has unit L2 norm.

    In a `keras_unitscale` layer the factor moves into the weight's weight
    multiplier (`m → m/α`, in its record, `keras_unitscale.weights`), so the
    model computes the same function.
    The weight's gradient is fixed by the layer's backward rule, not by the
    multiplier, so it is unchanged too; an update `Δw` then moves the
    effective weight `m·w` by `(m/α)·Δw`. Adam's update does not depend on
    the gradient's scale, and SGD's is the unchanged gradient times the
    learning rate: for both, `β = α` gives the same effective update, so the
    model follows the same training trajectory. That is `lr_scale="auto"`.
    (In a plain layer the gradient changes with the weights; there `β = α`
    keeps the update's size relative to the weight exact for Adam, and for
    SGD only to first order.)
    (Independent weight decay, the default of our optimizers, is exact too:
    it shrinks `w` and `m·w` by the same fraction.)

    A plain Keras layer has no weight multiplier: in "factor" and "l2"
    modes rescaling its weights changes the function the model computes, and
    the callback says so once; "unit" mode never moves a plain layer's weights.
    A subclassed model that `fit` builds at its first step (TensorFlow) is
    built from the data's spec there, and the callback acts before that step.

    Args:
        mode: "unit", "factor" or "l2".
        weight_scale: `α` for `mode="factor"` (a number > 0); unused otherwise.
        lr_scale: the learning-rate factor `β`: "auto" (`β = α`, see above),
            "inverse" (`β = 1/α`), a number > 0, or None (unchanged).
        include: regular expression(s) over variable paths; only matching
            trainable variables are rescaled. By default, every weight
            except biases and norm gains in "unit" and "factor" modes, and
            every trainable variable in "l2" mode.
        exclude: regular expression(s) over variable paths, left alone.
        verbose: 1 prints a table (one row per rescaled variable: its RMS
            before and after, the weight and learning-rate factors) once;
            0 prints nothing.

    With `keras_unitscale.optimizers`, the learning rate is adjusted per
    variable (in the optimizer's learning-rate multipliers, saved with it);
    with a plain Keras optimizer it is adjusted globally: a float learning
    rate is multiplied, a schedule wrapped in `optimizers.ScaledSchedule`. When
    the factors differ between variables, a global learning rate cannot
    follow them all: the callback applies their geometric mean and says so.

    It acts when `fit` hands it the model, before any callback's
    `on_train_begin` (list it before or after `BackupAndRestore`: the backup
    is restored into the converted model), and once, at the true start of
    training: not again in a second
    `fit`, nor on a model whose optimizer has already taken steps (a model
    saved after training and loaded with its optimizer, or restored by
    `BackupAndRestore`), nor on a model whose layers already hold weight
    multipliers (rescaled before, and saved with them; our optimizers then
    rebuild the learning-rate multipliers from the weight multipliers).
    What it did is in `callback.record`, and the mean factors are in the
    `History` logs as `unit_scale_weight_factor` and `unit_scale_lr_factor`.

    Examples:
        >>> model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(128, activation="relu"),
        ...                           keras.layers.Dense(1, activation="sigmoid")])
        >>> model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        >>> x, y = np.random.default_rng(0).normal(size=(64, 30)), np.ones((64, 1))
        >>> callback = UnitScaleCallback(mode="factor", weight_scale=0.5, lr_scale="inverse", verbose=0)
        >>> history = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
        >>> history.history["unit_scale_weight_factor"], history.history["unit_scale_lr_factor"]
        ([0.5], [2.0])
    """

    def __init__(self, mode="unit", weight_scale=None, lr_scale="auto", include=None, exclude=None, verbose=1):
        super().__init__()
        self.mode = checks.one_of("mode", mode, MODES)
        if mode == "factor":
            if weight_scale is None:
                raise ValueError(
                    "mode='factor' multiplies the weights by `weight_scale`: give it, a number > 0. "
                    "Received: weight_scale=None"
                )
            weight_scale = float(checks.positive("weight_scale", weight_scale))
        elif weight_scale is not None:
            raise ValueError(
                f"`weight_scale` is used only with mode='factor'; mode='{mode}' computes each "
                f"weight's factor itself. Received: mode={mode!r}, weight_scale={weight_scale!r}"
            )
        self.weight_scale = weight_scale
        if lr_scale not in LR_SCALES:
            if not isinstance(lr_scale, (int, float)) or isinstance(lr_scale, bool) or not (
                0 < lr_scale < math.inf
            ):
                raise ValueError(
                    f"`lr_scale` must be 'auto', 'inverse', None or a number > 0. Received: lr_scale={lr_scale!r}"
                )
            lr_scale = float(lr_scale)
        self.lr_scale = lr_scale
        self.include = checks.patterns("include", include)
        self.exclude = checks.patterns("exclude", exclude)
        self.verbose = checks.one_of("verbose", verbose, (0, 1))
        self._config = {"mode": mode, "weight_scale": weight_scale, "lr_scale": lr_scale, "include": include,
                        "exclude": exclude, "verbose": verbose}
        self.record = None
        self._acted = False
        self._left_plain = []
        self._epsilon = None
        self._loss = None
        self._started = False  # in this `fit`, acted or decided not to

    def get_config(self):
        """The constructor's arguments: `UnitScaleCallback.from_config(config)` makes the same callback."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # Choosing what to rescale.

    def _select(self, model, roles):
        variables = model.trainable_variables
        for name, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(pattern.search(v.path) for v in variables):
                    raise ValueError(
                        f"The `{name}` pattern {pattern.pattern!r} matches no trainable variable. "
                        f"The variables are: {[v.path for v in variables]}"
                    )
        if self.include:
            selected = [v for v in variables if any(p.search(v.path) for p in self.include)]
        elif self.mode == "l2":
            selected = list(variables)
        else:
            selected = [v for v in variables if roles[v.path].role not in ("bias", "norm")]
        selected = [v for v in selected if not any(p.search(v.path) for p in self.exclude)]
        if self.mode == "unit":
            # A plain layer's weight has no multiplier to take its factor: moving it changes the function.
            self._left_plain = sorted({v.path.rsplit("/", 1)[0] for v in selected if not weights.is_declared(v)})
            declared = [v for v in selected if weights.is_declared(v)]
            if self._left_plain and not declared:
                return []
            selected = declared
        if not selected:
            raise ValueError(
                f"UnitScaleCallback(mode={self.mode!r}) selects no variable of model "
                f"'{model.name}': its trainable variables are {[v.path for v in variables]}, "
                f"include={[p.pattern for p in self.include]}, exclude={[p.pattern for p in self.exclude]}."
            )
        return selected

    def _weight_factor(self, values):
        """`α`: to unit RMS ("unit"), unit L2 norm ("l2"), or `weight_scale`; None for an all-zero tensor."""
        if self.mode == "factor":
            return self.weight_scale
        size = math.sqrt(float(np.mean(values**2)) if self.mode == "unit" else float(np.sum(values**2)))
        return 1.0 / size if size > 0 and math.isfinite(size) else None

    def _beta(self, weight_factor):
        if self.lr_scale == "auto":
            return weight_factor
        if self.lr_scale == "inverse":
            return 1.0 / weight_factor
        return 1.0 if self.lr_scale is None else self.lr_scale

    # Acting.

    def _check_ready(self, model):
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                f"UnitScaleCallback adjusts the optimizer's learning rate, but model '{model.name}' "
                "has no optimizer: call `model.compile(optimizer=..., ...)` first."
            )
        optimizer = optimizers.unwrap(model.optimizer)
        if getattr(optimizer, "_learning_rate", None) is None:
            raise ValueError(
                f"UnitScaleCallback adjusts the learning rate, but the optimizer "
                f"{type(optimizer).__name__} has none. Received: optimizer={optimizer!r}"
            )
        return optimizer

    def _say(self, message):
        if self.verbose:
            io_utils.print_msg(message)

    def set_model(self, model):
        super().set_model(model)
        self._started = False
        # `fit` hands the callbacks its model once it is built, before any of them starts: acting here, a
        # `BackupAndRestore` listed before this callback restores its backup into the converted model, whose
        # weights and optimizer state the backup holds (a plain layer cannot load them). Where the model is not
        # ready to act on (not built, not compiled), `on_train_begin` acts, or says why not.
        optimizer = optimizers.unwrap(getattr(model, "optimizer", None))
        if model.built and getattr(optimizer, "_learning_rate", None) is not None:
            self._start()

    def on_train_begin(self, logs=None):
        if not self._started:
            self._start()
        self._started = False  # the next `fit` hands the model over again

    def _start(self):
        self._started = True
        self._acted, self._left_plain, self._epsilon, self._loss = False, [], None, None
        model = self.model
        optimizer = self._check_ready(model)
        if getattr(model, _RECORD, None) is not None:
            self.record = getattr(model, _RECORD)
            self._say("UnitScaleCallback: this model was rescaled when it started training; not again.")
            return
        steps = int(ops.convert_to_numpy(optimizer.iterations))
        if steps > 0:
            self._say(
                f"UnitScaleCallback: the optimizer has already taken {steps} steps, so this is a "
                "resumed run: the weights are left as they are."
            )
            self._resume_in_place(model, optimizer)
            return
        if not model.built and keras.backend.backend() == "tensorflow":
            # Keras's TensorFlow `fit` builds a subclassed model as it traces the first step: build it
            # from the data's spec there, and act before that step runs.
            self._act_at_the_first_step(model)
            return
        self._act(model, optimizer)

    def _act_at_the_first_step(self, model):
        def first_step(iterator):
            x_spec = keras.tree.flatten(iterator.element_spec[0]) if isinstance(iterator.element_spec, tuple) else []
            if len(x_spec) != 1:
                raise ValueError(
                    f"UnitScaleCallback builds model '{model.name}' from its data, which must be one input "
                    f"tensor. Received: element_spec={iterator.element_spec!r}. Build the model before `fit`."
                )
            model.build(tuple(x_spec[0].shape))
            self._act(model, self._check_ready(model))
            model.make_train_function(force=True)
            return model.train_function(iterator)

        model.train_function = first_step

    def _act(self, model, optimizer):
        P.check_built(model)
        multiplied = [v.path for v in model.trainable_variables if weights.multiplier(v) != 1.0]
        if multiplied:
            self._say(
                "UnitScaleCallback: the model's layers already hold weight multipliers (for "
                f"{', '.join(multiplied[:3])}{', ...' if len(multiplied) > 3 else ''}): it was "
                "rescaled or converted before, so it is left as it is."
            )
            self._resume_in_place(model, optimizer)
            return
        converted = self._convert_plain_layers(model, optimizer) if self.mode == "unit" else []
        optimizer = optimizers.unwrap(model.optimizer)
        untagged = [v for v in model.trainable_variables if P.role_of(v) is None]
        # Roles the user gave with `tag_model(model, overrides)` are kept.
        roles = P.tag_model(model) if untagged else {v.path: P.role_of(v) for v in model.trainable_variables}
        selected = self._select(model, roles)
        per_variable = isinstance(optimizer, optimizers.UnitScaledOptimizer)
        if per_variable:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            optimizer.reset_lr_multipliers(untagged)
            if self._epsilon is not None:
                self._epsilon.install(optimizer)
        rows = self._rescale(model, optimizer, selected, roles, per_variable)
        global_lr_factor = None if per_variable else self._scale_global_lr(optimizer, rows)
        # Functions traced before now hold the old multipliers.
        model.make_train_function(force=True)
        model.test_function = model.predict_function = None
        self.record = {
            "mode": self.mode,
            "converted_layers": converted,
            "variables": rows,
            "global_lr_factor": global_lr_factor,
            "weight_factor": _geometric_mean([r["weight_factor"] for r in rows if r["weight_factor"]]),
            "lr_factor": global_lr_factor or _geometric_mean([r["lr_factor"] for r in rows if r["lr_factor"]]),
            # The class of ours whose gradient the script's loss took in place (`convert.loss.InPlaceLoss`), or None.
            "loss": None if self._loss is None else type(self._loss.ours).__name__,
            # Each matched weight's gradient ratio to the plain model's at `rows` rows, and its batch power.
            "epsilon": None if self._epsilon is None else {
                "rows": self._epsilon.reference_rows,
                "ratios": {path: (ratio, power) for path, ratio, power in self._epsilon.fitted.values()},
            },
        }
        object.__setattr__(model, _RECORD, self.record)
        self._acted = True
        self._report(rows, per_variable)

    def _resume_in_place(self, model, optimizer):
        """A model this callback converted in a run before, saved and loaded: the steps follow that run's again.

        The optimizer's state holds the epsilon batch rule the conversion set
        (`InPlaceEpsilon`); the model's `train_step` and `compute_loss`, which
        that run wrapped (to read each step's rows and give the script's loss
        our gradient), are Keras's again after loading: wrapped anew.
        """
        if "train_step" in vars(model) or not isinstance(optimizer, optimizers.UnitScaledOptimizer):
            return  # the same model object, still wrapped; or not ours
        if optimizer.epsilon_power is None:
            return
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        self._epsilon = epsilon.InPlaceEpsilon.resume(model, optimizer)
        if self._epsilon is None:
            return
        self._loss, _ = loss_conversion.InPlaceLoss.adopt(model)
        self._epsilon.loss = self._loss
        model.make_train_function(force=True)
        self._say("UnitScaleCallback: the epsilon batch rule of the run that converted this model is followed again"
                  + (", and its loss takes our gradient again." if self._loss else "."))

    def _convert_plain_layers(self, model, optimizer):
        """Turns the plain layers that have unit-scaled classes into them, in place; makes the optimizer ours.

        Their function is kept and, since each converted weight takes the
        learning-rate factor that keeps its step (`1/rms`, which only our
        optimizers read), so is the training: a Keras Adam, AdamW, RMSprop or
        Lion becomes ours in place, its state kept. SGD's step grows with the
        gradient, which the unit-scaled ops rescale: under SGD, and under
        optimizers we have no counterpart for, the plain layers stay as they are.
        """
        if isinstance(optimizer, optimizers.UnitScaledOptimizer):
            adoptable = optimizer.family != "sgd"
        else:
            counterpart = optimizer_conversion.counterpart(optimizer)
            adoptable = counterpart is not None and counterpart.family != "sgd"
        if not adoptable:
            return []
        family = optimizer if isinstance(optimizer, optimizers.UnitScaledOptimizer) else counterpart
        # Adam's and RMSprop's epsilon sees the gradient's scale, which the conversion changes: measured
        # before and after it (`InPlaceEpsilon`), so that the training stays the script's.
        probe = (self._epsilon_probe(model)
                 if family.epsilon_power is not None and in_place.plain_candidates(model) else None)
        converted, notes = in_place.convert_in_place(model)
        self._epsilon = probe if converted else None
        # The script's loss made ours too, where every gradient's new factor can be matched: epsilon takes it, and
        # Lion does not see it. Keras's loss divides its gradient by the rows it averages (batch × length per token).
        if converted and (probe is not None or family.epsilon_power is None):
            self._loss, why = loss_conversion.InPlaceLoss.adopt(model)
            if self._epsilon is not None:
                self._epsilon.loss = self._loss
            if why:
                self._say(f"UnitScaleCallback: the loss stays Keras's, its gradient divided by the rows it averages: {why}.")
        if converted and not isinstance(optimizer, optimizers.UnitScaledOptimizer):
            optimizer_conversion.adopt(optimizer)
        elif converted and optimizer.built:
            # Built before the layers were converted (JAX's and PyTorch's `fit` build it first): the
            # converted weights' fixed learning-rate factors are new.
            optimizer.reset_lr_multipliers(
                [variable for variable in model.trainable_variables if weights.lr_multiplier(variable) is not None])
        for name, why in notes:
            self._say(f"UnitScaleCallback: '{name}' stays as it is: {why}.")
        return converted

    def _epsilon_probe(self, model):
        try:
            return epsilon.InPlaceEpsilon(model, in_place.model_inputs(model))
        except Exception as error:  # a refinement of the step: the conversion goes on without it, and says so
            warnings.warn(
                f"UnitScaleCallback could not probe model '{model.name}' to match the optimizer's epsilon to the "
                f"converted layers' gradient scale ({type(error).__name__}: {error}). The training follows the "
                "script's up to epsilon, the one term of Adam's and RMSprop's step that sees a gradient's scale.",
                stacklevel=4,
            )
            return None

    def _rescale(self, model, optimizer, selected, roles, per_variable):
        owners = P.variable_owners(model)
        rows = []
        for variable in selected:
            values = ops.convert_to_numpy(variable).astype("float64")
            old_rms = float(np.sqrt(np.mean(values**2)))
            layer = owners.get(id(variable))
            # Our layers declare their weights' roles, and apply their weight multipliers.
            function_kept = weights.is_declared(variable)
            alpha = self._weight_factor(values)
            row = {
                "path": variable.path, "layer": layer.name if layer else None,
                "role": roles[variable.path].role, "old_rms": old_rms, "new_rms": old_rms,
                "weight_factor": alpha, "lr_factor": None, "function_kept": function_kept,
            }
            rows.append(row)
            if alpha is None:  # an all-zero tensor has no scale to set
                continue
            variable.assign(ops.cast(values * alpha, variable.dtype))
            row["new_rms"] = old_rms * alpha
            if row["function_kept"]:
                weights.set_multiplier(variable, weights.multiplier(variable) / alpha)
            beta = self._beta(alpha)
            row["lr_factor"] = beta
            if per_variable:
                optimizer.set_lr_multiplier(variable, optimizer.lr_multiplier(variable) * beta)
        return rows

    def _scale_global_lr(self, optimizer, rows):
        betas = [r["lr_factor"] for r in rows if r["lr_factor"] is not None]
        beta = _geometric_mean(betas)
        if betas and max(betas) / min(betas) > 1 + 1e-6:
            warnings.warn(
                "UnitScaleCallback: the learning-rate factors differ between variables "
                f"({min(betas):.3g} to {max(betas):.3g}), but {type(optimizer).__name__} has one "
                f"learning rate: it was multiplied by their geometric mean, {beta:.4g}. For the "
                "exact factor per variable use an optimizer of keras_unitscale.optimizers.",
                stacklevel=2,
            )
        if beta == 1.0:
            return beta
        schedule = optimizer._learning_rate
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            optimizer.learning_rate = optimizers.ScaledSchedule(schedule, beta)
        elif callable(schedule):
            optimizer.learning_rate = lambda: schedule() * beta
        else:
            optimizer.learning_rate = float(ops.convert_to_numpy(schedule)) * beta
        return beta

    def _report(self, rows, per_variable):
        if self._left_plain:
            warnings.warn(
                f"UnitScaleCallback left {len(self._left_plain)} plain Keras layer(s) as they are "
                f"({', '.join(self._left_plain)}): some layers have no unit-scaled class, some a unit-scaled "
                "output that nothing in place can take (an activation layer, a tanh Dense, an LSTM or a GRU), or the "
                "optimizer (SGD, or one with no counterpart in keras_unitscale.optimizers) cannot give their "
                "weights the learning-rate factors that keep the training (verbose=1 says which). Moving their "
                "weights would change the function.",
                stacklevel=3,
            )
        changed = sorted({r["layer"] for r in rows if not r["function_kept"] and r["weight_factor"] not in (None, 1.0)})
        if changed:
            warnings.warn(
                f"UnitScaleCallback rescaled the weights of {len(changed)} plain Keras layer(s) "
                f"({', '.join(changed)}). A plain layer has no multiplier to absorb the factor, so "
                "the model now computes a different function. Layers of keras_unitscale.layers "
                "keep the function (the factor moves into their multiplier).",
                stacklevel=3,
            )
        if not self.verbose:
            return
        width = max((len(r["path"]) for r in rows), default=8)
        lines = [
            f"UnitScaleCallback(mode={self.mode!r}): learning rate adjusted "
            + ("per variable" if per_variable else f"globally, × {self.record['global_lr_factor']:.4g}"),
            f"{'variable':<{width}}  {'role':<6}  {'RMS before':>10}  {'RMS after':>10}  {'weight ×':>9}  {'LR ×':>9}",
        ]
        for r in rows:
            if r["weight_factor"] is None:
                lines.append(f"{r['path']:<{width}}  {r['role']:<6}  {r['old_rms']:>10.4g}  (all zero: left alone)")
                continue
            lines.append(
                f"{r['path']:<{width}}  {r['role']:<6}  {r['old_rms']:>10.4g}  {r['new_rms']:>10.4g}  "
                f"{r['weight_factor']:>9.4g}  {r['lr_factor']:>9.4g}"
            )
        io_utils.print_msg("\n".join(lines))

    def on_epoch_end(self, epoch, logs=None):
        if self._acted and logs is not None:
            logs["unit_scale_weight_factor"] = self.record["weight_factor"]
            logs["unit_scale_lr_factor"] = self.record["lr_factor"]
