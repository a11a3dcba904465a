"""The demo's bookkeeping, without training (the whole job runs in test_cli.py)."""

import dataclasses

import pytest

from keras_unitscale import demo


class _Task:
    name, title, metric, steps = "lm", "an LM", "bits/char", 10
    variants = {"plain": "keras.layers", "ours": "keras_unitscale.layers"}


def _row(variant, precision, loss):
    return {"task": "lm", "variant": variant, "precision": precision, "validation_loss": loss,
            "bits/char": loss / 0.6931, "finite": True, "seconds": 1.0,
            "label": f"{_Task.variants[variant]}, {demo.PRECISION_LABELS[precision]}"}


def test_each_run_is_compared_with_its_own_float32_run():
    rows = [_row("plain", "float32", 2.0), _row("plain", "fp8", 2.5), _row("ours", "float32", 1.8),
            _row("ours", "fp8", 1.81)]
    demo._relative(rows)
    assert [round(row["vs_float32"], 4) for row in rows] == [0.0, 0.25, 0.0, 0.0056]
    assert demo._goals(rows) == {"lm ours fp8": True}


def test_a_run_the_backend_cannot_do_is_reported_not_hidden():
    error = ValueError("The precision 'F16_F16_F32' is not supported by dot_general on CPU\nmore detail")
    rows = [_row("ours", "float32", 1.8), demo._not_run(_Task, "ours", "fp16", error)]
    demo._relative(rows)
    assert demo._goals(rows) == {"lm ours fp16": None}
    text = demo._table([_Task], rows)
    line = next(line for line in text.splitlines() if line.startswith("keras_unitscale.layers, FP16"))
    assert line.endswith(" not run: ValueError: The precision 'F16_F16_F32' is not supported by dot_general on CPU")
    assert "lm ours fp16 not run" in text


@pytest.mark.parametrize("steps", [1, 7, 30, 200, 401])
def test_loss_curves_record_whole_chunks_of_the_training(steps):
    chunk = demo._chunk(steps)
    assert steps % chunk == 0 and (steps // chunk >= 25 or chunk == 1)


def test_settings_refuse_a_non_positive_step_count():
    with pytest.raises(ValueError, match="steps"):
        demo.QUICK.with_steps(0)
    assert dataclasses.replace(demo.DEFAULT, width=32).steps == demo.DEFAULT.steps


def test_the_callbacks_fp8_run_trains_its_converted_layers_in_fp8(monkeypatch):
    # Not a plain model's FP8 copy (`simulate_fp8`), whose layers the callback does not convert: that run
    # was a plain FP8 run under the callback's label, its numbers the plain run's to the last digit.
    import keras

    simulated = []
    simulate = demo.precision.simulate_fp8
    monkeypatch.setattr(demo.precision, "simulate_fp8", lambda model: simulated.append(model) or simulate(model))
    task, bar = demo._SeedMLP(demo.QUICK, 0), keras.utils.Progbar(None, verbose=0)
    callback_row, _ = demo._train(task, "callback", "fp8", demo.QUICK, bar)
    assert not simulated
    plain_row, _ = demo._train(task, "plain", "fp8", demo.QUICK, bar)
    assert len(simulated) == 1
    assert callback_row["finite"] and callback_row["validation_loss"] != plain_row["validation_loss"]
