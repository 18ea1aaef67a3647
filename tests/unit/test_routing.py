"""Routing rules: condition kinds, first/all/fallback, config errors, partial routing, explain."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnode.config import RouteSettings, RoutingSettings, Settings, load_settings
from dicomnode.domain import Priority
from dicomnode.errors import ConfigError
from dicomnode.phantoms.simple import SeriesSpec, ct_slices, multiframe
from dicomnode.phantoms.writer import ENHANCED_MR_IMAGE_STORAGE
from dicomnode.routing import Basis, Outcome, Router, SeriesFacts

CT = {
    "Modality": "CT",
    "BodyPartExamined": "CHEST",
    "SeriesDescription": "Thorax 1.0 B70f",
    "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
    "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
    "Rows": 512,
    "Columns": 512,
    "SliceThickness": 1.0,
    "SeriesNumber": 3,
}


def router(*routes: dict[str, Any], **routing: Any) -> Router:
    """A router built through the settings, as the config file would build it."""
    return Router.from_settings(
        Settings(routes=[{"model": "m", **r} for r in routes], routing=routing)
    )


def facts(slices: int | None = 120, calling_aet: str | None = "CT1", **changes: Any) -> SeriesFacts:
    return SeriesFacts.from_mapping({**CT, **changes}, slices=slices, calling_aet=calling_aet)


def matches(match: dict[str, Any], series: SeriesFacts | None = None) -> bool:
    decision = router({"name": "r", "match": match}).route(series or facts())
    return [r.name for r in decision.routes] == ["r"]


# --- condition kinds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "match,expected",
    [
        ({"Modality": "CT"}, True),
        ({"Modality": " ct "}, True),  # case and surrounding spaces ignored
        ({"Modality": "MR"}, False),
        ({"Modality": "C"}, False),  # whole value, not a substring
        ({"BodyPartExamined": "chest"}, True),
        ({"SeriesDescription": "thorax 1.0 b70f"}, True),
        ({"SeriesNumber": "3"}, True),  # text against a number
        ({"calling_aet": "ct1"}, True),
        ({"calling_aet": "MR1"}, False),
    ],
)
def test_text_is_exact_and_ignores_case(match: dict[str, Any], expected: bool) -> None:
    assert matches(match) is expected


def test_multi_valued_attribute_matches_when_any_value_does() -> None:
    assert matches({"ImageType": "axial"})
    assert matches({"ImageType": "re:^PRIM"})
    assert not matches({"ImageType": "LOCALIZER"})
    assert not matches({"ImageType": "ORIGINAL\\PRIMARY"})


@pytest.mark.parametrize(
    "match,expected",
    [
        ({"Rows": 512}, True),
        ({"rows": 512, "columns": 512}, True),
        ({"rows": 256}, False),
        ({"SliceThickness": 1}, True),
        ({"slices": 120}, True),
        ({"slices": 121}, False),
        ({"Modality": 1}, False),  # a number never equals a non-numeric text
    ],
)
def test_number_is_numeric_equality(match: dict[str, Any], expected: bool) -> None:
    assert matches(match) is expected


def test_list_matches_any_of_its_items() -> None:
    assert matches({"Modality": ["MR", "ct"]})
    assert matches({"Rows": [256, 512]})
    assert matches({"SeriesDescription": ["re:(?i)lung", "re:(?i)thorax"]})
    assert not matches({"Modality": ["MR", "PT"]})


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("re:Thorax", True),
        ("re:thorax", False),  # Python semantics: case matters unless (?i)
        ("re:(?i)THORAX", True),
        ("re:B70f$", True),  # searched anywhere
        ("re:^B70f", False),
        ("re:(?i)(chest|thorax|lung)", True),
    ],
)
def test_regular_expression_is_searched(pattern: str, expected: bool) -> None:
    assert matches({"SeriesDescription": pattern}) is expected


@pytest.mark.parametrize(
    "match,expected",
    [
        ({"slices": {"min": 50, "max": 1000}}, True),
        ({"slices": {"min": 120, "max": 120}}, True),  # inclusive at both ends
        ({"slices": {"min": 121}}, False),
        ({"slices": {"max": 119}}, False),
        ({"slices": {"max": 120}}, True),
        ({"rows": {"min": 256, "max": 1024}}, True),
        ({"Columns": {"max": 256}}, False),
        ({"SliceThickness": {"max": 1.5}}, True),  # a DS attribute
        ({"SliceThickness": {"min": 1.25}}, False),
    ],
)
def test_range_is_inclusive(match: dict[str, Any], expected: bool) -> None:
    assert matches(match) is expected


def test_uid_matches_its_name_or_keyword() -> None:
    assert matches({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"})
    assert matches({"SOPClassUID": "ct image storage"})
    assert matches({"SOPClassUID": "CTImageStorage"})
    assert matches({"SOPClassUID": ["MR Image Storage", "CT Image Storage"]})
    assert not matches({"SOPClassUID": "MR Image Storage"})


def test_absent_attribute_fails_every_condition() -> None:
    assert not matches({"Manufacturer": "re:.*"})
    assert not matches({"PatientWeight": {"min": 0}})
    assert matches({"Manufacturer": "re:(?i)siemens"}, facts(Manufacturer="SIEMENS"))


def test_all_keys_must_hold() -> None:
    assert matches({"Modality": "CT", "BodyPartExamined": "CHEST", "slices": {"min": 50}})
    assert not matches({"Modality": "CT", "BodyPartExamined": "HEAD", "slices": {"min": 50}})


def test_empty_match_matches_every_series() -> None:
    assert matches({})


def test_config_file_values_compile(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        "[routing]\n"
        'fallback = "other"\n'
        "[[destinations]]\n"
        'name = "PACS"\n'
        'url = "http://127.0.0.1:8042/dicom-web"\n'
        "[[routes]]\n"
        'name = "chest-ct"\n'
        'model = "lung_nodule_ct"\n'
        'destinations = ["PACS"]\n'
        'priority = "stat"\n'
        "[routes.match]\n"
        'Modality = "CT"\n'
        'SeriesDescription = "re:(?i)thorax|chest"\n'
        "slices = {min = 50}\n"
        "rows = [512, 1024]\n"
        "[[routes]]\n"
        'name = "other"\n'
        'model = "triage"\n'
        'level = "study"\n'
    )
    router = Router.from_settings(load_settings(config))
    decision = router.route(facts())
    assert decision.basis is Basis.FIRST
    (chest,) = decision.routes
    assert (chest.name, chest.model, chest.destinations) == (
        "chest-ct",
        "lung_nodule_ct",
        ("PACS",),
    )
    assert chest.priority is Priority.STAT and chest.level == "series"
    (other,) = router.route(facts(slices=10)).routes
    assert (other.name, other.model, other.priority, other.level) == (
        "other",
        "triage",
        Priority.ROUTINE,
        "study",
    )


# --- combining rules --------------------------------------------------------------------------

ROUTES = (
    {"name": "ct", "model": "a", "match": {"Modality": "CT"}, "priority": "urgent"},
    {"name": "chest", "model": "b", "match": {"BodyPartExamined": "CHEST"}, "priority": "stat"},
    {"name": "mr", "model": "c", "match": {"Modality": "MR"}},
    {"name": "other", "model": "d"},
)


def test_first_mode_takes_the_first_match_in_config_order() -> None:
    decision = router(*ROUTES, mode="first", fallback="other").route(facts())
    assert [(r.name, r.model, r.priority) for r in decision.routes] == [
        ("ct", "a", Priority.URGENT)
    ]
    assert decision.basis is Basis.FIRST and decision.settled and not decision.skipped


def test_all_mode_takes_every_match_but_not_the_fallback() -> None:
    decision = router(*ROUTES, mode="all", fallback="other").route(facts())
    assert [r.name for r in decision.routes] == ["ct", "chest"]
    assert [r.priority for r in decision.routes] == [Priority.URGENT, Priority.STAT]
    assert decision.basis is Basis.ALL


def test_fallback_only_when_nothing_else_matches() -> None:
    for mode in ("first", "all"):
        decision = router(*ROUTES, mode=mode, fallback="other").route(
            facts(Modality="US", BodyPartExamined="ABDOMEN")
        )
        assert [r.name for r in decision.routes] == ["other"]
        assert decision.basis is Basis.FALLBACK


def test_without_fallback_an_unmatched_series_is_skipped() -> None:
    decision = router(*ROUTES[:3]).route(facts(Modality="US", BodyPartExamined="ABDOMEN"))
    assert decision.routes == () and decision.skipped and decision.basis is Basis.NONE


def test_fallback_conditions_must_hold_too() -> None:
    routes = (ROUTES[2], {"name": "any-ct", "model": "d", "match": {"Modality": "CT"}})
    rules = router(*routes, fallback="any-ct")
    assert [r.name for r in rules.route(facts()).routes] == ["any-ct"]
    assert rules.route(facts(Modality="US")).skipped


def test_a_route_without_fallback_setting_that_matches_all_is_ordinary() -> None:
    decision = router(*ROUTES, mode="all").route(facts())
    assert [r.name for r in decision.routes] == ["ct", "chest", "other"]


# --- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "match,named",
    [
        ({"Modalty": "CT"}, ["'brain'", "'Modalty'", "not a DICOM keyword", "'Modality'"]),
        ({"Slices": {"min": 3}}, ["'brain'", "'Slices'", "did you mean 'slices'"]),
        ({"SeriesDescription": "re:(?i)t1(post"}, ["'brain'", "SeriesDescription", "re:(?i)t1("]),
        ({"Modality": {"min": 3}}, ["'brain'", "match.Modality", "range", "CS"]),
        ({"slices": {"least": 3}}, ["'brain'", "match.slices", "min and/or max", "least"]),
        ({"slices": {"min": 30, "max": 3}}, ["'brain'", "match.slices", "greater than max"]),
        ({"Modality": []}, ["'brain'", "match.Modality", "empty list"]),
        ({"ReferencedImageSequence": "x"}, ["'brain'", "ReferencedImageSequence", "VR SQ"]),
        ({"PixelData": "x"}, ["'brain'", "PixelData", "VR OB or OW"]),
    ],
)
def test_bad_rules_are_refused_naming_route_and_key(
    match: dict[str, Any], named: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        router({"name": "brain", "match": match})
    for text in named:
        assert text in str(raised.value)


def test_fallback_must_name_a_route() -> None:
    routes = [RouteSettings(name="ct", model="a")]
    with pytest.raises(ConfigError, match=r"routing\.fallback 'nope' names no route"):
        Router.from_routes(routes, RoutingSettings(fallback="nope"))


def test_invalid_regex_in_config_file_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[[routes]]\nname = "brain-mr"\nmodel = "m"\n[routes.match]\nSeriesDescription = "re:["\n'
    )
    with pytest.raises(ConfigError, match=r"route 'brain-mr': match.SeriesDescription"):
        Router.from_settings(load_settings(config))


# --- partial routing: slices unknown until the series is complete ------------------------------

COUNTED = (
    {"name": "thin-ct", "model": "a", "match": {"Modality": "CT", "slices": {"min": 100}}},
    {"name": "any-ct", "model": "b", "match": {"Modality": "CT"}},
    {"name": "mr", "model": "c", "match": {"Modality": "MR", "slices": {"min": 20}}},
    {"name": "other", "model": "d"},
)


def test_unknown_slices_are_pending_in_partial_routing() -> None:
    rules = router(*COUNTED[:1])
    decision = rules.route(facts(slices=None), partial=True)
    assert [(r.name, r.pending) for r in decision.routes] == [("thin-ct", True)]
    assert not decision.settled and decision.basis is Basis.PENDING
    # at completion the count decides
    assert rules.route(facts(slices=150)).settled
    assert [r.name for r in rules.route(facts(slices=150)).routes] == ["thin-ct"]
    assert rules.route(facts(slices=30)).skipped


def test_unknown_slices_fail_when_not_partial() -> None:
    rules = router(*COUNTED[:1])
    assert rules.route(facts(slices=None)).skipped
    (explanation,) = rules.explain(facts(slices=None))
    assert explanation.conditions[1].text == "slices is unknown (expected >= 100)"


def test_partial_routing_fails_what_is_already_known() -> None:
    decision = router(*COUNTED[:1]).route(facts(slices=None, Modality="MR"), partial=True)
    assert decision.skipped and decision.settled  # final: no slice count can make it match


def test_partial_first_mode_keeps_pending_routes_before_the_first_sure_match() -> None:
    rules = router(*COUNTED, fallback="other")
    decision = rules.route(facts(slices=None), partial=True)
    assert [(r.name, r.pending) for r in decision.routes] == [
        ("thin-ct", True),
        ("any-ct", False),
    ]
    assert not decision.settled and decision.basis is Basis.FIRST
    assert [r.name for r in rules.route(facts(slices=20)).routes] == ["any-ct"]
    assert [r.name for r in rules.route(facts(slices=200)).routes] == ["thin-ct"]


def test_partial_fallback_is_pending_while_a_route_may_still_match() -> None:
    rules = router(*COUNTED, fallback="other")
    decision = rules.route(facts(slices=None, Modality="MR"), partial=True)
    assert [(r.name, r.pending) for r in decision.routes] == [("mr", True), ("other", True)]
    assert [r.name for r in rules.route(facts(slices=5, Modality="MR")).routes] == ["other"]
    assert [r.name for r in rules.route(facts(slices=50, Modality="MR")).routes] == ["mr"]


def test_partial_routing_with_all_known_is_settled() -> None:
    decision = router(*COUNTED).route(facts(slices=150), partial=True)
    assert decision.settled and [r.name for r in decision.routes] == ["thin-ct"]


def test_unknown_calling_aet_is_pending_too() -> None:
    rules = router({"name": "r", "match": {"calling_aet": "CT1"}})
    assert rules.route(facts(calling_aet=None), partial=True).routes[0].pending
    assert rules.route(facts(calling_aet=None)).skipped


# --- explain ----------------------------------------------------------------------------------


def test_explain_gives_actual_and_expected_for_every_condition() -> None:
    rules = router(
        {
            "name": "chest-ct",
            "match": {
                "Modality": "CT",
                "SeriesDescription": "re:(?i)chest",
                "slices": {"min": 50, "max": 1000},
                "ImageType": ["LOCALIZER", "SCOUT"],
                "Manufacturer": "GE",
                "Rows": 512,
            },
        },
    )
    (rule,) = rules.explain(facts(slices=12, SeriesDescription="AX T2"))
    assert [c.text for c in rule.conditions] == [
        "Modality 'CT' matches 'CT'",
        "SeriesDescription 'AX T2' does not match re:(?i)chest",
        "slices 12 is not in 50..1000",
        "ImageType ['ORIGINAL', 'PRIMARY', 'AXIAL'] matches none of 'LOCALIZER', 'SCOUT'",
        "Manufacturer is absent (expected 'GE')",
        "Rows 512 equals 512",
    ]
    assert [c.outcome for c in rule.conditions] == [
        Outcome.MATCH,
        Outcome.NO_MATCH,
        Outcome.NO_MATCH,
        Outcome.NO_MATCH,
        Outcome.NO_MATCH,
        Outcome.MATCH,
    ]
    second = rule.conditions[1]
    assert (second.key, second.expected, second.actual) == (
        "SeriesDescription",
        "re:(?i)chest",
        "AX T2",
    )
    assert rule.conditions[3].expected == "any of 'LOCALIZER', 'SCOUT'"
    assert rule.conditions[3].actual == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert rule.outcome is Outcome.NO_MATCH and not rule.chosen
    assert rule.reason.startswith("does not match: SeriesDescription 'AX T2' does not match")


def test_explain_first_mode_says_which_was_chosen_and_why_not_the_others() -> None:
    explained = {e.route: e for e in router(*ROUTES, fallback="other").explain(facts())}
    assert explained["ct"].chosen
    assert explained["ct"].reason == "chosen: the first route that matches (routing.mode = first)"
    assert not explained["chest"].chosen and explained["chest"].outcome is Outcome.MATCH
    assert explained["chest"].reason == "matches, but 'ct' comes first (routing.mode = first)"
    assert explained["mr"].reason == "does not match: Modality 'CT' does not match 'MR'"
    assert explained["other"].fallback and not explained["other"].chosen
    assert explained["other"].reason == "the fallback, not needed: 'ct' matched"


def test_explain_all_mode_and_fallback() -> None:
    rules = router(*ROUTES, mode="all", fallback="other")
    explained = {e.route: e for e in rules.explain(facts())}
    assert explained["chest"].reason == "chosen: it matches (routing.mode = all)"
    assert explained["other"].reason == "the fallback, not needed: 'ct', 'chest' matched"
    unmatched = {e.route: e for e in rules.explain(facts(Modality="US", BodyPartExamined="x"))}
    assert unmatched["other"].chosen
    assert unmatched["other"].reason == (
        "chosen: the fallback (routing.fallback), as no other route matches"
    )
    assert [e.chosen for e in unmatched.values()] == [False, False, False, True]


def test_explain_when_nothing_matches() -> None:
    rules = router(*ROUTES[:3])
    explained = rules.explain(facts(Modality="US", BodyPartExamined="ABDOMEN"))
    assert [e.outcome for e in explained] == [Outcome.NO_MATCH] * 3
    assert not any(e.chosen for e in explained)
    assert explained[1].reason == (
        "does not match: BodyPartExamined 'ABDOMEN' does not match 'CHEST'"
    )
    unmet_fallback = router(ROUTES[2], {"name": "f", "match": {"Modality": "CT"}}, fallback="f")
    reason = unmet_fallback.explain(facts(Modality="US"))[1].reason
    assert reason == "the fallback, but it does not match: Modality 'US' does not match 'CT'"


def test_explain_partial_routing() -> None:
    explained = {
        e.route: e
        for e in router(*COUNTED, fallback="other").explain(
            facts(slices=None, Modality="MR"), partial=True
        )
    }
    mr = explained["mr"]
    assert mr.outcome is Outcome.PENDING and mr.chosen
    assert mr.conditions[1].text == "slices is not known yet (expected >= 20)"
    assert mr.reason == (
        "pending, decided when the series is complete: slices is not known yet (expected >= 20)"
    )
    assert explained["other"].reason == (
        "the fallback, if 'mr' does not match when the series is complete"
    )
    explained = {
        e.route: e
        for e in router(*COUNTED, fallback="other").explain(facts(slices=None), partial=True)
    }
    assert explained["any-ct"].reason == (
        "matches; chosen unless 'thin-ct' matches when the series is complete "
        "(routing.mode = first)"
    )


# --- facts from datasets ----------------------------------------------------------------------


def test_facts_from_the_datasets_of_a_series() -> None:
    series = list(ct_slices(SeriesSpec(slices=7, rows=48, columns=40, pixel_mm=0.5, seed=3)))
    facts = SeriesFacts.from_datasets(series, calling_aet="CT1")
    assert (facts.slices, facts.calling_aet) == (7, "CT1")
    attributes = facts.attributes
    assert (attributes["Rows"], attributes["Columns"], attributes["Modality"]) == (48, 40, "CT")
    assert attributes["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert attributes["PatientName"] == "Phantom^Chest"
    assert attributes["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"  # File Meta too
    assert "PixelData" not in attributes
    with pytest.raises(TypeError):
        attributes["Modality"] = "MR"  # type: ignore[index]
    rules = router(
        {"name": "ct", "match": {"Modality": "CT", "slices": 7, "rows": {"max": 64}}},
    )
    assert [r.name for r in rules.route(facts).routes] == ["ct"]


def test_facts_refuse_datasets_of_several_series() -> None:
    first = next(ct_slices(SeriesSpec(slices=1, seed=1)))
    second = next(ct_slices(SeriesSpec(slices=1, seed=2)))
    with pytest.raises(ValueError, match="of 2 series"):
        SeriesFacts.from_datasets([first, second])


def test_facts_from_a_real_file_and_a_multiframe_object() -> None:
    mr = dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    facts = SeriesFacts.from_dataset(mr, slices=1)
    assert facts.attributes["Modality"] == "MR"
    assert facts.attributes["SliceThickness"] == 0.8
    assert facts.attributes["ImageType"] == ("DERIVED", "SECONDARY", "OTHER")
    assert "PatientSize" not in facts.attributes  # empty DS: absent
    enhanced = SeriesFacts.from_datasets([multiframe(ENHANCED_MR_IMAGE_STORAGE, frames=6)])
    assert (enhanced.slices, enhanced.attributes["NumberOfFrames"]) == (1, 6)
    rules = router({"name": "mf", "match": {"NumberOfFrames": {"min": 5}, "Modality": "MR"}})
    assert not rules.route(enhanced).skipped


def test_facts_are_plain_values() -> None:
    facts = SeriesFacts.from_mapping({"Modality": " CT ", "ImageType": ["A", "B"], "X": None})
    assert dict(facts.attributes) == {"Modality": "CT", "ImageType": ("A", "B")}
    assert dataclasses.replace(facts, slices=3).slices == 3


# --- shadow routes ----------------------------------------------------------------------------


def test_a_shadow_route_matches_beside_the_first_live_route() -> None:
    rules = router(
        {"name": "chest", "match": {"Modality": "CT"}},
        {"name": "chest_next", "match": {"Modality": "CT"}, "mode": "shadow"},
        {"name": "later", "match": {"Modality": "CT"}},
        {"name": "mr_next", "match": {"Modality": "MR"}, "mode": "shadow"},
    )  # fmt: skip
    decision = rules.route(facts())
    assert [(r.name, r.mode) for r in decision.routes] == [
        ("chest", "live"),
        ("chest_next", "shadow"),
    ]
    assert decision.basis is Basis.FIRST
    explained = {e.route: e for e in rules.explain(facts())}
    assert explained["chest"].reason.startswith("chosen: the first route that matches")
    assert explained["chest_next"].chosen and explained["chest_next"].reason.startswith("shadow:")
    assert not explained["later"].chosen and not explained["mr_next"].chosen


def test_a_shadow_route_alone_does_not_stand_in_for_the_fallback() -> None:
    rules = router(
        {"name": "mr", "match": {"Modality": "MR"}},
        {"name": "ct_next", "match": {"Modality": "CT"}, "mode": "shadow"},
        {"name": "rest"},
        fallback="rest",
    )
    assert [r.name for r in rules.route(facts()).routes] == ["rest", "ct_next"]
    pending = rules.route(facts(slices=None), partial=True)
    assert [(r.name, r.pending) for r in pending.routes] == [("rest", False), ("ct_next", False)]
    only_shadow = router({"name": "ct_next", "match": {"Modality": "CT"}, "mode": "shadow"})
    assert [r.name for r in only_shadow.route(facts()).routes] == ["ct_next"]
    assert not only_shadow.route(facts(Modality="MR")).routes
