"""The one poll-until helper, and how a test without its real peer ends (skip, or fail on CI)."""

from __future__ import annotations

import itertools

import pytest

from dicomnode.testing import validators
from dicomnode.testing.peers import REQUIRE_PEERS_ENV, missing_peer
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


def test_a_missing_peer_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_PEERS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        missing_peer("frobnicator is not installed")
    monkeypatch.setattr(validators, "tool", lambda name: None)
    assert validators.has_tool("dciodvfy") is False
    with pytest.raises(pytest.skip.Exception, match="dicom3tools"):
        validators.require_tool("dciodvfy")


def test_a_missing_peer_fails_when_peers_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_PEERS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_PEERS_ENV}=1 requires it"):
        missing_peer("frobnicator is not installed")
    monkeypatch.setattr(validators, "tool", lambda name: None)
    for check in (validators.has_tool, validators.require_tool):
        with pytest.raises(pytest.fail.Exception, match="dcmqi"):
            check("tid1500reader")
