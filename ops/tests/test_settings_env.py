"""Settings read from the environment: a bad value stops start-up with a message naming it."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from mcp_project.settings import env_float, env_int


def test_numbers_from_the_environment(monkeypatch):
    monkeypatch.delenv("HUB_TEST_NUMBER", raising=False)
    assert env_float("HUB_TEST_NUMBER", 1.1) == 1.1
    monkeypatch.setenv("HUB_TEST_NUMBER", "4")
    assert env_float("HUB_TEST_NUMBER", 1.1) == 4.0
    assert env_int("HUB_TEST_NUMBER", 1) == 4


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("fast", "HUB_TEST_NUMBER must be a number, got 'fast'"),
        ("nan", "HUB_TEST_NUMBER must be >= 0.0, got 'nan'"),
        ("-1", "HUB_TEST_NUMBER must be >= 0.0, got '-1'"),
    ],
)
def test_a_bad_number_names_the_variable(monkeypatch, raw, message):
    monkeypatch.setenv("HUB_TEST_NUMBER", raw)
    with pytest.raises(ImproperlyConfigured, match=message):
        env_float("HUB_TEST_NUMBER", 1.1)
