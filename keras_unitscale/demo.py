"""`keras-unitscale demo`: standard Keras models in low precision, beside the same models unit-scaled.

Two tasks, on data that ships with the installed packages:

- a Sequential MLP (Dense 128 relu → Dense 64 relu → Dense 1 sigmoid) on
  scikit-learn's breast-cancer data, 80% training and 20% validation,
  trained as written ("plain Keras"), with `UnitScaleCallback` added to its
  `fit`, and built from `keras_unitscale.layers`;
- a character-level transformer LM (`models.transformer_lm`) on the English
  text of Python's `pydoc_data.topics`, built from `keras.layers` with
  Keras's defaults and from `keras_unitscale.layers` with u-μP.

Each trains in float32, in FP16 without loss scaling (`mixed_float16`,
`compile(auto_scale_loss=False)`) and in simulated scale-free FP8: every
matmul's inputs cast to E4M3 and the gradient at its output to E5M2, with
no per-tensor scale (`precision.fp8` for our layers, `precision.simulate_fp8`
for Keras's). All runs of a task start from the same seed and see the same
batches. Then, for each run: the validation loss (and accuracy, or bits per
character), how far it lands from the same model's float32 run, and the
fraction of gradients and activations that the run's format flushes to
zero, measured on a validation batch with the trained weights in float32.

It writes `results.json` (everything), `loss_curves.png` and `scales.png`
(the float32 models' tensor scales against the FP16 and FP8 ranges).
"""

import dataclasses
import json
import math
import os
import time
import warnings

import keras
import numpy as np

from keras_unitscale import analysis
from keras_unitscale import callbacks
from keras_unitscale import checks
from keras_unitscale import experiments
from keras_unitscale import formats as F
from keras_unitscale import losses
from keras_unitscale import models
from keras_unitscale import optimizers
from keras_unitscale import precision
from keras_unitscale.plotting import new_figure

__all__ = ["Settings", "DEFAULT", "QUICK", "run", "load_breast_cancer"]

PRECISIONS = ("float32", "fp16", "fp8")
PRECISION_LABELS = {"float32": "float32", "fp16": "FP16, no loss scaling", "fp8": "FP8, no scales"}
# The formats a run's tensors must fit: (activations, gradients).
RUN_FORMATS = {"fp16": (F.FP16, F.FP16), "fp8": (F.E4M3, F.E5M2)}
# Within this of the same model's float32 loss, a low-precision run "lands".
TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much each task trains: `steps` is the transformer LM's, `mlp_steps` the MLP's.

    Examples:
        >>> QUICK.with_steps(25).steps, DEFAULT.steps, DEFAULT.mlp_steps
        (25, 200, 150)
    """

    steps: int = 200
    mlp_steps: int = 150
    batch: int = 32
    seq_len: int = 64
    width: int = 64
    depth: int = 2
    head_dim: int = 16
    report_batch: int = 16

    def with_steps(self, steps):
        return dataclasses.replace(self, steps=checks.positive_int("steps", steps))


DEFAULT = Settings()
QUICK = Settings(steps=40, mlp_steps=30, seq_len=32, width=32, depth=1, report_batch=8)


# -- the tasks ---------------------------------------------------------------------------------------------------


def load_breast_cancer():
    """Standardised features and 0/1 labels, shipped with scikit-learn (no download)."""
    try:
        from sklearn.datasets import load_breast_cancer as load
    except ImportError as error:
        raise SystemExit(
            "The demo needs scikit-learn's bundled data: pip install 'keras-unitscale[demo]'"
        ) from error
    data = load()
    x = data.data.astype("float32")
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x, data.target.astype("float32")


def _breast_cancer_split(seed):
    """80% trains, 20% validates."""
    x, y = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, validation = order[:cut], order[cut:]
    return (x[train], y[train, None]), (x[validation], y[validation, None])


def _repeat_epochs(x, y, examples, seed):
    """`examples` rows: shuffled passes over `(x, y)`, one after another."""
    rng = np.random.default_rng(seed)
    passes = math.ceil(examples / len(x))
    order = np.concatenate([rng.permutation(len(x)) for _ in range(passes)])[:examples]
    return x[order], y[order]


@dataclasses.dataclass
class _Task:
    """One model family, its data, and the ways of building it: "plain" Keras, and unit-scaled ones.

    A task also has `build(variant)` (the model), `compile_args(variant)`
    (optimizer and loss) and `evaluate(loss, y, outputs)` (`validation_loss`
    and `metric` of the model's outputs on the validation set).
    """

    name: str
    title: str
    variants: dict  # variant → label
    steps: int
    train: tuple
    validation: tuple
    metric: str  # what the table shows beside the loss

    def uses_our_layers(self, variant):
        """Whether `variant` trains in our layers: built from them, or converted in place by `UnitScaleCallback`
        before its first step. FP8 reaches those through `precision.fp8`; a plain model's matmuls are cast by
        `precision.simulate_fp8` (whose copies the callback would not convert: a plain FP8 run, mislabelled)."""
        return variant != "plain"

    def fit_callbacks(self, variant):
        return []


class _SeedMLP(_Task):
    def __init__(self, settings, seed):
        (x, y), validation = _breast_cancer_split(seed)
        super().__init__(
            name="mlp",
            title="MLP (Dense 128-64-1) on breast-cancer data",
            variants={"plain": "plain Keras", "callback": "+ UnitScaleCallback", "ours": "keras_unitscale.layers"},
            steps=settings.mlp_steps,
            train=_repeat_epochs(x, y, settings.mlp_steps * settings.batch, seed),
            validation=validation,
            metric="accuracy",
        )

    def build(self, variant):
        return models.mlp(self.train[0].shape[1], parametrization="u-mup" if variant == "ours" else "standard",
                          name="seed000")

    def compile_args(self, variant):
        if variant == "ours":
            return {"optimizer": optimizers.Adam(2.0**-5), "loss": losses.BinaryCrossentropy()}
        return {"optimizer": keras.optimizers.Adam(1e-3), "loss": keras.losses.BinaryCrossentropy()}

    def fit_callbacks(self, variant):
        return [callbacks.UnitScaleCallback(verbose=0)] if variant == "callback" else []

    def evaluate(self, loss, y, outputs):
        probabilities = keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))
        return {"validation_loss": float(loss(y, outputs)),
                "accuracy": float(np.mean((probabilities > 0.5) == (y > 0.5)))}


class _CharTransformer(_Task):
    def __init__(self, settings, seed):
        train, validation, vocabulary = experiments.char_lm_data(
            settings.seq_len, settings.steps * settings.batch, 8 * settings.batch, seed=seed)
        super().__init__(
            name="transformer",
            title=f"character transformer LM ({settings.depth} block{'s' * (settings.depth > 1)}, width {settings.width}) "
                  "on pydoc_data.topics",
            variants={"plain": "keras.layers", "ours": "keras_unitscale.layers"},
            steps=settings.steps,
            train=train,
            validation=validation,
            metric="bits/char",
        )
        self.settings = settings
        self.vocabulary_size = len(vocabulary)

    def build(self, variant):
        s = self.settings
        return models.transformer_lm(self.vocabulary_size, s.width, s.depth, head_dim=s.head_dim, seq_len=s.seq_len,
                                     parametrization="u-mup" if variant == "ours" else "standard")

    def compile_args(self, variant):
        if variant == "ours":
            # u-μP's transformer optimum from benchmarks/lr_transfer.py.
            return {"optimizer": optimizers.Adam(2.0**-3),
                    "loss": losses.SparseCategoricalCrossentropy(from_logits=True)}
        return {"optimizer": keras.optimizers.Adam(1e-3),
                "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}

    def evaluate(self, loss, y, outputs):
        value = float(loss(y, outputs))
        return {"validation_loss": value, "bits/char": value / math.log(2)}


# -- one run -----------------------------------------------------------------------------------------------------


class _Progress(keras.callbacks.Callback):
    """Moves one progress bar across all the runs' training steps."""

    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def on_train_batch_end(self, batch, logs=None):
        self.bar.add(1)


def _chunk(steps, points=25):
    """Steps per recorded loss: the largest divisor of `steps` that gives at least `points` points."""
    return max(d for d in range(1, max(1, steps // points) + 1) if steps % d == 0)


def _train(task, variant, mode, settings, bar):
    keras.config.set_dtype_policy("mixed_float16" if mode == "fp16" else "float32")
    try:
        keras.utils.set_random_seed(0)
        model = task.build(variant)
        if mode == "fp8" and not task.uses_our_layers(variant):
            model = precision.simulate_fp8(model)
        chunk = _chunk(task.steps)
        (x, y), (x_validation, y_validation) = task.train, task.validation
        started = time.perf_counter()
        with precision.fp8(enabled=mode == "fp8" and task.uses_our_layers(variant), critical=True), \
                warnings.catch_warnings():
            # UnitScaleCallback's warnings (a plain layer's function changes; one global learning
            # rate for several factors) are the subject of docs/guides/callback-and-optimizers.md, not the demo's.
            warnings.filterwarnings("ignore", message="UnitScaleCallback", category=UserWarning)
            compile_args = task.compile_args(variant)
            model.compile(**compile_args, auto_scale_loss=False)
            # Built here, not inside the first trace of the step, which would make TensorFlow trace it twice.
            model.optimizer.build(model.trainable_variables)
            history = model.fit(x, y, batch_size=settings.batch, epochs=task.steps // chunk, steps_per_epoch=chunk,
                                shuffle=False, verbose=0, callbacks=task.fit_callbacks(variant) + [_Progress(bar)])
            # One eager pass over the validation set: tracing `evaluate` would cost more than the pass.
            outputs = model(x_validation, training=False)
            evaluation = task.evaluate(compile_args["loss"], y_validation, outputs)
        seconds = time.perf_counter() - started
        weights = model.get_weights()
    finally:
        keras.config.set_dtype_policy("float32")
    losses_ = [float(v) for v in history.history["loss"]]
    return {
        "task": task.name, "variant": variant, "precision": mode,
        "label": f"{task.variants[variant]}, {PRECISION_LABELS[mode]}",
        **evaluation, "finite": bool(np.isfinite(evaluation["validation_loss"])), "seconds": seconds,
        "curve": {"step": [chunk * (i + 1) for i in range(len(losses_))], "loss": losses_},
    }, weights


def _not_run(task, variant, mode, error):
    return {"task": task.name, "variant": variant, "precision": mode,
            "label": f"{task.variants[variant]}, {PRECISION_LABELS[mode]}",
            "error": experiments.describe_failure(error), "finite": False}


def _scale_report(task, variant, weights, x, y):
    """The trained weights, in float32 (so nothing is flushed yet), on one validation batch."""
    model = task.build(variant)
    model.set_weights(weights)
    return analysis.scale_report(model, x, y, loss=task.compile_args(variant)["loss"])


# -- results -----------------------------------------------------------------------------------------------------


def _relative(rows):
    """Each row's validation loss against the float32 run of the same task and variant."""
    base = {(r["task"], r["variant"]): r["validation_loss"] for r in rows
            if r["precision"] == "float32" and "error" not in r}
    for row in rows:
        reference = base.get((row["task"], row["variant"]))
        row["vs_float32"] = None if reference is None or "error" in row else row["validation_loss"] / reference - 1


def _percent(value):
    if value is None:
        return ""
    return "0" if value == 0 else f"{100 * value:.2g}%"


def _goals(rows):
    """Whether each unit-scaled low-precision run lands within `TOLERANCE` of its float32 loss (None: not run)."""
    return {f"{r['task']} {r['variant']} {r['precision']}":
            None if r["vs_float32"] is None else bool(r["finite"] and abs(r["vs_float32"]) <= TOLERANCE)
            for r in rows if r["variant"] != "plain" and r["precision"] != "float32"}


def _table(tasks, rows):
    lines = []
    for task in tasks:
        group = [r for r in rows if r["task"] == task.name]
        lines += [f"== {task.title}: {task.steps} steps ==",
                  f"{'run':<46}{'val loss':>9}{task.metric:>10}{'vs f32':>8}{'grad uf':>9}{'act uf':>8}{'s':>6}"]
        for row in group:
            if "error" in row:
                lines.append(f"{row['label']:<46} not run: {row['error']}")
                continue
            change = "" if row["vs_float32"] is None else f"{100 * row['vs_float32']:+.1f}%"
            lines.append(
                f"{row['label']:<46}{row['validation_loss']:>9.4f}{row[task.metric]:>10.4f}{change:>8}"
                f"{_percent(row.get('gradient_underflow')):>9}{_percent(row.get('activation_underflow')):>8}"
                f"{row['seconds']:>6.1f}")
        lines.append("")
    landed = _goals(rows)
    lines.append(f"unit-scaled runs within {100 * TOLERANCE:.0f}% of their float32 loss: " + ", ".join(
        f"{name} {'not run' if ok is None else 'yes' if ok else 'NO'}" for name, ok in landed.items()))
    lines.append("grad uf, act uf: the fraction of the layer outputs' gradients, and of the layer outputs, that the "
                 "run's format would flush to zero (FP16; FP8: E5M2 for gradients, E4M3 for outputs), "
                 "averaged over layers; none for the callback's runs, whose model it converts as it trains")
    return "\n".join(lines)


def _plot_loss_curves(tasks, rows, path):
    figure, all_axes = new_figure("demo.plot_loss_curves", (12, 4.5), ncols=len(tasks), squeeze=False)
    styles = {"float32": "-", "fp16": "--", "fp8": ":"}
    colors = {"plain": "tab:gray", "callback": "tab:orange", "ours": "tab:blue"}
    for axes, task in zip(all_axes[0], tasks):
        for row in (r for r in rows if r["task"] == task.name and "error" not in r):
            axes.plot(row["curve"]["step"], row["curve"]["loss"], styles[row["precision"]],
                      color=colors[row["variant"]], label=row["label"])
        axes.set_title(task.title, fontsize=9)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _plot_scale_reports(reports, path):
    figure, all_axes = new_figure("demo.plot_scale_reports", (14, 4.8 * math.ceil(len(reports) / 2)),
                                  nrows=math.ceil(len(reports) / 2), ncols=2, squeeze=False)
    for axes, (title, report) in zip(all_axes.flat, reports.items()):
        analysis.plot_scales(report, axes=axes)
        axes.set_title(title, fontsize=9)
    for axes in list(all_axes.flat)[len(reports):]:
        axes.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


# -- the job -----------------------------------------------------------------------------------------------------


def run(out_dir="unitscale-demo", settings=DEFAULT, seed=0, print_fn=print):
    """Trains every run, prints the table, and writes `results.json`, `loss_curves.png` and `scales.png`.

    Args:
        out_dir: the output directory (made if missing).
        settings: a `Settings` (`DEFAULT`, `QUICK`, or your own).
        seed: the data split's and batches' seed (every model starts from seed 0).

    Returns:
        The results' rows, one dict per run.
    """
    started = time.perf_counter()
    tasks = [_SeedMLP(settings, seed), _CharTransformer(settings, seed)]
    runs = [(task, variant, mode) for task in tasks for variant in task.variants for mode in PRECISIONS]
    print_fn(f"keras_unitscale demo on {keras.backend.backend()}: {len(runs)} runs, "
             f"{' and '.join(t.title for t in tasks)}")
    if keras.backend.backend() == "tensorflow":
        print_fn("(On the FP8 runs TensorFlow's graph optimizer may log 'Converting f8E5M2 to DataType': "
                 "it skips one optimisation of those graphs, which still run correctly.)")
    bar = keras.utils.Progbar(sum(task.steps for task, _, _ in runs), interval=0.5, unit_name="step")
    rows, reports, steps_done = [], {}, 0
    for task, variant, mode in runs:
        steps_done += task.steps
        try:
            row, weights = _train(task, variant, mode, settings, bar)
        except Exception as error:  # a backend that cannot run it (JAX's CPU: no float16 attention): say so
            bar.update(steps_done)
            rows.append(_not_run(task, variant, mode, error))
            continue
        rows.append(row)
        if variant == "callback":  # its model is converted as it trains; `_scale_report` rebuilds the task's model
            continue
        x, y = (part[: settings.report_batch] for part in task.validation)
        report = _scale_report(task, variant, weights, x, y)
        if mode in RUN_FORMATS:
            row.update(report.lost_fractions(*RUN_FORMATS[mode]))
        if mode == "float32":
            reports[f"{task.title}: {task.variants[variant]}, trained, float32"] = report
    _relative(rows)
    text = _table(tasks, rows)
    print_fn("\n" + text)

    os.makedirs(out_dir, exist_ok=True)
    _plot_loss_curves(tasks, rows, os.path.join(out_dir, "loss_curves.png"))
    _plot_scale_reports(reports, os.path.join(out_dir, "scales.png"))
    seconds = time.perf_counter() - started
    with open(os.path.join(out_dir, "results.json"), "w") as file:
        json.dump({
            "backend": keras.backend.backend(), "settings": dataclasses.asdict(settings), "seed": seed,
            "seconds": seconds, "goals": _goals(rows), "rows": rows,
            "scale_reports": {title: report.to_dicts() for title, report in reports.items()},
        }, file, indent=1)
    print_fn(f"{seconds:.0f} s. Wrote results.json, loss_curves.png and scales.png in {out_dir}")
    return rows
