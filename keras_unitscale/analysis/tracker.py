"""`ScaleTracker`: a callback that records where a model's numbers live while `fit` trains it."""

import math
import warnings

import keras
from keras import ops

from keras_unitscale import analysis
from keras_unitscale import checks

__all__ = ["ScaleTracker"]


class ScaleTracker(keras.callbacks.Callback):
    """Records where the model's numbers live every `every` steps of `fit`.

    At step 1 and every `every` steps it takes a scale report of the model
    on a fixed batch `x` (and `y`, through the compiled loss) — each layer's
    output and gradient RMS, each weight's and its gradient's, and what
    FP16/FP8 would lose of them — with an `analysis.ScaleReporter` traced
    once per `fit`. Keras callbacks do not see the training batches, so
    without `x` it records the weights only.

    At the end of each epoch it adds to the `History` logs the extremes of
    the last report: `scale_min_log2_rms`, `scale_max_log2_rms` (over
    activations and gradients, or the weights) and, per format, the largest
    fraction of a tensor that would underflow (`scale_e4m3_underflow`, ...).
    With `log_dir`, every report also goes to TensorBoard: each tensor's
    log2 RMS as a scalar and each weight's values as a histogram (this needs
    TensorFlow installed, whatever the backend).

    The first tensor that is not finite is reported by name, once
    (`tracker.first_non_finite`); with `stop_on_non_finite=True` training
    stops there. The loss is watched at every step: when it turns
    non-finite (bad data, an exploding learning rate) the report is taken
    at once, and names the first layer whose weights or outputs the
    update has made non-finite.

    Args:
        every: steps between reports (a positive integer).
        log_dir: a TensorBoard log directory, or None.
        x: the inputs of a fixed batch to measure on.
        y: the batch's targets (optional).
        stop_on_non_finite: stop training at the first non-finite tensor.

    Examples:
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d")])
        >>> model.compile("sgd", "mse")
        >>> x, y = np.ones((16, 8), "float32"), np.zeros((16, 4), "float32")
        >>> tracker = ScaleTracker(every=2, x=x[:4], y=y[:4])
        >>> history = model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[tracker])
        >>> [step for step, _ in tracker.reports], "scale_e4m3_underflow" in history.history
        ([1, 2, 4], True)
    """

    def __init__(self, every=100, log_dir=None, x=None, y=None, stop_on_non_finite=False):
        super().__init__()
        self.every = checks.positive_int("every", every)
        self.log_dir = log_dir
        self.x, self.y = x, y
        self.stop_on_non_finite = bool(stop_on_non_finite)
        self.reports = []
        self.first_non_finite = None
        self._step = 0
        self._writer = None
        self._reporter = None

    def get_config(self):
        """The constructor's arguments (the batch `x`, `y` as given): `from_config` makes the same tracker."""
        return {"every": self.every, "log_dir": self.log_dir, "x": self.x, "y": self.y,
                "stop_on_non_finite": self.stop_on_non_finite}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def on_train_begin(self, logs=None):
        # Traced afresh for each fit: callbacks before it may have changed the layers.
        self._reporter = None
        if self.log_dir is not None and self._writer is None:
            try:
                import tensorflow as tf
            except ImportError as error:
                raise ImportError(
                    "ScaleTracker writes TensorBoard logs with TensorFlow's summary writer: "
                    f"pip install tensorflow, or pass log_dir=None. Received: log_dir={self.log_dir!r}"
                ) from error
            self._writer = tf.summary.create_file_writer(str(self.log_dir))

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        loss = (logs or {}).get("loss")
        # A non-finite loss (bad data, an exploding learning rate) is reported at once, not at the next interval.
        diverged = self.first_non_finite is None and loss is not None and not math.isfinite(float(loss))
        if diverged or self._step == 1 or self._step % self.every == 0:
            self._measure()
        if diverged and self.first_non_finite is None:
            self.first_non_finite = {"step": self._step, "layer": None, "tensor": "loss"}
            warnings.warn(
                f"ScaleTracker: at step {self._step} the loss is {float(loss)}, but every tracked "
                "tensor is finite (the bad values are in this step's batch).",
                stacklevel=2,
            )
            if self.stop_on_non_finite:
                self.model.stop_training = True

    def _report(self, model):
        if self.x is None:
            return analysis.weight_report(model)
        if self._reporter is None:
            self._reporter = analysis.ScaleReporter(model, jit_compile=True)
        return self._reporter(self.x, self.y)

    def _measure(self):
        model = self.model
        report = self._report(model)
        self.reports.append((self._step, report))
        if self.first_non_finite is None:
            bad = next((row for row in report.rows if not row["finite"]), None)
            if bad is not None:
                self.first_non_finite = {"step": self._step, "layer": bad["layer"], "tensor": bad["tensor"]}
                warnings.warn(
                    f"ScaleTracker: at step {self._step} the first non-finite tensor is "
                    f"{bad['layer']} {bad['tensor']}.",
                    stacklevel=2,
                )
                if self.stop_on_non_finite:
                    model.stop_training = True
        if self._writer is not None:
            self._write(model, report)

    def _write(self, model, report):
        import tensorflow as tf

        with self._writer.as_default(step=self._step):
            for row in report.rows:
                if row["rms"] > 0 and row["finite"]:
                    tf.summary.scalar(f"log2_rms/{row['layer']}/{row['tensor']}", math.log2(row["rms"]))
            for variable in model.trainable_variables:
                tf.summary.histogram(f"weights/{variable.path}", ops.convert_to_numpy(variable))
        self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        if not self.reports or logs is None:
            return
        report = self.reports[-1][1]
        tracked = [r for r in report.rows if r["kind"] != analysis.WEIGHT] or report.rows
        log2 = [math.log2(r["rms"]) for r in tracked if r["rms"] > 0 and r["finite"]]
        if log2:
            logs["scale_min_log2_rms"] = min(log2)
            logs["scale_max_log2_rms"] = max(log2)
        for fmt in report.formats:
            logs[f"scale_{fmt.lower()}_underflow"] = report.underflow(fmt)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
