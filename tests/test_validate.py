"""Argument checks: one message form, bools never pass for numbers, intervals exactly as stated."""

import math

import pytest

from advx._validate import check_bool, check_bounds, check_choice, check_float, check_int, fail
from advx.errors import InputError


def test_messages_name_the_owner_the_argument_what_was_expected_and_what_came():
    with pytest.raises(InputError, match=r"^PGD: steps must be a positive int, got 0$"):
        check_int(0, name="steps", who="PGD")
    with pytest.raises(InputError, match=r"^n must be an int from 1 to 9, got 10; fewer$"):
        check_int(10, name="n", low=1, high=9, hint="fewer")
    assert str(fail("fit", "lr", "a number", "x")) == "fit: lr must be a number, got 'x'"


@pytest.mark.parametrize("bad", [True, False, 1.0, "3", None])
def test_ints_refuse_bools_floats_strings_and_none(bad):
    with pytest.raises(InputError):
        check_int(bad, name="k")


def test_none_passes_only_when_allowed():
    assert check_int(None, name="k", allow_none=True) is None
    assert check_float(None, name="f", allow_none=True) is None
    with pytest.raises(InputError, match="or None"):
        check_int(0, name="k", allow_none=True)


def test_float_intervals_open_and_closed_and_infinity():
    assert check_float(0, name="f") == 0.0
    with pytest.raises(InputError, match="> 0"):
        check_float(0, name="f", low_open=True)
    assert check_float(1, name="f", high=1) == 1.0
    with pytest.raises(InputError, match="< 1"):
        check_float(1, name="f", high=1, high_open=True)
    with pytest.raises(InputError, match="finite"):
        check_float(math.inf, name="f")
    assert check_float(math.inf, name="f", allow_inf=True) == math.inf
    for bad in (math.nan, True, "1"):
        with pytest.raises(InputError):
            check_float(bad, name="f", allow_inf=True)


def test_choices_bools_and_bounds():
    assert check_choice("ce", ("ce", "dlr"), name="loss") == "ce"
    with pytest.raises(InputError, match=r"loss must be one of 'ce', 'dlr', got 'x'"):
        check_choice("x", ("ce", "dlr"), name="loss")
    with pytest.raises(InputError, match="True or False"):
        check_bool(1, name="flag")
    assert check_bounds([0, 255]) == (0.0, 255.0)
    for bad in ((1, 0), (0, math.inf), "ab", (0,)):
        with pytest.raises(InputError, match="bounds"):
            check_bounds(bad)
