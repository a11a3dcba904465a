"""FP8 training speed on a GPU: our scale-free FP8 against Keras's bfloat16 and Keras's float8 quantisation.

One pre-norm transformer LM (`models.transformer_lm`), JAX backend,
`jit_compile=True`, all runs under `mixed_bfloat16`, side by side in one
process on the same random token batches:

- `keras.layers`, bfloat16: the baseline;
- `keras.layers` after `model.quantize("float8")`: Keras's FP8 training,
  with delayed per-tensor scales (an amax history per tensor);
- `keras_unitscale.layers`, bfloat16: our layers' own cost;
- `keras_unitscale.layers` under `precision.fp8()`: scale-free FP8, every
  projection, MLP and readout matmul cast (the critical ones too, unless
  `--keep-critical`).

For each: the median step time over `--repeats` windows of `--steps` steps
(after a compile and two warm-up steps; each step returns its loss to the
host, the same for every run), tokens per second, the speed-up over the
baseline, the fraction of the step's matmul FLOPs that run in FP8 (counted
from the model's shapes: the projections, MLP and readout are cast, the
attention score and value matmuls are not), and the number of cuBLAS FP8
GEMMs (`__cublas$lt$matmul$f8`) in the compiled forward-and-backward pass.

The goal: ours ≥ 1.3× the bfloat16 baseline, and faster than Keras's float8.

Usage (on a machine with an FP8 GPU, Hopper or later):
    KERAS_BACKEND=jax python benchmarks/fp8_speed.py [--width 1024] [--depth 4] [--seq 512] [--batch 32]
        [--steps 20] [--repeats 5] [--keep-critical] [--out benchmarks/results]
On a CPU it runs, but its timings say nothing about FP8 hardware.
"""

import argparse
import json
import os
import re
import statistics
import time
import warnings

import keras
import numpy as np

from keras_unitscale import losses
from keras_unitscale import models
from keras_unitscale import optimizers
from keras_unitscale import precision

# (label, layers, mode)
RUNS = (
    ("keras.layers, bfloat16", "plain", "bf16"),
    ("keras.layers, quantize('float8')", "plain", "keras-float8"),
    ("keras_unitscale.layers, bfloat16", "ours", "bf16"),
    ("keras_unitscale.layers, scale-free FP8", "ours", "fp8"),
)
FP8_GEMM = "__cublas$lt$matmul$f8"


def matmul_flops(args):
    """Forward matmul FLOPs per token: (in the cast layers, critical ones, attention's score and value matmuls)."""
    d, vocabulary = args.width, args.vocab
    projections = 2 * 3 * d * d  # query, key, value
    critical = args.depth * (2 * d * d + 2 * 4 * d * d)  # attention output, MLP down
    cast = args.depth * (projections + 2 * d * 4 * d) + 2 * d * vocabulary  # + MLP up, readout
    attention = args.depth * 2 * (2 * args.seq * d)  # scores and values, causal mask not exploited
    return cast, critical, attention


def fp8_fraction(args, mode):
    """The fraction of a step's matmul FLOPs in FP8 (backward matmuls follow their forward ones)."""
    cast, critical, attention = matmul_flops(args)
    total = cast + critical + attention
    if mode == "keras-float8":  # every Dense and EinsumDense
        return (cast + critical) / total
    if mode == "fp8":
        return (cast + (0 if args.keep_critical else critical)) / total
    return 0.0


def build(layers, mode, args):
    keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = models.transformer_lm(args.vocab, args.width, args.depth, head_dim=args.head_dim, seq_len=args.seq,
                                  parametrization="u-mup" if layers == "ours" else "standard")
    if mode == "keras-float8":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")  # Add, norms, ...
            model.quantize("float8")
    if layers == "ours":
        optimizer, loss = optimizers.Adam(2.0**-6), losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        optimizer, loss = keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer, loss, jit_compile=True, auto_scale_loss=False)
    return model


def fp8_gemms(model, x, y):
    """The number of cuBLAS FP8 GEMMs in the compiled forward-and-backward pass (0 where there are none)."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable, non_trainable, x, y):
        logits, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return model.loss(y, logits)

    text = jax.jit(jax.grad(loss)).lower(trainable, non_trainable, x, y).compile().as_text()
    return len(re.findall(re.escape(FP8_GEMM), text))


def run(label, layers, mode, data, args):
    x, y = data
    with precision.fp8(enabled=mode == "fp8", critical=not args.keep_critical):
        model = build(layers, mode, args)
        started = time.perf_counter()
        model.train_on_batch(x[0], y[0])
        compile_seconds = time.perf_counter() - started
        for i in range(2):
            model.train_on_batch(x[i % len(x)], y[i % len(y)])
        windows = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for i in range(args.steps):
                loss = model.train_on_batch(x[i % len(x)], y[i % len(y)])
            windows.append((time.perf_counter() - started) / args.steps)
        gemms = fp8_gemms(model, x[0], y[0])
    keras.config.set_dtype_policy("float32")
    step = statistics.median(windows)
    return {"run": label, "layers": layers, "mode": mode, "step_ms": 1000 * step,
            "step_ms_range": [1000 * min(windows), 1000 * max(windows)],
            "tokens_per_s": args.batch * args.seq / step, "compile_s": compile_seconds,
            "final_loss": float(loss), "fp8_flop_fraction": fp8_fraction(args, mode), "fp8_gemms": gemms}


def table(rows, args, device):
    base = next(r["step_ms"] for r in rows if r["mode"] == "bf16" and r["layers"] == "plain")
    lines = [f"FP8 speed, JAX on {device}: transformer LM width {args.width}, depth {args.depth}, heads of "
             f"{args.head_dim}, {args.batch}×{args.seq} = {args.batch * args.seq} tokens a step, vocabulary "
             f"{args.vocab}; median of {args.repeats} windows of {args.steps} steps",
             f"{'run':<42}{'step ms':>9}{'range':>17}{'tokens/s':>11}{'× bf16':>8}{'FP8 FLOPs':>11}"
             f"{'FP8 GEMMs':>11}{'loss':>8}"]
    for r in rows:
        low, high = r["step_ms_range"]
        lines.append(f"{r['run']:<42}{r['step_ms']:>9.2f}{f'{low:.2f}–{high:.2f}':>17}{r['tokens_per_s']:>11.0f}"
                     f"{base / r['step_ms']:>8.2f}{100 * r['fp8_flop_fraction']:>10.0f}%{r['fp8_gemms']:>11}"
                     f"{r['final_loss']:>8.3f}")
    ours = next(r["step_ms"] for r in rows if r["mode"] == "fp8")
    keras_fp8 = next(r["step_ms"] for r in rows if r["mode"] == "keras-float8")
    lines.append(f"goal, ours ≥ 1.3× bfloat16: {'yes' if base / ours >= 1.3 else 'NO'} ({base / ours:.2f}×); "
                 f"faster than Keras float8: {'yes' if ours < keras_fp8 else 'NO'} ({keras_fp8 / ours:.2f}×)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep-critical", action="store_true",
                        help="leave u-μP's critical matmuls (attention output, MLP down) in bfloat16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if keras.backend.backend() != "jax":
        raise SystemExit(f"fp8_speed.py measures XLA's FP8 GEMMs: run it with KERAS_BACKEND=jax. "
                         f"Received: {keras.backend.backend()}")
    import jax

    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, size=(4, args.batch, args.seq + 1)).astype("int32")
    data = (tokens[..., :-1], tokens[..., 1:])
    progress = keras.utils.Progbar(len(RUNS), unit_name="run")
    rows = []
    for label, layers, mode in RUNS:
        rows.append(run(label, layers, mode, data, args))
        progress.add(1, values=[("step ms", rows[-1]["step_ms"])])
    text = table(rows, args, device)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "fp8_speed_jax_" + re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower())
    with open(stem + ".json", "w") as f:
        json.dump({"device": device, "args": vars(args), "rows": rows}, f, indent=1)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    print(f"wrote {stem}.txt and .json")


if __name__ == "__main__":
    main()
