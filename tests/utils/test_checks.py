"""The one number check: every bound, open or closed, names the argument and the value."""

import math

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gd.utils.checks import check_number


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (-1, {"low": 0}, "`x` must be a finite number >= 0, got -1"),
        (0.0, {"low": 0, "low_open": True}, "`x` must be a finite number > 0, got 0.0"),
        (3, {"high": 2}, "`x` must be a finite number <= 2, got 3"),
        (1.0, {"low": 0, "high": 1, "high_open": True}, "`x` must be in [0, 1), got 1.0"),
        (0.0, {"low": 0, "high": 1, "low_open": True}, "`x` must be in (0, 1], got 0.0"),
        (math.nan, {}, "`x` must be a finite number, got nan"),
        (math.inf, {"low": 0}, "`x` must be a finite number >= 0, got inf"),
        (True, {}, "`x` must be a finite number, got True"),
        ("1", {}, "`x` must be a finite number, got '1'"),
    ],
)
def test_bad_numbers_name_the_argument_the_range_and_the_value(value, kwargs, message):
    with pytest.raises(ValueError) as err:
        check_number("x", value, **kwargs)
    assert str(err.value) == message


def test_good_numbers_come_back_as_floats_and_the_error_type_is_the_callers():
    assert check_number("x", 1, 0, 1) == 1.0 and isinstance(check_number("x", 1, 0, 1), float)
    assert check_number("x", 0.5, 0, 1, low_open=True, high_open=True) == 0.5
    with pytest.raises(MisconfigurationException, match="`lr`"):
        check_number("lr", -1.0, 0, error=MisconfigurationException)
