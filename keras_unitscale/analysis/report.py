"""`ScaleReport`: a model's tensors, one row each, with their RMS and what each format loses of them."""

import json
import math

import numpy as np

from keras_unitscale import checks

ACTIVATION, GRADIENT, WEIGHT, WEIGHT_GRADIENT = "activation", "gradient", "weight", "weight gradient"
KINDS = (ACTIVATION, GRADIENT, WEIGHT, WEIGHT_GRADIENT)
# The share of a tensor FP8 loses before the table's summary names it.
NOTABLE_LOSS = 0.01


def tensor_stats(values, formats):
    """One row's numbers: the RMS of `values`, whether all are finite, and each format's lost fractions.

    Args:
        values: an array.
        formats: the `keras_unitscale.formats.FPFormat`s to count against.

    Returns:
        {"rms", "finite", "<format>_underflow", "<format>_saturation", ...}.
    """
    values = np.asarray(values, "float64")
    row = {"rms": float(np.sqrt(np.mean(values**2))) if values.size else 0.0,
           "finite": bool(np.isfinite(values).all())}
    for fmt in formats:
        key = fmt.name.lower()
        row[f"{key}_underflow"] = fmt.underflow_fraction(values)
        row[f"{key}_saturation"] = fmt.saturation_fraction(values)
    return row


class ScaleReport:
    """The scales of a model's tensors, one row per tensor (see `scale_report`).

    Print it for an aligned table; `to_dicts()` gives the rows, `to_json(path)`
    writes them, `to_dataframe()` makes a pandas DataFrame (pandas needed),
    and `offenders()` names the tensors FP8 would lose most of.

    Examples:
        >>> from keras_unitscale.analysis import scale_report
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
