"""Side-by-side training-step timing, shared by the benchmarks.

Each case is two compiled Keras models on the same data ("ours" and a
baseline). Repeats alternate between the two, so that drift in the machine's
speed hits both alike; each repeat times `fit` over a fixed number of steps.
Reported: median step times, the median of the per-repeat ratios with its
range, and the ratio of the two medians.
"""

import json
import os
import platform
import statistics
import time

import keras

import keras_unitscale


def fresh_compiler_cache():
    """Starts a case with an empty `torch.compile` cache (PyTorch only; elsewhere nothing to do).

    Dynamo keeps at most `recompile_limit` (8) compiled versions of each code
    object and runs a frame eagerly once it has that many. Keras's training
    step and `Layer.__call__` are the same code objects for every model in the
    process, so the models of earlier cases would use up the limit and leave a
    later case partly eager: a cost of the benchmark, not of either model.
    """
    if keras.backend.backend() == "torch":
        import torch

        torch._dynamo.reset()


def step_time(model, x, y, batch, steps):
    steps_per_epoch = len(x) // batch
    epochs = max(1, steps // steps_per_epoch)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    return (time.perf_counter() - start) / (epochs * steps_per_epoch)


def compare(name, ours, baseline, x, y, batch, repeats, steps):
    """Times two compiled (and already traced) models side by side; returns a result row."""
    ours_times, baseline_times, ratios = [], [], []
    progress = keras.utils.Progbar(repeats, unit_name="repeat")
    for _ in range(repeats):
        ours_times.append(step_time(ours, x, y, batch, steps))
        baseline_times.append(step_time(baseline, x, y, batch, steps))
        ratios.append(ours_times[-1] / baseline_times[-1])
        progress.add(1)
    return {
        "model": name,
        "ours_ms": 1e3 * statistics.median(ours_times),
        "baseline_ms": 1e3 * statistics.median(baseline_times),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_of_medians": statistics.median(ours_times) / statistics.median(baseline_times),
    }


def device_name():
    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind
    return "cpu"


def environment():
    """What a timing record says it ran on: backend, device, machine and versions."""
    return {
        "backend": keras.backend.backend(),
        "device": device_name(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "keras": keras.__version__,
        "keras_unitscale": keras_unitscale.__version__,
    }


def report(rows, ours_label, baseline_label, stem, out_dir, settings):
    """Prints the table and writes `<stem>_<backend>_<device>.{json,txt}` in `out_dir`."""
    header = (
        f"{'model':<52} {ours_label + ' ms':>16} {baseline_label + ' ms':>14} {'ratio':>7}"
        f" {'(min-max)':>13} {'ratio of medians':>17}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['model']:<52} {row['ours_ms']:>16.2f} {row['baseline_ms']:>14.2f} "
            f"{row['ratio_median']:>7.3f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
            f" {row['ratio_of_medians']:>17.3f}"
        )
    table = "\n".join(lines)
    print(table)

    backend, device = keras.backend.backend(), device_name()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}_{backend}_{device.replace(' ', '_').lower()}")
    record = {
        **environment(),
        "ours": ours_label,
        "baseline": baseline_label,
        **settings,
        "rows": rows,
    }
    with open(path + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(path + ".txt", "w") as f:
        f.write(f"backend={backend} device={device} keras={keras.__version__} {settings}\n{table}\n")
    print(f"wrote {path}.json and {path}.txt")
