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
import os

import keras
import numpy as np
from keras import ops

from keras_unitscale import functional as U
from keras_unitscale.scale import scaling_disabled

import timing


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


def run(repeats, steps):
    rows = []
    for name, (case, batch) in CASES.items():
        timing.fresh_compiler_cache()
        unit, x, y = _compiled(case, batch, scale_ops=True)
        plain, _, _ = _compiled(case, batch, scale_ops=False)
        rows.append(timing.compare(name, unit, plain, x, y, batch, repeats, steps))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=48, help="training steps per timing")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rows = run(args.repeats, args.steps)
    timing.report(rows, "unit-scaled", "plain", "overhead", args.out,
                  {"jit_compile": True, "repeats": args.repeats, "steps_per_timing": args.steps})


if __name__ == "__main__":
    main()
