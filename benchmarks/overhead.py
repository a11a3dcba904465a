"""What the scale ops cost: training-step time with and without them, side by side.

Two models, each built from `keras_unitscale.functional`: an MLP and a
pre-norm transformer block. Each is timed as written ("unit-scaled") and built
and traced under `keras_unitscale.scale.scaling_disabled()`, which removes
every scale op and leaves the same computation ("plain"). Both are compiled
with `jit_compile=True` on the current backend; repeats alternate between the
two so that drift in the machine's speed hits both alike. The ratio reported
is the median over repeats of unit-scaled / plain step time (each repeat
times both models back to back), with its range, and beside it the ratio of
the two median step times.

Usage:
    python benchmarks/overhead.py [--repeats 7] [--steps 20] [--out benchmarks/results]
    KERAS_BACKEND=jax python benchmarks/overhead.py
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import keras
import numpy as np
from keras import ops

import keras_unitscale
from keras_unitscale import functional as U
from keras_unitscale.scale import scaling_disabled


class UnitMLP(keras.layers.Layer):
    """`depth` unit-scaled dense + relu layers and a readout, from functional ops."""

    def __init__(self, width, depth, outputs, **kwargs):
        super().__init__(**kwargs)
        self.width, self.depth, self.outputs = width, depth, outputs

    def build(self, input_shape):
        normal = keras.initializers.RandomNormal(stddev=1.0)
        fan_ins = [input_shape[-1]] + [self.width] * (self.depth - 1)
        self.kernels = [self.add_weight(shape=(fan_in, self.width), initializer=normal) for fan_in in fan_ins]
        self.readout = self.add_weight(shape=(self.width, self.outputs), initializer=normal)

    def call(self, x):
        for kernel in self.kernels:
            x = U.relu(U.dense(x, kernel))
        return U.dense_readout(x, self.readout)


class UnitTransformerBlock(keras.layers.Layer):
    """A pre-norm transformer block (causal attention, GELU MLP) from functional ops."""

    def __init__(self, width, heads, tau=0.5, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.tau = width, heads, tau

    def build(self, input_shape):
        normal = keras.initializers.RandomNormal(stddev=1.0)
        self.qkv = self.add_weight(shape=(self.width, 3 * self.width), initializer=normal)
        self.attn_out = self.add_weight(shape=(self.width, self.width), initializer=normal)
        self.mlp_up = self.add_weight(shape=(self.width, 4 * self.width), initializer=normal)
        self.mlp_down = self.add_weight(shape=(4 * self.width, self.width), initializer=normal)

    def _attention(self, x):
        seq, head_dim = x.shape[1], self.width // self.heads
        qkv = U.dense(U.layer_norm(x), self.qkv)
        q, k, v = ops.split(ops.reshape(qkv, (-1, seq, 3 * self.heads, head_dim)), 3, axis=2)
        out = U.dot_product_attention(q, k, v, is_causal=True)
        return U.dense(ops.reshape(out, (-1, seq, self.width)), self.attn_out)

    def _mlp(self, x):
        return U.dense(U.gelu(U.dense(U.layer_norm(x), self.mlp_up)), self.mlp_down)

    def call(self, x):
        x = U.residual_apply(self._attention, x, tau=self.tau)
        return U.residual_apply(self._mlp, x, tau=self.tau)


def _mlp_case(batch):
    model = keras.Sequential([keras.Input((256,)), UnitMLP(width=1024, depth=4, outputs=10)])
    rng = np.random.default_rng(0)
    return model, rng.normal(size=(batch * 8, 256)).astype("float32"), rng.normal(size=(batch * 8, 10)).astype("float32")


def _transformer_case(batch):
    model = keras.Sequential([keras.Input((128, 256)), UnitTransformerBlock(width=256, heads=4)])
    rng = np.random.default_rng(0)
    data = rng.normal(size=(batch * 8, 128, 256)).astype("float32")
    return model, data, rng.normal(size=data.shape).astype("float32")


CASES = {
    "mlp (4 x 1024, batch 256)": (_mlp_case, 256),
    "transformer block (width 256, seq 128, batch 16)": (_transformer_case, 16),
}


def _compiled(case, batch, scale_ops):
    with contextlib.nullcontext() if scale_ops else scaling_disabled():
        model, x, y = case(batch)
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse", jit_compile=True)
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # trace and compile
    return model, x, y


def _step_time(model, x, y, batch, steps):
    steps_per_epoch = len(x) // batch
    epochs = max(1, steps // steps_per_epoch)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return (time.perf_counter() - start) / (epochs * steps_per_epoch)


def run(repeats, steps):
    rows = []
    for name, (case, batch) in CASES.items():
        unit = _compiled(case, batch, scale_ops=True)
        plain = _compiled(case, batch, scale_ops=False)
        unit_times, plain_times, ratios = [], [], []
        progress = keras.utils.Progbar(repeats, unit_name="repeat")
        for _ in range(repeats):
            unit_times.append(_step_time(*unit, batch, steps))
            plain_times.append(_step_time(*plain, batch, steps))
            ratios.append(unit_times[-1] / plain_times[-1])
            progress.add(1)
        rows.append(
            {
                "model": name,
                "unit_scaled_ms": 1e3 * statistics.median(unit_times),
                "plain_ms": 1e3 * statistics.median(plain_times),
                "ratio_median": statistics.median(ratios),
                "ratio_of_medians": statistics.median(unit_times) / statistics.median(plain_times),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24, help="training steps per timing")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    rows = run(args.repeats, args.steps)
    backend = keras.backend.backend()
    header = (
        f"{'model':<50} {'unit-scaled ms':>15} {'plain ms':>10} {'ratio':>7} {'(min-max)':>13}"
        f" {'ratio of medians':>17}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['model']:<50} {row['unit_scaled_ms']:>15.2f} {row['plain_ms']:>10.2f} "
            f"{row['ratio_median']:>7.3f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
            f" {row['ratio_of_medians']:>17.3f}"
        )
    table = "\n".join(lines)
    print(table)

    os.makedirs(args.out, exist_ok=True)
    device = "cpu"
    if backend == "jax":
        import jax

        device = jax.devices()[0].device_kind
    stem = os.path.join(args.out, f"overhead_{backend}_{device.replace(' ', '_').lower()}")
    record = {
        "backend": backend,
        "device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "keras": keras.__version__,
        "keras_unitscale": keras_unitscale.__version__,
        "repeats": args.repeats,
        "steps_per_timing": args.steps,
        "rows": rows,
    }
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(stem + ".txt", "w") as f:
        f.write(f"backend={backend} device={device} keras={keras.__version__} jit_compile=True\n{table}\n")
    print(f"wrote {stem}.json and {stem}.txt")


if __name__ == "__main__":
    main()
