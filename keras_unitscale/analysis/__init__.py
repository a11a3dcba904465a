"""Where a model's numbers live: per-layer scales, and what FP16 and FP8 would lose of them.

`scale_report(model, x)` runs one forward and one backward pass of any built
Keras model (plain or ours) and measures, for every layer, the RMS of its
output and of the gradient arriving at that output, and for every weight its
RMS and its gradient's; for each of FP16, BF16, FP8 E4M3 and E5M2 it counts
the fraction of each tensor's elements that the format would flush to zero
(underflow) or could not hold (saturation). `plot_scales(report)` draws it.

`coord_check` and `plot_coord_check` ask the other question: does each
layer keep its size as the model widens?

Modules:
    report: `ScaleReport`, the rows' numbers and the kinds of tensor
        (`ACTIVATION`, `GRADIENT`, `WEIGHT`, `WEIGHT_GRADIENT`).
    reporter: `ScaleReporter`, `scale_report`, `weight_report`, and the
        probed run through a model's graph.
    plot: `plot_scales`.
    coordinate_check: `CoordCheck`, `coord_check`, `plot_coord_check`.
"""

from keras_unitscale.analysis.coordinate_check import CoordCheck
from keras_unitscale.analysis.coordinate_check import coord_check
from keras_unitscale.analysis.coordinate_check import plot_coord_check
from keras_unitscale.analysis.plot import plot_scales
from keras_unitscale.analysis.report import ACTIVATION
from keras_unitscale.analysis.report import GRADIENT
from keras_unitscale.analysis.report import KINDS
from keras_unitscale.analysis.report import NOTABLE_LOSS
from keras_unitscale.analysis.report import WEIGHT
from keras_unitscale.analysis.report import WEIGHT_GRADIENT
from keras_unitscale.analysis.report import ScaleReport
from keras_unitscale.analysis.reporter import ScaleReporter
from keras_unitscale.analysis.reporter import scale_report
from keras_unitscale.analysis.reporter import weight_report

__all__ = [
    "ScaleReport", "ScaleReporter", "scale_report", "weight_report", "plot_scales",
    "CoordCheck", "coord_check", "plot_coord_check",
]
