"""Where a model's numbers live: per-layer scales, and what FP16 and FP8 would lose of them.

`scale_report(model, x)` runs one forward and one backward pass of any built
Keras model (plain or ours) and measures, for every layer, the RMS of its
output and of the gradient arriving at that output, and for every weight its
RMS and its gradient's; for each of FP16, BF16, FP8 E4M3 and E5M2 it counts
the fraction of each tensor's elements that the format would flush to zero
(underflow) or could not hold (saturation). `plot_scales(report)` draws it.

The gradient arriving at each layer's output is measured by adding a zero
"probe" to the output as the model's graph runs (Keras's own graph runner,
`Functional._run_through_graph`): the probe's gradient is the output's. A
subclassed model has no graph to run through; its report holds its weights,
their gradients and its output.

`coord_check` and `plot_coord_check` (from `keras_unitscale.coord_check`)
ask the other question: does each layer keep its size as the model widens?
"""

import inspect
import json
import math

import keras
import numpy as np
from keras import ops

from keras_unitscale import checks
from keras_unitscale import formats as F
from keras_unitscale import parametrization as P
from keras_unitscale import autodiff as A
from keras_unitscale.coord_check import CoordCheck
from keras_unitscale.coord_check import coord_check
from keras_unitscale.coord_check import plot_coord_check
from keras_unitscale.plotting import new_figure

__all__ = [
    "ScaleReport", "ScaleReporter", "scale_report", "weight_report", "plot_scales", "analyze_file",
    "CoordCheck", "coord_check", "plot_coord_check",
]

ACTIVATION, GRADIENT, WEIGHT, WEIGHT_GRADIENT = "activation", "gradient", "weight", "weight gradient"
KINDS = (ACTIVATION, GRADIENT, WEIGHT, WEIGHT_GRADIENT)
# The share of a tensor FP8 loses before the table's summary names it.
NOTABLE_LOSS = 0.01


def _graph(model):
    """The functional graph that runs `model`, or None for a subclassed model."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth") else None


def _with_training(operation, training):
    # Decided once per operation, not on every call.
    call = getattr(operation, "call", None)
    if call is None or "training" not in inspect.signature(call).parameters:
        return operation

    def with_training(*args, **kwargs):
        kwargs.setdefault("training", training)
        return operation(*args, **kwargs)

    return with_training


def _is_float(tensor):
    return "float" in keras.backend.standardize_dtype(tensor.dtype)


def _run(graph, inputs, training, probes=None, record=None):
    """Runs `graph`; adds `probes[i]` to the i-th layer output, or records the outputs."""
    counter = iter(range(1 << 30))

    def operation_fn(operation):
        call = _with_training(operation, training)

        def probed(*args, **kwargs):
            output = call(*args, **kwargs)
            if not isinstance(operation, keras.layers.Layer) or not hasattr(output, "dtype") or not _is_float(output):
                return output
            index = next(counter)
            if record is not None:
                record.append((operation, ops.stop_gradient(output)))
            if probes is not None:
                output = output + ops.cast(probes[index], output.dtype)
            return output

        return probed

    return graph._run_through_graph(inputs, operation_fn=operation_fn)


class ScaleReporter:
    """Scale reports of one model, taken again and again: `reporter(x, y)` is a `ScaleReport`.

    The forward and backward pass is a pure function of the inputs, the
    targets and the variables' current values; with `jit_compile=True` it is
    traced once (`tf.function`, `jax.jit`; PyTorch runs eagerly), so a report
    during training costs about one training step. `ScaleTracker` keeps one.
    Python-level settings of the layers (such as the weight multipliers
    `UnitScaleCallback` sets) are read when it is traced: after changing
    them, make a new reporter.

    Args:
        model: a built Keras model (Sequential, functional or subclassed)
            with one output.
        loss: the loss to differentiate when targets are given; by default
            the model's compiled loss.
        training: passed to the layers (dropout, ...).
        jit_compile: trace the pass once and reuse it.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    >>> reporter = ScaleReporter(model, loss="mse")
    >>> x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    >>> [len(reporter(x, y).rows) for _ in range(2)]
    [6, 6]
    """

    def __init__(self, model, loss=None, training=False, jit_compile=True):
        if not model.built:
            raise ValueError(
                f"`scale_report` needs a built model; '{model.name}' is not. Start it with "
                "`keras.Input(shape)`, call `model.build(input_shape)`, or call it on a batch."
            )
        outputs = getattr(model, "outputs", None) or [None]
        if len(outputs) > 1:
            raise ValueError(
                f"`scale_report` handles models with one output. Received: a model with {len(outputs)} outputs"
            )
        self.model, self.loss, self.training = model, loss, training
        self.graph = _graph(model)
        self.trainable, self.non_trainable = model.trainable_variables, model.non_trainable_variables
        # The probed layers, in the order of the pass's outputs; set as it is traced.
        self.layers = []
        self._loss_fn = None
        self._pass = A.compiled(self._forward_backward) if jit_compile else self._forward_backward

    def __call__(self, x, y=None, formats=F.FORMATS):
        """The `ScaleReport` of one pass on `x` (and `y`); see `scale_report`."""
        outputs, output, output_grads, weight_grads = self._run(x, y)
        numpy = ops.convert_to_numpy
        return self._rows_to_report(
            [(layer, numpy(out), numpy(grad)) for layer, out, grad in zip(self.layers, outputs, output_grads)],
            numpy(output),
            {id(v): numpy(grad) for v, grad in zip(self.trainable, weight_grads)},
            formats,
        )

    def weight_gradients(self, x, y=None):
        """The gradients of the model's trainable variables (NumPy arrays, in their order) from one pass."""
        return [ops.convert_to_numpy(grad) for grad in self._run(x, y)[3]]

    def _run(self, x, y):
        if y is not None and self._loss_fn is None:
            self._loss_fn = self._loss_function()
        inputs = [ops.convert_to_tensor(v) for v in (x if isinstance(x, (list, tuple)) else [x])]
        return self._pass(
            inputs if len(inputs) > 1 else inputs[0],
            None if y is None else ops.convert_to_tensor(y),
            [v.value for v in self.trainable],
            [v.value for v in self.non_trainable],
        )

    def _loss_function(self):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if loss is None:
            raise ValueError(
                "`scale_report` needs a loss to differentiate when `y` is given: pass `loss=` or "
                "compile the model. Received: loss=None, model.loss=None"
            )
        return keras.losses.get(loss)

    def _upstream(self, output, target):
        """The scalar to differentiate: the loss, or the output against a unit-normal gradient."""
        output = ops.cast(output, "float32")
        if target is None:
            return ops.sum(output * keras.random.normal(ops.shape(output), seed=0))
        return ops.mean(self._loss_fn(target, output))

    def _forward(self, inputs, trainable_values, non_trainable_values, probes=None, record=None):
        mapping = list(zip(self.trainable, trainable_values)) + list(zip(self.non_trainable, non_trainable_values))
        with keras.StatelessScope(state_mapping=mapping):
            if self.graph is not None:
                return _run(self.graph, inputs, self.training, probes=probes, record=record)
            return self.model(inputs, training=self.training)

    def _forward_backward(self, inputs, target, trainable_values, non_trainable_values):
        recorded = []
        output = self._forward(inputs, trainable_values, non_trainable_values, record=recorded)
        self.layers = [layer for layer, _ in recorded]
        outputs = [out for _, out in recorded]
        probe_zeros = [ops.zeros(ops.shape(out), "float32") for out in outputs]

        def differentiated(*args):
            probes, weights = args[: len(probe_zeros)], args[len(probe_zeros):]
            out = self._forward(inputs, weights, non_trainable_values, probes=probes)
            return self._upstream(out, target)

        _, grads = A.vjp_tensors(differentiated, probe_zeros + list(trainable_values), np.float32(1.0))
        return outputs, output, list(grads[: len(probe_zeros)]), list(grads[len(probe_zeros):])

    def _rows_to_report(self, probed, output, weight_grads, formats):
        model, rows = self.model, []

        def add(layer, tensor, kind, values):
            rows.append({"layer": layer, "tensor": tensor, "kind": kind, **_stats(values, formats)})

        reported = set()
        for layer, out, grad in probed:
            add(layer.name, "output", ACTIVATION, out)
            add(layer.name, "output gradient", GRADIENT, grad)
            if id(layer) not in reported:
                reported.add(id(layer))
                _add_weights(add, layer.name, P.owned_variables(layer), weight_grads)
        for layer in P.weighted_layers(model):
            if id(layer) not in reported:
                _add_weights(add, _weights_label(model, layer), P.owned_variables(layer), weight_grads)
        if self.graph is None:
            add(model.name, "output", ACTIVATION, output)
        return ScaleReport(rows, formats=[fmt.name for fmt in formats], model_name=model.name)


def _stats(values, formats):
    values = np.asarray(values, "float64")
    row = {"rms": float(np.sqrt(np.mean(values**2))) if values.size else 0.0,
           "finite": bool(np.isfinite(values).all())}
    for fmt in formats:
        key = fmt.name.lower()
        row[f"{key}_underflow"] = fmt.underflow_fraction(values)
        row[f"{key}_saturation"] = fmt.saturation_fraction(values)
    return row


def scale_report(model, x, y=None, loss=None, training=False, formats=F.FORMATS):
    """One forward and backward pass of `model` on `x`, and the scale of every tensor in it.

    Args:
        model: a built Keras model (Sequential, functional or subclassed).
        x: a batch of inputs (an array, or a list for several inputs).
        y: targets; with them the gradient is the loss's (`loss`, or the
            model's compiled loss), averaged over the batch as in training.
            Without them, a unit-normal gradient is sent back from the
            output (what a unit-scaled loss delivers).
        loss: a loss (name, function or `keras.losses.Loss`).
        training: passed to the layers (dropout, ...).
        formats: the `keras_unitscale.formats.FPFormat`s to count against.

    Returns:
        A `ScaleReport`.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")])
    >>> report = scale_report(model, np.ones((4, 16), "float32"))
    >>> [(row["layer"], row["tensor"]) for row in report.rows]
    [('d', 'output'), ('d', 'output gradient'), ('d', 'kernel'), ('d', 'kernel gradient'), ('d', 'bias'), ('d', 'bias gradient')]
    """
    return ScaleReporter(model, loss=loss, training=training, jit_compile=False)(x, y, formats)


def _weights_label(model, layer):
    """A layer's name as its variables' path gives it: it tells two blocks' sublayers apart."""
    return P.owned_variables(layer)[0].path.rsplit("/", 1)[0].removeprefix(model.name + "/")


def weight_report(model, formats=F.FORMATS):
    """The scales of `model`'s trainable weights alone: no data, no gradients.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras_unitscale.layers.Dense(8, use_bias=False, name="d")])
    >>> [(row["layer"], row["tensor"], 0.8 < row["rms"] < 1.25) for row in weight_report(model).rows]
    [('d', 'kernel', True)]
    """
    rows = [
        {"layer": _weights_label(model, layer), "tensor": variable.name, "kind": WEIGHT,
         **_stats(ops.convert_to_numpy(variable), formats)}
        for layer in P.weighted_layers(model)
        for variable in P.owned_variables(layer)
    ]
    return ScaleReport(rows, formats=[fmt.name for fmt in formats], model_name=model.name)


def _add_weights(add, layer_name, variables, weight_grads):
    for variable in variables:
        if id(variable) not in weight_grads:
            continue
        add(layer_name, variable.name, WEIGHT, ops.convert_to_numpy(variable))
        add(layer_name, f"{variable.name} gradient", WEIGHT_GRADIENT, weight_grads[id(variable)])


class ScaleReport:
    """The scales of a model's tensors, one row per tensor (see `scale_report`).

    Print it for an aligned table; `to_dicts()` gives the rows, `to_json(path)`
    writes them, `to_dataframe()` makes a pandas DataFrame (pandas needed),
    and `offenders()` names the tensors FP8 would lose most of.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="d")])
    >>> report = scale_report(model, np.full((4, 16), 1e-5, "float32"))
    >>> report.mean_fraction("E4M3", kind=ACTIVATION)  # outputs near 1e-5: below E4M3's smallest subnormal
    1.0
    >>> losses = report.lost_fractions("E4M3", "E5M2")
    >>> losses["activation_format"], losses["activation_underflow"], losses["gradient_format"]
    ('E4M3', 1.0, 'E5M2')
    """

    def __init__(self, rows, formats, model_name=""):
        self.rows = list(rows)
        self.formats = list(formats)
        self.model_name = model_name

    def to_dicts(self):
        return [dict(row) for row in self.rows]

    def to_json(self, path):
        with open(path, "w") as file:
            json.dump({"model": self.model_name, "formats": self.formats, "rows": self.to_dicts()}, file, indent=1)

    def to_dataframe(self):
        try:
            import pandas
        except ImportError as error:
            raise ImportError("`ScaleReport.to_dataframe` needs pandas: pip install pandas") from error
        return pandas.DataFrame(self.to_dicts())

    @staticmethod
    def _loss(row):
        """How much of the tensor FP8 loses: the worse of E4M3 and E5M2 (underflow + saturation)."""
        return max(row.get(f"{f}_underflow", 0.0) + row.get(f"{f}_saturation", 0.0) for f in ("e4m3", "e5m2"))

    def offenders(self, count=5, kind=None):
        """The `count` rows that FP8 loses most of (then those furthest from unit RMS)."""
        rows = [row for row in self.rows if kind is None or row["kind"] == kind]
        def badness(row):
            return (not row["finite"], self._loss(row), abs(math.log2(row["rms"])) if row["rms"] > 0 else math.inf)
        return sorted(rows, key=badness, reverse=True)[:count]

    def underflow(self, fmt, kind=None):
        """The largest fraction of any tensor (of `kind`) that format `fmt` flushes to zero."""
        key = f"{fmt.lower()}_underflow"
        return max((row[key] for row in self.rows if kind is None or row["kind"] == kind), default=0.0)

    def mean_fraction(self, fmt, what="underflow", kind=None):
        """The fraction of a tensor (of `kind`) that format `fmt` flushes to zero or saturates, averaged over tensors.

        Args:
            fmt: a format's name ("FP16", "E4M3", ...) or an `FPFormat`.
            what: "underflow" (flushed to zero) or "saturation" (clipped at the format's maximum).
            kind: `ACTIVATION`, `GRADIENT` or `WEIGHT_GRADIENT`; None for every tensor.
        """
        what = checks.one_of("what", what, ("underflow", "saturation"))
        key = f"{getattr(fmt, 'name', fmt).lower()}_{what}"
        values = [row[key] for row in self.rows if kind is None or row["kind"] == kind]
        return float(np.mean(values)) if values else 0.0

    def lost_fractions(self, activation_format, gradient_format):
        """`mean_fraction` of the layer outputs in one format and of their gradients in another, as a flat dict.

        Keys: `activation_format`, `activation_underflow`, `activation_saturation`, and the same for `gradient`.
        """
        result = {}
        for kind, fmt in ((ACTIVATION, activation_format), (GRADIENT, gradient_format)):
            result[f"{kind}_format"] = getattr(fmt, "name", fmt)
            for what in ("underflow", "saturation"):
                result[f"{kind}_{what}"] = self.mean_fraction(fmt, what, kind)
        return result

    def __str__(self):
        layer_width = max([len("layer")] + [len(r["layer"]) for r in self.rows])
        tensor_width = max([len("tensor")] + [len(r["tensor"]) for r in self.rows])
        columns = [f"{f} {what}" for f in self.formats for what in ("uf%", "sat%")]
        header = f"{'layer':<{layer_width}}  {'tensor':<{tensor_width}}  {'RMS':>9}  {'log2':>6}" + "".join(
            f"  {c:>9}" for c in columns
        )
        lines = [f"Scale report: {self.model_name}", header, "-" * len(header)]
        for r in self.rows:
            log2 = f"{math.log2(r['rms']):6.1f}" if r["rms"] > 0 else "  -inf"
            cells = "".join(
                f"  {_percent(r[f'{f.lower()}_{what}']):>9}" for f in self.formats for what in ("underflow", "saturation")
            )
            flag = "" if r["finite"] else "  non-finite!"
            lines.append(f"{r['layer']:<{layer_width}}  {r['tensor']:<{tensor_width}}  {r['rms']:9.3g}  {log2}{cells}{flag}")
        worst = [
            f"{r['layer']} {r['tensor']} ({100 * self._loss(r):.0f}%)"
            for r in self.offenders(3) if self._loss(r) >= NOTABLE_LOSS or not r["finite"]
        ]
        lines.append(
            "FP8 loses most of: " + ("; ".join(worst) if worst else
                                     f"nothing notable (under {100 * NOTABLE_LOSS:.0f}% of any tensor)")
        )
        return "\n".join(lines)

    __repr__ = __str__


def _percent(fraction):
    if fraction == 0:
        return ""
    return "<0.1" if fraction < 0.0005 else f"{100 * fraction:.1f}"


# Where each format holds normal numbers, as log2 bounds, for the plot.
def _normal_range(fmt):
    return math.log2(fmt.smallest_normal), math.log2(fmt.max)


def plot_scales(report, path=None, axes=None):
    """log2 RMS of every layer's output, output gradient and weight gradients, with FP16/FP8 ranges shaded.

    Args:
        report: a `ScaleReport`.
        path: where to save a PNG (optional).
        axes: matplotlib `Axes` to draw on (default: a new figure's).

    Returns:
        The matplotlib `Figure`.

    Example:

    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    >>> figure = plot_scales(scale_report(model, np.ones((4, 16), "float32")))
    >>> figure.axes[0].get_ylabel()
    'log2 RMS'
    """
    layers = list(dict.fromkeys(row["layer"] for row in report.rows))
    position = {name: i for i, name in enumerate(layers)}
    if axes is None:
        figure, axes = new_figure("plot_scales", figsize=(max(8.0, 0.35 * len(layers) + 3), 5.5))
    else:
        figure = axes.figure
    for fmt, color in ((F.FP16, "tab:green"), (F.E4M3, "tab:orange"), (F.E5M2, "tab:purple")):
        low, high = _normal_range(fmt)
        axes.axhspan(low, high, color=color, alpha=0.08, label=f"{fmt.name} normal range")
        axes.axhline(math.log2(fmt.smallest_subnormal), color=color, lw=0.8, ls=":")
    styles = {ACTIVATION: ("o", "tab:blue"), GRADIENT: ("s", "tab:red"), WEIGHT_GRADIENT: ("^", "tab:brown")}
    for kind, (marker, color) in styles.items():
        rows = [r for r in report.rows if r["kind"] == kind and r["rms"] > 0]
        if rows:
            axes.scatter([position[r["layer"]] for r in rows], [math.log2(r["rms"]) for r in rows],
                         marker=marker, color=color, label=f"{kind} RMS", zorder=3)
    axes.axhline(0.0, color="black", lw=0.8)
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("log2 RMS")
    axes.set_title(f"Scales of {report.model_name} (dotted: smallest subnormal)")
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def _inputs_from_spec(model, batch, seed=0):
    """Unit-normal float inputs (and valid token ids for integer inputs) shaped as the model's inputs."""
    rng = np.random.default_rng(seed)
    vocab = min(
        [layer.input_dim for layer in model._flatten_layers(recursive=True) if hasattr(layer, "input_dim")
         and isinstance(getattr(layer, "input_dim"), int)] or [2]
    )
    arrays = []
    for tensor in model.inputs:
        shape = tuple(batch if i == 0 else (size or 16) for i, size in enumerate(tensor.shape))
        if "int" in keras.backend.standardize_dtype(tensor.dtype):
            arrays.append(rng.integers(0, vocab, size=shape).astype(tensor.dtype))
        else:
            arrays.append(rng.normal(size=shape).astype("float32"))
    return arrays if len(arrays) > 1 else arrays[0]


def analyze_file(model_path, data=None, batch=32, out_dir="unitscale-analysis"):
    """`keras-unitscale analyze`: a saved model's scale report, printed and written as PNG and JSON.

    Raises:
        SystemExit: with a message naming the file, if it is not a Keras model.
    """
    import os

    try:
        model = keras.saving.load_model(model_path)
    except Exception as error:  # Keras raises many kinds for a file that is not a model
        raise SystemExit(
            f"keras-unitscale analyze: {model_path!r} is not a Keras model that loads "
            f"({type(error).__name__}: {error})"
        ) from None
    y = None
    if data is None:
        x = _inputs_from_spec(model, batch)
    else:
        with np.load(data) as arrays:
            if "x" not in arrays:
                raise SystemExit(f"keras-unitscale analyze: {data!r} has no array named 'x'. Received: {list(arrays)}")
            x, y = arrays["x"], (arrays["y"] if "y" in arrays else None)
    report = scale_report(model, x, y)
    print(report)
    os.makedirs(out_dir, exist_ok=True)
    report.to_json(os.path.join(out_dir, "scale_report.json"))
    plot_scales(report, os.path.join(out_dir, "scales.png"))
    print(f"Wrote {os.path.join(out_dir, 'scale_report.json')} and {os.path.join(out_dir, 'scales.png')}")
    return report
