"""Where the numbers live: seed 000's model, plain Keras beside unit-scaled.

The model of the user's first document — Dense(128, relu) → Dense(64, relu)
→ Dense(1, sigmoid) — on scikit-learn's bundled breast-cancer data, once as
Keras builds it (Glorot-uniform weights, a mean loss) and once from
`keras_unitscale.functional` (unit-normal weights, unit-scaled ops). One
forward and backward pass each; for every activation and every gradient, the
RMS. The plain model's gradients sit orders of magnitude below 1, where FP16
and FP8 lose them; the unit-scaled model's sit near 1.
"""

import json
import math
import os

import keras
import numpy as np
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale.autodiff import vjp

LAYER_SIZES = (128, 64, 1)


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


def _network(unit_scaled, x, weights, probes):
    """The three layer outputs; each has a zero `probe` added, whose gradient is the output's."""
    w1, b1, w2, b2, w3, b3 = weights
    if unit_scaled:
        a1 = U.relu(U.dense(x, w1, b1)) + probes[0]
        a2 = U.relu(U.dense(a1, w2, b2)) + probes[1]
        return [a1, a2, U.dense_readout(a2, w3, b3) + probes[2]]
    a1 = ops.relu(ops.matmul(x, w1) + b1) + probes[0]
    a2 = ops.relu(ops.matmul(a1, w2) + b2) + probes[1]
    return [a1, a2, ops.matmul(a2, w3) + b3 + probes[2]]


def _loss(unit_scaled, logit, y):
    if unit_scaled:
        # sigmoid(z) is the softmax of the two logits (0, z): the binary loss
        # as a two-class unit-scaled cross-entropy.
        logits = ops.concatenate([ops.zeros_like(logit), logit], axis=-1)
        return U.cross_entropy(logits, ops.cast(y, "int32"))
    return ops.mean(keras.losses.binary_crossentropy(y[:, None], ops.sigmoid(logit)))


def _plain_weights(n_features, seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((n_features,))]
        + [
            keras.layers.Dense(units, activation=activation)
            for units, activation in zip(LAYER_SIZES, ("relu", "relu", "sigmoid"))
        ]
    )
    return [ops.convert_to_numpy(w) for w in model.weights]


def _unit_weights(n_features, seed):
    rng = np.random.default_rng(seed)
    weights, fan_in = [], n_features
    for units in LAYER_SIZES:
        weights += [rng.normal(size=(fan_in, units)).astype("float32"), np.zeros(units, "float32")]
        fan_in = units
    return weights


def _tensor_scales(unit_scaled, weights, x, y):
    """`(tensor name, RMS)` for each layer's output, output gradient and weight gradients."""
    probes = [np.zeros((len(x), units), "float32") for units in LAYER_SIZES]
    outputs = _network(unit_scaled, x, weights, probes)

    def loss(*args):
        return _loss(unit_scaled, _network(unit_scaled, x, args[:6], args[6:])[-1], y)

    _, grads = vjp(loss, weights + probes, np.float32(1.0))
    rows = []
    for i, name in enumerate(["dense", "dense_1", "dense_2"]):
        rows += [
            (f"{name} output", _rms(ops.convert_to_numpy(outputs[i]))),
            (f"{name} output grad", _rms(grads[6 + i])),
            (f"{name} kernel grad", _rms(grads[2 * i])),
            (f"{name} bias grad", _rms(grads[2 * i + 1])),
        ]
    return rows


def _rms(array):
    return float(np.sqrt(np.mean(np.square(np.asarray(array, "float64")))))


def run(out_dir="unitscale-demo", seed=0, print_fn=print):
    """Runs the comparison, prints the table and writes `scales.json` in `out_dir`.

    Returns:
        The rows: `(tensor, plain RMS, unit-scaled RMS)`.
    """
    x, y = load_breast_cancer()
    plain = _tensor_scales(False, _plain_weights(x.shape[1], seed), x, y)
    unit = _tensor_scales(True, _unit_weights(x.shape[1], seed), x, y)
    rows = [(name, p, u) for (name, p), (_, u) in zip(plain, unit)]

    print_fn(
        f"Seed 000's model on breast-cancer data ({len(x)} examples, one full batch), "
        f"backend {keras.backend.backend()}: RMS of every activation and gradient."
    )
    header = f"{'tensor':<24}{'plain Keras':>14}{'log2':>7}{'unit-scaled':>14}{'log2':>7}"
    print_fn(header)
    print_fn("-" * len(header))
    for name, p, u in rows:
        print_fn(f"{name:<24}{p:>14.3e}{_log2(p):>7.1f}{u:>14.3e}{_log2(u):>7.1f}")
    for label, column in (("plain Keras", 1), ("unit-scaled", 2)):
        grads = [row[column] for row in rows if row[0].endswith("grad")]
        print_fn(
            f"{label}: gradients between 2^{_log2(min(grads)):.1f} and 2^{_log2(max(grads)):.1f}"
        )

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "scales.json")
    with open(path, "w") as f:
        json.dump(
            {
                "backend": keras.backend.backend(),
                "examples": int(len(x)),
                "rows": [{"tensor": n, "plain_rms": p, "unit_scaled_rms": u} for n, p, u in rows],
            },
            f,
            indent=2,
        )
    print_fn(f"wrote {path}")
    return rows


def _log2(value):
    return math.log2(value) if value > 0 else float("-inf")
