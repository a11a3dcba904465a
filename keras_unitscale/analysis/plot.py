"""`plot_scales`: a `ScaleReport` drawn against the ranges FP16 and FP8 hold."""

import math

from keras_unitscale import formats as F
from keras_unitscale.analysis.report import ACTIVATION
from keras_unitscale.analysis.report import GRADIENT
from keras_unitscale.analysis.report import WEIGHT_GRADIENT
from keras_unitscale.plotting import new_figure


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

    Examples:
        >>> from keras_unitscale.analysis import scale_report
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
