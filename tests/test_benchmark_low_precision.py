"""benchmarks/low_precision.py: a run a backend cannot make is reported as not run, and the goal says so."""

import os
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import low_precision  # noqa: E402  (the benchmark module, from benchmarks/)


def _row(layers, precision, loss):
    return {"model": "lstm", "layers": layers, "precision": precision, "validation_loss": loss, "finite": True,
            "seconds": 1.0}


def test_a_run_that_fails_is_a_row_that_says_why_and_the_policy_is_float32_again():
    def build(parametrization):
        raise ValueError("The precision 'F16_F16_F32' is not supported by dot_general on CPU\nmore lines")

    no_data = ((None, None), (None, None))
    row = low_precision.run("transformer", build, "ours", "fp16", no_data, None, True)
    assert row == {"model": "transformer", "layers": "ours", "precision": "fp16", "finite": False,
                   "error": "ValueError: The precision 'F16_F16_F32' is not supported by dot_general on CPU"}
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("fp8_loss, verdict", [(1.01, "FP8 yes"), (1.03, "FP8 NO")])
def test_the_table_shows_a_failed_or_missing_run_as_not_run(fp8_loss, verdict):
    rows = [_row("ours", "float32", 1.0), _row("ours", "fp8", fp8_loss),
            {"model": "lstm", "layers": "plain", "precision": "fp16", "error": "ValueError: no float16 here",
             "finite": False}]
    text = low_precision.table(rows, 300)
    (line,) = [line for line in text.splitlines() if line.startswith("plain FP16, no loss scaling")]
    assert line.split() == ["plain", "FP16,", "no", "loss", "scaling", "not", "run:", "ValueError:", "no", "float16",
                            "here"]
    # Ours in FP16 has no row at all (not asked for): not run, never a pass.
    assert text.splitlines()[-1] == f"goal, ours within 2% of ours float32: FP16 not run, {verdict}"


def test_without_ours_in_float32_nothing_is_measured_against_it():
    rows = [{"model": "lstm", "layers": "ours", "precision": "float32", "error": "ValueError: out of memory",
             "finite": False}, _row("ours", "fp8", 1.0), _row("plain", "float32", 2.0)]
    text = low_precision.table(rows, 300)
    assert "%" not in text.split("goal")[0].split("grad sat")[1]  # no run is given a change against a missing base
    assert text.splitlines()[-1] == "goal, ours within 2% of ours float32: FP16 not run, FP8 not run"
