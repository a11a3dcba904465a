"""μP's coordinate check: does each layer's output keep its size as the model widens and trains?

`coord_check(build_model, widths, x, y)` builds the same model at several
widths, trains each for a few steps on one fixed batch and records, before
training and after every step, the mean absolute value of every layer's
output on that batch (as the `mup` package's coordinate check does). In a
parametrization that transfers across width (u-μP, μP) these curves are flat
in width; in the standard one some of them, typically the readout's logits
after the first updates, grow with it. `plot_coord_check(result)` draws them.
"""

import math

import keras
import numpy as np

from keras_unitscale.plotting import new_figure

__all__ = ["CoordCheck", "coord_check", "plot_coord_check"]


def _check_widths(widths):
    try:
        widths = list(widths)
    except TypeError:
        widths = None
    valid = (
        widths is not None
        and len(widths) >= 2
        and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
        and len(set(widths)) == len(widths)
    )
    if not valid:
        raise ValueError(
            "`widths` must be a list of at least 2 distinct positive integers. "
            f"Received: widths={widths!r}"
        )
    return widths


def _check_steps(steps):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0. Received: steps={steps!r}")
    return steps


def _probed_outputs(model):
    """{layer name: its output tensor} for the layers with one float output, in graph order."""
    outputs = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):
            # A layer called more than once (shared) has no single output to probe.
            continue
        if isinstance(output, (list, tuple, dict)) or not hasattr(output, "dtype"):
            continue
        if "float" not in keras.backend.standardize_dtype(output.dtype):
            continue
        outputs[layer.name] = output
    return outputs


class CoordCheck:
    """The result of `coord_check`: mean |activation| per layer, width and step.

    Attributes:
        widths: the widths checked, in the order given.
        steps: the number of training steps; each width has `steps + 1`
            values per layer (step 0 is before training).
        table: {layer: {width: [mean |output| at step 0, 1, ..., steps]}}.
    """

    def __init__(self, widths, steps, table):
        self.widths = list(widths)
        self.steps = steps
        self.table = table

    def ratios(self, width_a, width_b):
        """{layer: [value at `width_b` / value at `width_a`, per step]} for the layers both widths have.

        Examples:
            >>> result = CoordCheck([8, 32], 1, {"d": {8: [1.0, 2.0], 32: [2.0, 2.0]}})
            >>> result.ratios(8, 32)
            {'d': [2.0, 1.0]}
        """
        for name, width in (("width_a", width_a), ("width_b", width_b)):
            if width not in self.widths:
                raise ValueError(
                    f"`{name}` must be one of the widths checked, {self.widths}. Received: {name}={width!r}"
                )
        ratios = {}
        for layer, by_width in self.table.items():
            if width_a in by_width and width_b in by_width:
                ratios[layer] = [
                    b / a if a != 0 else (1.0 if b == 0 else math.inf)
                    for a, b in zip(by_width[width_a], by_width[width_b])
                ]
        return ratios

    def to_dicts(self):
        """The table as rows {"layer", "width", "step", "mean_abs"}."""
        return [
            {"layer": layer, "width": width, "step": step, "mean_abs": value}
            for layer, by_width in self.table.items()
            for width, values in by_width.items()
            for step, value in enumerate(values)
        ]

    def __repr__(self):
        return f"CoordCheck(widths={self.widths}, steps={self.steps}, layers={list(self.table)})"


def coord_check(build_model, widths, x, y, steps=3, optimizer_fn=None, loss=None, seed=0):
    """Trains the model at each width for a few steps and records every layer's mean |output|.

    For each width: seeds Keras's random generators with `seed`, builds the
    model, compiles it if `optimizer_fn` is given, then records every layer's
    mean absolute output on `x` (inference mode) before training and after
    each of `steps` calls of `model.train_on_batch(x, y)`.

    Args:
        build_model: `width -> model`, a functional or Sequential model that
            starts with `keras.Input`. Give its layers names: layers are
            matched across widths by name.
        widths: at least 2 distinct positive integers.
        x: the batch of inputs, the same at every step and width.
        y: its targets.
        steps: the number of training steps, an integer >= 0.
        optimizer_fn: `() -> optimizer`, called once per width (an optimizer
            holds one model's state); with it the model is compiled with
            `loss`. Without it the model must come compiled.
        loss: the loss to compile with.
        seed: the seed set before each model is built, so that every width
            starts from the same random state.

    Returns:
        A `CoordCheck`.

    Raises:
        ValueError: if `widths` or `steps` is invalid, a model has no
            `keras.Input`, or is neither compiled nor given an optimizer.

    Examples:
        >>> def build(width):
        ...     return keras.Sequential([keras.Input((8,)), keras_unitscale.layers.Dense(width, name="hidden"),
        ...                              keras_unitscale.layers.Dense(1, role="output", name="readout")])
        >>> x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
        >>> result = coord_check(build, [16, 64], x, x[:, :1], steps=1,
        ...                      optimizer_fn=lambda: keras_unitscale.optimizers.Adam(0.1), loss="mse")
        >>> sorted(result.table), len(result.table["hidden"][64])
        (['hidden', 'readout'], 2)
        >>> bool(0.8 < result.ratios(16, 64)["hidden"][0] < 1.25)
        True
    """
    widths = _check_widths(widths)
    steps = _check_steps(steps)
    table = {}
    for width in widths:
        model = _compiled_model(build_model, width, seed, optimizer_fn, loss)
        for name, values in _mean_abs_per_step(model, width, x, y, steps).items():
            table.setdefault(name, {})[width] = values
    return CoordCheck(widths, steps, table)


def _compiled_model(build_model, width, seed, optimizer_fn, loss):
    """`build_model(width)` built from `seed`'s random state, compiled with a fresh optimizer if one is given."""
    keras.utils.set_random_seed(seed)
    model = build_model(width)
    if optimizer_fn is not None:
        model.compile(optimizer=optimizer_fn(), loss=loss)
    elif not getattr(model, "compiled", False):
        raise ValueError(
            "`coord_check` trains the model: pass `optimizer_fn` (and `loss`) or return a "
            f"compiled model from `build_model`. Received: optimizer_fn=None and an uncompiled "
            f"model at width={width}"
        )
    return model


def _mean_abs_per_step(model, width, x, y, steps):
    """{layer name: [mean |output| on `x` before training, after step 1, ..., after `steps`]}."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            "`coord_check` reads the layers' outputs from the model's graph: `build_model` must "
            "return a functional or Sequential model that starts with `keras.Input`. "
            f"Received: {model!r} at width={width}"
        )
    outputs = _probed_outputs(model)
    # One model sharing the trained model's variables reads every layer's
    # output in one pass, and sees each update as it happens.
    probe = keras.Model(inputs[0] if len(inputs) == 1 else inputs, list(outputs.values()))
    curves = {name: [] for name in outputs}
    for step in range(steps + 1):
        if step > 0:
            model.train_on_batch(x, y)
        # Compiled once per width (`predict_on_batch`): an eager pass
        # costs more than the tracing on JAX.
        values = probe.predict_on_batch(x)
        if len(outputs) == 1:
            values = [values]
        for name, value in zip(outputs, values):
            curves[name].append(float(np.mean(np.abs(np.asarray(value, "float64")))))
    return curves


def plot_coord_check(result, path=None):
    """One panel per step: each layer's mean |output| against width, both on log axes.

    Args:
        result: a `CoordCheck`.
        path: where to save a PNG (optional).

    Returns:
        The matplotlib `Figure`.

    Examples:
        >>> result = CoordCheck([8, 32], 1, {"d": {8: [1.0, 2.0], 32: [1.0, 4.0]}})
        >>> len(plot_coord_check(result).axes)
        2
    """
    if not isinstance(result, CoordCheck):
        raise ValueError(f"`result` must be a `CoordCheck`. Received: result={result!r}")
    panels = result.steps + 1
    figure, axes = new_figure(
        "plot_coord_check", figsize=(3.2 * panels + 1.5, 3.8), ncols=panels, sharey=True, squeeze=False
    )
    axes = axes[0]
    for step, ax in enumerate(axes):
        for layer, by_width in result.table.items():
            widths = [w for w in result.widths if w in by_width and by_width[w][step] > 0]
            if widths:
                ax.plot(widths, [by_width[w][step] for w in widths], marker="o", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(f"step {step}")
    axes[0].set_ylabel("mean |activation|")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, fontsize=7, loc="center right")
        figure.tight_layout(rect=(0, 0, 0.8, 1))
    else:
        figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure
