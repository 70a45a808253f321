import pytest

from tests.helpers.timeouts import FACTOR_VARIABLE, scaled_timeout


def test_timeouts_scale_with_the_variable_and_never_shrink(monkeypatch):
    monkeypatch.delenv(FACTOR_VARIABLE, raising=False)
    assert 100 <= scaled_timeout(100) <= 800  # at most 8x for the load
    monkeypatch.setenv(FACTOR_VARIABLE, "3")
    assert 300 <= scaled_timeout(100) <= 2400
    monkeypatch.setenv(FACTOR_VARIABLE, "0")
    with pytest.raises(ValueError, match=f"{FACTOR_VARIABLE} must be positive"):
        scaled_timeout(100)
