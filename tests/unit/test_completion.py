"""Completion decisions: every kind of evidence, and study-level gathering with its timeout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dicomnode.completion import (
    SeriesSnapshot,
    StudySeries,
    confirm_after,
    recognise,
    recognition_text,
    series_verdict,
    study_verdict,
)
from dicomnode.config import CompletionSettings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RULES = CompletionSettings(quiet_s=10, release_grace_s=2)


def _series(**changes: object) -> SeriesSnapshot:
    values: dict[str, object] = {
        "series_instance_uid": "1.2",
        "instances": 40,
        "first_received_at": T0,
        "last_received_at": T0,
    }
    values.update(changes)
    return SeriesSnapshot(**values)  # type: ignore[arg-type]


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_still_arriving_names_when_to_look_again() -> None:
    verdict = series_verdict(_series(), RULES, _at(1))
    assert not verdict.complete and verdict.check_again_at == _at(10)


def test_quiet_period() -> None:
    assert series_verdict(_series(), RULES, _at(10)).complete
    assert "10 s" in series_verdict(_series(), RULES, _at(10)).reason


def test_release_with_grace() -> None:
    released = _series(released_at=_at(1))
    early = series_verdict(released, RULES, _at(2))
    assert not early.complete and early.check_again_at == _at(3)
    assert series_verdict(released, RULES, _at(3)).complete


def test_whole_contiguous_series_in_one_released_association_completes_at_once() -> None:
    whole = _series(released_at=_at(0.1), whole_in_last_association=True, contiguous=True)
    assert series_verdict(whole, RULES, _at(0.1)).complete
    gappy = _series(released_at=_at(0.1), whole_in_last_association=True, contiguous=False)
    assert not series_verdict(gappy, RULES, _at(0.1)).complete
    split = _series(released_at=_at(0.1), whole_in_last_association=False, contiguous=True)
    assert not series_verdict(split, RULES, _at(0.1)).complete
    # one instance in its own association (a sender that opens one per instance) proves
    # nothing: it waits for the release grace like any other
    lone = _series(
        instances=1, released_at=_at(0.1), whole_in_last_association=True, contiguous=True
    )
    assert not series_verdict(lone, RULES, _at(0.1)).complete
    assert series_verdict(lone, RULES, _at(2.1)).complete


def test_evidence_a_split_transfer_can_fool_is_provisional() -> None:
    whole = _series(released_at=_at(0.1), whole_in_last_association=True, contiguous=True)
    verdict = series_verdict(whole, RULES, _at(0.1))
    assert verdict.complete and verdict.provisional
    # held until confirm_s after the last instance, then no longer
    assert confirm_after(whole, verdict, RULES, _at(0.1)) == _at(10)
    assert confirm_after(whole, verdict, RULES, _at(10)) is None
    grace = _series(released_at=_at(1))
    assert series_verdict(grace, RULES, _at(3)).provisional
    quiet = series_verdict(_series(), RULES, _at(10))
    assert quiet.provisional and confirm_after(_series(), quiet, RULES, _at(10)) is None
    short_quiet = CompletionSettings(quiet_s=2, confirm_s=5)
    verdict = series_verdict(_series(), short_quiet, _at(2))
    assert confirm_after(_series(), verdict, short_quiet, _at(2)) == _at(5)


def test_proof_needs_no_confirmation() -> None:
    counted = _series(expected_instances=40)
    verdict = series_verdict(counted, RULES, _at(0))
    assert verdict.complete and not verdict.provisional
    assert confirm_after(counted, verdict, RULES, _at(0)) is None
    multiframe = _series(instances=1, single_multiframe=True)
    assert not series_verdict(multiframe, RULES, _at(0)).provisional


def test_a_sender_declared_whole_completes_and_confirms_at_release() -> None:
    rules = CompletionSettings(whole_series_senders=("CT1",))
    from_ct1 = _series(released_at=_at(0.1), whole_in_last_association=True, last_calling_aet="CT1")
    verdict = series_verdict(from_ct1, rules, _at(0.1))
    assert verdict.complete and not verdict.provisional and "CT1" in verdict.reason
    # even one instance, or a stack with a gap: the site vouches for the sender
    single = _series(instances=1, released_at=_at(0.1), whole_in_last_association=True,
                     last_calling_aet="CT1", contiguous=False)  # fmt: skip
    assert series_verdict(single, rules, _at(0.1)).complete
    # another sender, or a series split over associations, gets no such trust
    other = _series(released_at=_at(0.1), whole_in_last_association=True, last_calling_aet="PACS")
    assert not series_verdict(other, rules, _at(0.1)).complete
    split = _series(released_at=_at(0.1), whole_in_last_association=False, last_calling_aet="CT1")
    assert not series_verdict(split, rules, _at(0.1)).complete


def test_expected_counts() -> None:
    assert series_verdict(_series(expected_instances=40), RULES, _at(0)).complete
    assert not series_verdict(_series(expected_instances=41), RULES, _at(0)).complete
    assert series_verdict(_series(instances=1, single_multiframe=True), RULES, _at(0)).complete
    off = CompletionSettings(expected_counts=False)
    assert not series_verdict(_series(expected_instances=40), off, _at(0)).complete


BRAIN = CompletionSettings(
    required_series={
        "T1c": r"(?i)t1.*(post|gd|\+c|contrast)",
        "T1": r"(?i)t1",
        "T2": r"(?i)t2(?!.*flair)",
        "FLAIR": r"(?i)flair",
    },
    study_timeout_s=600,
    on_missing="run",
)


def _brain(*texts: str, complete: bool = True) -> list[StudySeries]:
    return [StudySeries(f"1.{n}", text, complete, _at(n)) for n, text in enumerate(texts)]


def test_sequences_recognised_from_realistic_descriptions() -> None:
    series = _brain(
        "AX T1 MPRAGE",
        recognition_text("AX T1 MPRAGE", "t1_mprage_tra", "*tfl3d1", contrast=True),
        "AX T2 TSE",
        "AX T2 FLAIR",
        "3-plane localizer",
    )
    assert recognise(series, BRAIN.required_series) == {
        "T1c": "1.1",
        "T1": "1.0",
        "T2": "1.2",
        "FLAIR": "1.3",
    }


def test_study_runs_when_all_required_series_are_complete() -> None:
    series = _brain("T1 SE", "T1 SE +C", "T2 TSE", "FLAIR")
    verdict = study_verdict(series, BRAIN, T0, _at(5))
    assert verdict.action == "run" and set(verdict.inputs) == {"T1", "T1c", "T2", "FLAIR"}


def test_study_waits_for_incomplete_series() -> None:
    series = [*_brain("T1 SE", "T1 SE +C", "T2 TSE"), StudySeries("1.9", "FLAIR", False, _at(9))]
    verdict = study_verdict(series, BRAIN, T0, _at(10))
    assert verdict.action == "wait" and "FLAIR" in verdict.reason
    assert verdict.check_again_at == _at(600)


@pytest.mark.parametrize("on_missing,action", [("run", "run"), ("fail", "fail")])
def test_missing_flair_follows_the_routes_action(on_missing: str, action: str) -> None:
    rules = BRAIN.model_copy(update={"on_missing": on_missing})
    series = _brain("T1 SE", "T1 SE +C", "T2 TSE")
    assert study_verdict(series, rules, T0, _at(599)).action == "wait"
    verdict = study_verdict(series, rules, T0, _at(600))
    assert verdict.action == action and verdict.missing == ("FLAIR",)
    assert "FLAIR missing" in verdict.reason
    if action == "run":
        assert set(verdict.inputs) == {"T1", "T1c", "T2"}


def test_nothing_recognised_fails_even_when_told_to_run() -> None:
    verdict = study_verdict(_brain("localizer"), BRAIN, T0, _at(600))
    assert verdict.action == "fail"
