"""Learning-rate sweeps: train one model per learning rate, the same way, and compare.

u-μP's promise is that the best learning rate found on a small model is the
best on a wide or deep one. `lr_sweep(build_model, learning_rates, train,
validation)` measures it for any model: it trains a fresh model per learning
rate from the same seed on the same batches and records its validation
loss. Sweeps of several models (widths, depths, parametrizations) add up
(`sweep_a + sweep_b`); `SweepResult` prints them as a table, names each
label's optimum, saves CSV/JSON and plots one curve per label.

`pydoc_text()` and `char_lm_data(...)` give a small real text task that
ships with Python: the English help topics of the `pydoc_data` module.
"""

import csv
import json
import math

import keras
import numpy as np

from keras_unitscale import checks
from keras_unitscale import losses
from keras_unitscale import optimizers
from keras_unitscale.plotting import new_figure

__all__ = ["SweepResult", "lr_sweep", "pydoc_text", "char_lm_data", "StepLosses"]


def describe_failure(error):
    """`"<type>: <first line of its message>"`: how a table says why a run it asked for did not run."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


class StepLosses(keras.callbacks.Callback):
    """Each training step's own loss, from the epoch's running mean that Keras logs.

    Examples:
        >>> recorder = StepLosses()
        >>> recorder.on_train_begin()
        >>> for mean in (3.0, 2.5, 2.0):  # Keras logs the mean of the steps so far
        ...     recorder.on_train_batch_end(0, {"loss": mean})
        >>> recorder.losses().tolist()
        [3.0, 2.0, 1.0]
    """

    def on_train_begin(self, logs=None):
        self.means = []

    def on_train_batch_end(self, batch, logs=None):
        self.means.append(float(logs["loss"]))  # reading the loss waits for the step to finish

    def losses(self):
        """The steps' own losses, float64 (one epoch's steps: Keras restarts the mean each epoch)."""
        means = np.asarray(self.means, "float64")
        steps = np.arange(1, len(means) + 1)
        return means * steps - np.concatenate([[0.0], means[:-1] * steps[:-1]])


def pydoc_text():
    """The English text of Python's help topics (`pydoc_data.topics`), about 0.5 MB.

    Examples:
        >>> text = pydoc_text()
        >>> len(text) > 400_000, "assignment statement" in text
        (True, True)
    """
    from pydoc_data import topics

    return "\n".join(topics.topics[key] for key in sorted(topics.topics))


def char_lm_data(seq_len, train_sequences, validation_sequences, text=None, seed=0):
    """Character-level language-model windows: the first 90% of the text trains, the rest validates.

    Args:
        seq_len: characters per example; targets are the inputs shifted by one.
        train_sequences: windows drawn at random from the training part.
        validation_sequences: windows spread evenly over the validation part.
        text: the text (default `pydoc_text()`).
        seed: for the training windows.

    Returns:
        `((x_train, y_train), (x_validation, y_validation), vocabulary)`:
        int32 arrays of shape `(n, seq_len)`, and the characters in id order.

    Examples:
        >>> (x, y), (xv, yv), vocabulary = char_lm_data(32, 8, 4)
        >>> x.shape, xv.shape, bool((x[:, 1:] == y[:, :-1]).all()), len(vocabulary) > 60
        ((8, 32), (4, 32), True, True)
    """
    checks.positive_int("seq_len", seq_len)
    checks.positive_int("train_sequences", train_sequences)
    checks.positive_int("validation_sequences", validation_sequences)
    text = pydoc_text() if text is None else text
    vocabulary = sorted(set(text))
    index = {char: i for i, char in enumerate(vocabulary)}
    ids = np.array([index[char] for char in text], "int32")
    split = int(0.9 * len(ids))
    train, validation = ids[:split], ids[split:]
    if len(validation) <= seq_len + 1:
        raise ValueError(f"The text is too short for windows of {seq_len}. Received: {len(text)} characters")
    starts = np.random.default_rng(seed).integers(0, len(train) - seq_len - 1, train_sequences)
    validation_starts = np.linspace(0, len(validation) - seq_len - 2, validation_sequences).astype(int)

    def windows(source, starts):
        rows = np.stack([source[s: s + seq_len + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]

    return windows(train, starts), windows(validation, validation_starts), vocabulary


def lr_sweep(build_model, learning_rates, train, validation, steps=200, batch_size=32, optimizer=None, loss=None,
             label="", seed=0, verbose=1):
    """Trains a fresh `build_model()` for `steps` steps at each learning rate; returns the validation losses.

    Every run starts from `keras.utils.set_random_seed(seed)` and sees the
    same batches in the same order, so the learning rate is the only
    difference. A run that diverges records a validation loss of NaN.

    Args:
        build_model: a function returning an uncompiled Keras model.
        learning_rates: the base learning rates to try.
        train: `(x, y)` arrays (`x` may be a dict of arrays, as a KerasHub
            model takes); training cycles through `train`.
        validation: `(x, y)` arrays.
        steps: the training budget of each run, in steps.
        batch_size: the training budget of each run: its batch size.
        optimizer: a function `learning_rate -> optimizer` (default
            `keras_unitscale.optimizers.Adam`, which applies u-μP's
            per-weight factors; pass `keras.optimizers.Adam` for a
            standard-parametrized model).
        loss: the loss (default our unit-scaled sparse categorical
            cross-entropy on logits; its value is the usual mean).
        label: names this sweep's curve (e.g. "width 256").
        seed: the seed of every run.
        verbose: 1 shows a progress bar over the runs, 0 nothing.

    Returns:
        A `SweepResult`.

    Examples:
        >>> from keras_unitscale import models
        >>> (x, y), validation, vocabulary = char_lm_data(16, 64, 16)
        >>> result = lr_sweep(lambda: models.lstm_lm(len(vocabulary), width=16, seq_len=16),
        ...                   [2.0**-4, 2.0**-2], (x, y), validation, steps=4, batch_size=16, verbose=0)
        >>> [row["learning_rate"] for row in result.rows], result.labels
        ([0.0625, 0.25], [''])
    """
    learning_rates = [float(checks.positive("learning_rates", lr)) for lr in learning_rates]
    if not learning_rates:
        raise ValueError("`learning_rates` must name at least one learning rate. Received: []")
    checks.positive_int("steps", steps)
    checks.positive_int("batch_size", batch_size)
    optimizer = optimizer or optimizers.Adam
    loss = loss or losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = train
    y = np.asarray(y)
    order = np.resize(np.arange(len(y)), steps * batch_size)
    # `x` may be a dict of arrays (a KerasHub model's token ids and padding mask): each is reordered alike.
    x, y = keras.tree.map_structure(lambda a: np.asarray(a)[order], x), y[order]
    progress = (keras.utils.Progbar(len(learning_rates), unit_name="run", stateful_metrics=["log2 lr", "val loss"])
                if verbose else None)
    rows = []
    for learning_rate in learning_rates:
        rows.append({
            "label": label, "learning_rate": learning_rate, "log2_learning_rate": math.log2(learning_rate),
            **_one_run(build_model, optimizer(learning_rate), loss, (x, y), validation, batch_size, seed),
        })
        if progress is not None:
            progress.add(1, values=[("log2 lr", math.log2(learning_rate)), ("val loss", rows[-1]["validation_loss"])])
    return SweepResult(rows)


def _one_run(build_model, optimizer, loss, train, validation, batch_size, seed):
    """One run of a sweep: a fresh model from `seed`, one pass over `train`, then the validation loss."""
    keras.utils.set_random_seed(seed)
    model = build_model()
    model.compile(optimizer=optimizer, loss=loss)
    # Built here, not inside the first trace of the step, which would make TensorFlow trace it twice.
    model.optimizer.build(model.trainable_variables)
    history = model.fit(*train, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    # By name: a model compiled with metrics (a KerasHub task adds accuracy) returns them beside the loss.
    validation_loss = float(model.evaluate(*validation, batch_size=batch_size, verbose=0, return_dict=True)["loss"])
    return {
        "validation_loss": validation_loss if math.isfinite(validation_loss) else math.nan,
        "train_loss": float(history.history["loss"][-1]),
        "parameters": int(model.count_params()),
    }


class SweepResult:
    """The validation loss of each (label, learning rate) run of `lr_sweep`; sweeps add up.

    Examples:
        >>> rows = [{"label": f"width {w}", "learning_rate": 2.0**k, "log2_learning_rate": k,
        ...          "validation_loss": (k + 3) ** 2 + w / 100} for w in (64, 128) for k in (-4, -3, -2)]
        >>> result = SweepResult(rows[:3]) + SweepResult(rows[3:])
        >>> result.labels, result.optima()
        (['width 64', 'width 128'], {'width 64': 0.125, 'width 128': 0.125})
    """

    def __init__(self, rows):
        self.rows = list(rows)

    def __add__(self, other):
        if not isinstance(other, SweepResult):
            return NotImplemented
        return SweepResult(self.rows + other.rows)

    @property
    def labels(self):
        return list(dict.fromkeys(row["label"] for row in self.rows))

    def curve(self, label):
        """`(learning rates, validation losses)` of one label, by learning rate."""
        rows = sorted((r for r in self.rows if r["label"] == label), key=lambda r: r["learning_rate"])
        if not rows:
            raise ValueError(f"No runs labelled {label!r}. The labels are {self.labels}")
        return [r["learning_rate"] for r in rows], [r["validation_loss"] for r in rows]

    def best(self, label):
        """The row of `label` with the lowest validation loss (diverged runs never win)."""
        rows = [r for r in self.rows if r["label"] == label and math.isfinite(r["validation_loss"])]
        if not rows:
            raise ValueError(f"Every run labelled {label!r} diverged or none exists. The labels are {self.labels}")
        return min(rows, key=lambda r: r["validation_loss"])

    def optima(self):
        """{label: the learning rate with the lowest validation loss}."""
        return {label: self.best(label)["learning_rate"] for label in self.labels}

    def to_dicts(self):
        return [dict(row) for row in self.rows]

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump({"rows": self.to_dicts(), "optima": self.optima()}, f, indent=1)

    def to_csv(self, path):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)

    def __str__(self):
        """Validation loss by log2 learning rate (rows) and label (columns); * marks each optimum."""
        labels = self.labels
        learning_rates = sorted({r["learning_rate"] for r in self.rows})
        best = {label: self.best(label)["learning_rate"] for label in labels if self._any_finite(label)}
        loss = {(r["label"], r["learning_rate"]): r["validation_loss"] for r in self.rows}
        width = max([12] + [len(str(label)) + 1 for label in labels])
        lines = ["log2 lr " + "".join(f"{str(label):>{width}}" for label in labels)]
        for lr in learning_rates:
            cells = []
            for label in labels:
                value = loss.get((label, lr))
                text = "" if value is None else ("diverged" if math.isnan(value) else f"{value:.4f}")
                cells.append(f"{text + ('*' if best.get(label) == lr else ' '):>{width}}")
            lines.append(f"{math.log2(lr):>7g} " + "".join(cells))
        return "\n".join(lines)

    def _any_finite(self, label):
        return any(r["label"] == label and math.isfinite(r["validation_loss"]) for r in self.rows)

    def plot(self, path=None, title="Validation loss against learning rate"):
        """One curve per label: validation loss against log2 learning rate, each optimum marked."""
        figure, axes = new_figure("SweepResult.plot", figsize=(7.0, 4.5))
        for label in self.labels:
            lrs, values = self.curve(label)
            line, = axes.plot([math.log2(lr) for lr in lrs], values, marker="o", label=str(label))
            if self._any_finite(label):
                best = self.best(label)
                axes.plot([best["log2_learning_rate"]], [best["validation_loss"]], marker="*", markersize=14,
                          color=line.get_color())
        finite = [r["validation_loss"] for r in self.rows if math.isfinite(r["validation_loss"])]
        if finite:
            # Runs far off their optimum (or diverged) would flatten the curves that matter.
            low, high = min(finite), min(max(finite), 1.5 * min(finite))
            axes.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        axes.set_xlabel("log2 learning rate")
        axes.set_ylabel("validation loss")
        axes.set_title(title)
        axes.legend(fontsize=8)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=100)
        return figure
