"""Where the numbers live at initialisation: the layers issue's three models, ours and Keras's.

For each model of `benchmarks/layers.py`, built from `keras_unitscale.layers`
and from `keras.layers`: one forward and backward pass on a batch, the upstream
gradient being the gradient of the model's own loss (ours: the unit-scaled
loss; Keras's: its loss with the mean reduction), and the RMS of every layer
output, every gradient arriving at a layer output, and every weight gradient.

Usage:
    python benchmarks/init_scales.py [--out benchmarks/results]
"""

import argparse
import json
import math
import os

import keras
import numpy as np

import layers as models
from keras_unitscale import layers
from keras_unitscale.autodiff import layer_vjp
from keras_unitscale.autodiff import sequential_vjp
from keras_unitscale.autodiff import vjp


def _rms(array):
    return float(np.sqrt(np.mean(np.square(np.asarray(array, "float64")))))


def scales(model, loss, x, y):
    # A NumPy copy of the prediction: Keras's sigmoid output carries its logits,
    # which Keras's binary cross-entropy would differentiate instead.
    prediction = keras.ops.convert_to_numpy(model(x))
    _, (upstream,) = vjp(lambda p: loss(y, p), [prediction], np.float32(1.0))
    rows = []
    for name, output, grad in sequential_vjp(model, x, upstream):
        rows.append((f"{name} output", _rms(output)))
        rows.append((f"{name} output grad", _rms(grad)))
    _, _, weight_grads = layer_vjp(model, x, upstream)
    rows += [(f"{path.split('/', 1)[-1]} grad", _rms(g)) for path, g in weight_grads.items()]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    record, lines = {"backend": keras.backend.backend(), "models": {}}, []
    for name, build, kind, batch, keras_loss, our_loss in models.CASES:
        x, y = models._data(kind, batch)
        if kind == "mlp":
            y = y[:, None]
        keras.utils.set_random_seed(0)
        ours = scales(build(layers), our_loss, x, y)
        keras.utils.set_random_seed(0)
        theirs = scales(build(keras.layers), keras_loss, x, y)
        record["models"][name] = {"keras_unitscale": dict(ours), "keras": dict(theirs)}
        lines.append(f"\n{name}\n{'layer outputs and their gradients':<44}{'keras_unitscale':>16}{'keras.layers':>14}")
        for (tensor, ours_rms), (_, theirs_rms) in zip(_outputs(ours), _outputs(theirs)):
            lines.append(f"{tensor:<44}{ours_rms:>16.3g}{theirs_rms:>14.3g}")
        for label, rows in (("keras_unitscale", ours), ("keras.layers", theirs)):
            lines.append(f"weight gradients, {label}:")
            lines += [f"  {tensor:<42}{value:>16.3g}" for tensor, value in rows if " output" not in tensor]
        for label, rows in (("keras_unitscale", ours), ("keras.layers", theirs)):
            values = [v for _, v in rows if v > 0]
            lines.append(f"  {label}: every RMS from 2^{math.log2(min(values)):.1f} to 2^{math.log2(max(values)):.1f}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"init_scales_{keras.backend.backend()}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(stem + ".txt", "w") as f:
        f.write(text.lstrip() + "\n")
    print(f"wrote {stem}.json and {stem}.txt")


def _outputs(rows):
    return [row for row in rows if " output" in row[0]]


if __name__ == "__main__":
    main()
