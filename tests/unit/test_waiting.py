"""The one poll-until helper of the tests, benchmarks and test peers."""

from __future__ import annotations

import itertools

import pytest

from dicomnode.testing.waiting import WaitTimeout, wait_until


def test_the_first_truthy_value_is_returned() -> None:
    calls = itertools.count()
    assert wait_until(lambda: next(calls) >= 3 and "ready", interval=0.001) == "ready"
    assert next(calls) == 4


def test_a_timeout_names_what_and_the_last_value() -> None:
    with pytest.raises(WaitTimeout, match=r"waited 0.05 s for the job; last value: \[\]") as e:
        wait_until(list, timeout=0.05, interval=0.01, what="the job", detail=lambda: "log tail")
    assert "log tail" in str(e.value) and e.value.last == []
    assert isinstance(e.value, TimeoutError)


def test_ignored_exceptions_are_retried_and_reported_others_propagate() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError("nobody there")

    with pytest.raises(WaitTimeout, match="last error: ConnectionRefusedError") as e:
        wait_until(refused, timeout=0.05, interval=0.01, ignore=OSError, what="a listener")
    assert isinstance(e.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ConnectionRefusedError):
        wait_until(refused, timeout=5)


def test_the_check_runs_once_more_at_the_deadline() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: next(calls) == 2, timeout=0.05, interval=10) is True
