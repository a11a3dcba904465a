"""Constraints: how the scales of an op are tied."""

import pytest

from keras_unitscale import constraints


def test_means():
    assert constraints.gmean(1.0, 4.0, 16.0) == pytest.approx(4.0)
    assert constraints.hmean(1.0, 3.0) == pytest.approx(1.5)
    assert constraints.amean(1.0, 2.0, 6.0) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("to_output_scale", (0.5, 0.5, 0.5)),
        ("to_left_grad_scale", (0.25, 0.25, 0.25)),
        ("to_right_grad_scale", (2.0, 2.0, 2.0)),
        ("gmean", (0.25 ** (1 / 3),) * 3),
        ("amean", (2.75 / 3,) * 3),
        (None, (0.5, 0.25, 2.0)),
    ],
)
def test_apply_constraint_gives_one_scale_per_slot(name, expected):
    assert constraints.apply_constraint(name, 0.5, 0.25, 2.0) == pytest.approx(expected)


def test_to_grad_input_scale_is_for_two_slots():
    assert constraints.apply_constraint("to_grad_input_scale", 0.5, 0.125) == (0.125, 0.125)


def test_a_callable_is_a_constraint():
    assert constraints.apply_constraint(lambda *s: max(s), 0.5, 2.0) == (2.0, 2.0)


@pytest.mark.parametrize("bad", ["mean", "", 3, 0.5])
def test_unknown_constraint_is_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=f"Received: constraint={bad!r}"):
        constraints.apply_constraint(bad, 1.0, 1.0)
