"""Notifications without a network: the config a site writes, the outcome its rules decide for
the three demo models' findings, and the messages (webhook body, HL7 ORU^R01, FHIR Bundle) as
the HL7 and FHIR libraries read them back."""

from __future__ import annotations

from typing import Any

import pytest

from dicomnode.config import TEMPLATE_VARIABLES, NotificationSettings, RouteSettings, Settings
from dicomnode.errors import ConfigError, NotificationRefused
from dicomnode.notify import fhir, hl7, webhook
from dicomnode.notify.message import summary, variables
from dicomnode.queue.outcomes import ReleasePolicy, decide, positive
from dicomnode.testing.mllp import ack, parse

NODULE = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
LUNG = {"value": "39607008", "scheme": "SCT", "meaning": "Lung structure"}
TUMOUR = {"value": "108369006", "scheme": "SCT", "meaning": "Neoplasm"}
DR = {"value": "4855003", "scheme": "SCT", "meaning": "Diabetic retinopathy"}


def nodule(diameter: float, probability: float = 0.9, **attributes: Any) -> dict[str, Any]:
    return {"label": "nodule", "finding_type": NODULE, "finding_site": LUNG,
            "probability": probability, "diameter_mm": diameter, "volume_mm3": 60.0,
            "centre_mm": [1.0, 2.0, 3.0], "attributes": attributes}  # fmt: skip


def tumour(volume: float) -> dict[str, Any]:
    return {"label": "enhancing_tumor", "finding_type": TUMOUR, "probability": 1.0,
            "volume_mm3": volume, "attributes": {}}  # fmt: skip


def dr_grade(grade: int | None, probability: float = 0.8, **extra: Any) -> dict[str, Any]:
    return {"label": "dr_grade", "finding_type": DR, "probability": probability,
            "attributes": {"grade": grade, "grade_meaning": "severe NPDR", **extra}}  # fmt: skip


#: what a site writes for the three demo models
SITE = """
[[routes]]
name = "chest-ct"
model = "lung_nodule"
send_if = "positive"
critical = { label = "Nodule", min_diameter_mm = 8, min_probability = 0.8 }

[[routes]]
name = "brain-mri"
model = "brain_tumor"
level = "study"
critical = [{ label = "enhancing_tumor", min_volume_mm3 = 1000 }]

[[routes]]
name = "retina"
model = "oct_grading"
send_if = ["dr_grade", "intraretinal_fluid"]
critical = { label = "dr_grade", min_grade = 3 }

[[notifications]]
name = "ris"
kind = "hl7"
host = "ris.hospital.local"
port = 2575
events = ["done", "failed"]

[[notifications]]
name = "on-call"
kind = "webhook"
url = "https://chat.hospital.local/hooks/ai"
events = ["critical"]
routes = ["chest-ct", "brain-mri"]
body = { text = "Critical: ${summary} (accession ${accession_number})", findings = "${findings}" }
"""


@pytest.fixture
def site(tmp_path: Any) -> Settings:
    from dicomnode.config import load_settings

    path = tmp_path / "node.toml"
    path.write_text(SITE)
    return load_settings(path)


# -- config --------------------------------------------------------------------------------------


def test_a_site_writes_rules_for_the_three_demo_models(site: Settings) -> None:
    chest, brain, retina = site.routes
    assert chest.send_if == "positive" and chest.critical[0].min_diameter_mm == 8
    assert brain.critical[0].min_volume_mm3 == 1000 and brain.send_if == "always"
    assert retina.send_if == ("dr_grade", "intraretinal_fluid")
    assert [n.kind for n in site.notifications] == ["hl7", "webhook"]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"routes": [{"name": "r", "model": "m", "critical": {}}]}, "at least one of"),
        ({"routes": [{"name": "r", "model": "m", "send_if": []}]}, "send_if"),
        ({"routes": [{"name": "r", "model": "m", "send_if": "sometimes"}]}, "send_if"),
        ({"notifications": [{"name": "n", "kind": "hl7", "url": "http://x", "events": ["done"]}]},
         "needs host and port"),
        ({"notifications": [{"name": "n", "kind": "webhook", "events": ["done"]}]}, "needs url"),
        ({"notifications": [{"name": "n", "kind": "fhir", "url": "ftp://x", "events": ["done"]}]},
         "is not http(s)"),
        ({"notifications": [{"name": "n", "kind": "webhook", "url": "http://x", "events": []}]},
         "events"),
        ({"notifications": [{"name": "n", "kind": "webhook", "url": "http://x",
                             "events": ["sent"]}]}, "events"),
        ({"notifications": [{"name": "n", "kind": "webhook", "url": "http://x",
                             "events": ["done"], "body": {"t": "${patient.__class__}"}}]},
         "malformed placeholder"),
        ({"notifications": [{"name": "n", "kind": "webhook", "url": "http://x",
                             "events": ["done"], "body": {"t": "${password}"}}]},
         "no template variables"),
        ({"notifications": [{"name": "n", "kind": "hl7", "host": "h", "port": 1,
                             "events": ["done"], "routes": ["nowhere"]}]}, "not configured"),
        ({"notifications": [{"name": "n", "kind": "hl7", "host": "h", "port": 1,
                             "events": ["done"]}] * 2}, "unique"),
    ],
)  # fmt: skip
def test_a_bad_notification_or_rule_is_refused_naming_it(
    tmp_path: Any, change: dict[str, Any], complaint: str
) -> None:
    from pydantic import ValidationError

    from dicomnode.config import _describe

    with pytest.raises(ValidationError) as caught:
        Settings(**change)
    assert complaint in _describe(caught.value, None)
    assert isinstance(ConfigError(_describe(caught.value, None)), ConfigError)


# -- outcomes --------------------------------------------------------------------------------------


def test_a_big_probable_nodule_is_critical_a_small_or_unsure_one_is_not(site: Settings) -> None:
    chest = site.routes[0]
    outcome = decide(chest, {"findings": [nodule(9.1, 0.93), nodule(5.0), nodule(12.0, 0.6),
                                          nodule(10.0, 0.95, indeterminate=True)]})  # fmt: skip
    assert [c.index for c in outcome.critical] == [0]
    assert outcome.critical[0].reasons == (
        "label Nodule",
        "probability 0.93 >= 0.8",
        "diameter 9.1 mm >= 8 mm",
    )
    assert outcome.positive and outcome.send and outcome.events == {"done", "finding", "critical"}


def test_brain_tumour_volume_and_oct_grade_rules(site: Settings) -> None:
    _, brain, retina = site.routes
    assert decide(brain, {"findings": [tumour(1500.0)]}).critical[0].reasons[-1] == (
        "volume 1500 mm3 >= 1000 mm3"
    )
    assert decide(brain, {"findings": [tumour(400.0)]}).critical == ()
    assert [c.label for c in decide(retina, {"findings": [dr_grade(3)]}).critical] == ["dr_grade"]
    assert decide(retina, {"findings": [dr_grade(2)]}).critical == ()
    # an indeterminate grade has none, and grade 0 is not positive
    assert decide(retina, {"findings": [dr_grade(None, indeterminate=True)]}).critical == ()
    assert not positive(dr_grade(0))


def test_send_if_holds_results_without_the_findings_it_asks_for(site: Settings) -> None:
    chest, _, retina = site.routes
    held = decide(chest, {"findings": []})
    assert not held.send and "no positive finding" in held.held_because
    assert held.events == {"done"}
    assert decide(chest, {"findings": [nodule(4.0)]}).send
    assert not decide(retina, {"findings": [dr_grade(0)]}).send  # grade 0 is not positive
    assert decide(retina, {"findings": [dr_grade(1)]}).send
    lesion = {"label": "haemorrhages", "finding_type": DR, "probability": 0.9}
    assert not decide(retina, {"findings": [lesion]}).send  # not a label it names
    assert decide(RouteSettings(name="r", model="m"), {"findings": []}).send  # "always"
    assert decide(None, None).send  # a route no longer configured sends as it did


def test_each_notification_gets_its_most_specific_event_for_its_routes(site: Settings) -> None:
    policy = ReleasePolicy.from_settings(site)
    assert [(n.name, n.event) for n in policy.notices("chest-ct", {"done", "finding",
                                                                   "critical"})] == [
        ("ris", "done"), ("on-call", "critical")]  # fmt: skip
    assert [n.name for n in policy.notices("retina", {"done", "finding", "critical"})] == ["ris"]
    assert [n.event for n in policy.notices("retina?trial", {"failed"})] == ["failed"]
    assert policy.notices("chest-ct", {"finding"}) == []


# -- messages --------------------------------------------------------------------------------------


def context(event: str = "critical", findings: list[dict[str, Any]] | None = None,
            **job: Any) -> dict[str, Any]:  # fmt: skip
    found = [nodule(9.1, 0.93), nodule(5.0, 0.81)] if findings is None else findings
    marked = [{**f, "positive": positive(f), "critical": i == 0 and event == "critical",
               "critical_reasons": ["diameter 9.1 mm >= 8 mm"] if i == 0 else []}
              for i, f in enumerate(found)]  # fmt: skip
    return {
        "event": event,
        "at": "2026-12-07T10:15:30.250000+00:00",
        "job": {"id": 7, "route": "chest-ct", "model": "lung_nodule", "state": "sending",
                "error": None, "study_instance_uid": "1.2.826.0.1.3680043.10.9.1", **job},
        "study": {"accession_number": "ACC|42^7", "patient_id": "PID-1",
                  "issuer_of_patient_id": "HOSP", "patient_name": "Doe^Jane^^Dr",
                  "patient_birth_date": "19600101", "patient_sex": "F",
                  "study_date": "20261207", "study_time": "101530.123",
                  "study_description": "CT chest", "modalities": ["CT"]},
        "result": {"model": "lung_nodule", "version": "0.1.0", "demo": True,
                   "envelope_inside": True, "objects": []},
        "findings": marked,
        "outcome": {"positive": bool(found), "send": True},
    }  # fmt: skip


def test_template_variables_are_the_ones_the_config_allows() -> None:
    assert set(variables(context(), "k")) == TEMPLATE_VARIABLES


def test_a_webhook_template_renders_values_and_whole_json_values() -> None:
    settings = NotificationSettings(
        name="hook", kind="webhook", url="http://x", events=["critical"],
        body={"text": "${critical_count} critical: ${summary} [$accession_number] $$5",
              "items": "${findings}", "n": "${findings_count}", "${event}": "${positive}"},
    )  # fmt: skip
    body = webhook.body(settings, context(), "key-1")
    assert body["text"].startswith("1 critical: lung_nodule 0.1.0 (demo weights")
    assert body["text"].endswith("[ACC|42^7] $5")
    assert body["items"][0]["diameter_mm"] == 9.1 and body["n"] == 2
    assert body["critical"] is True
    default = webhook.body(settings.model_copy(update={"body": None}), context(), "key-1")
    assert default["delivery_id"] == "key-1" and len(default["findings"]) == 2
    assert "patient_id" not in str(default) and "Doe" not in str(default)


def test_the_oru_parses_strictly_as_hl7_v25_and_holds_each_finding() -> None:
    settings = NotificationSettings(
        name="ris",
        kind="hl7",
        host="h",
        port=1,
        events=["done"],
        sending_facility="RAD",
        receiving_application="RIS",
    )
    text = hl7.build_oru(settings, context(), "0123456789abcdef0123")
    message = parse(text)  # strict v2.5 ORU_R01
    assert message.msh.msh_10.value == "0123456789abcdef0123"
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    result = message.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "PID-1^^^HOSP" and pid.pid_5.to_er7() == "Doe^Jane^^Dr"
    order = result.oru_r01_order_observation
    assert order.obr.obr_3.to_er7() == r"ACC\F\42\S\7"  # separators escaped
    assert order.obr.obr_7.to_er7() == "20261207101530"
    assert order.obr.obr_25.to_er7() == "P"
    obx = [group.obx for group in order.oru_r01_observation]
    assert [o.obx_3.to_er7() for o in obx] == [
        "110180^Study Instance UID^DCM", "lung_nodule^AI result^99DICOMNODE",
        "27925004^Nodule^SCT", "27925004^Nodule^SCT"]  # fmt: skip
    assert obx[0].obx_5.to_er7() == "1.2.826.0.1.3680043.10.9.1"
    assert obx[2].obx_5.to_er7() == (
        "Nodule: diameter 9.1 mm, volume 60 mm3, probability 0.93; CRITICAL (diameter 9.1 mm "
        ">= 8 mm)")  # fmt: skip
    assert [o.obx_8.to_er7() for o in obx[2:]] == ["AA", "A"]
    assert [o.obx_4.to_er7() for o in obx[2:]] == ["1", "2"]


def test_a_failed_job_is_an_oru_with_no_results_and_its_reason() -> None:
    settings = NotificationSettings(name="ris", kind="hl7", host="h", port=1, events=["failed"])
    failed = context("failed", findings=[], state="failed", error="input refused: 3 slices")
    message = parse(hl7.build_oru(settings, failed, "k" * 20))
    order = message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "X"
    texts = [group.obx.obx_5.to_er7() for group in order.oru_r01_observation]
    assert texts[1] == "lung_nodule failed: input refused: 3 slices"


def test_the_ack_decides_delivered_or_refused() -> None:
    text = hl7.build_oru(
        NotificationSettings(name="ris", kind="hl7", host="h", port=1, events=["done"]),
        context(),
        "c" * 20,
    )
    assert hl7.read_ack(ack(text, "AA")[:-1], "c" * 20) == "AA"
    with pytest.raises(NotificationRefused, match="NAK AE: no such order"):
        hl7.read_ack(ack(text, "AE", "no such order"), "c" * 20)
    with pytest.raises(NotificationRefused, match="NAK AR"):
        hl7.read_ack(ack(text, "AR"), "c" * 20)
    with pytest.raises(NotificationRefused, match="not"):
        hl7.read_ack(ack(text, "AA"), "d" * 20)
    with pytest.raises(NotificationRefused, match="not an HL7 ACK"):
        hl7.read_ack(b"HTTP/1.1 400 Bad Request\r\n", "c" * 20)


def test_the_fhir_bundle_is_a_valid_r4_report_with_an_observation_per_finding() -> None:
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    settings = NotificationSettings(name="fhir", kind="fhir", url="http://x", events=["done"])
    bundle = fhir.build_bundle(settings, context(), "key-7")
    parsed = fhir.validate(bundle)
    report = parsed.entry[0].resource
    assert isinstance(report, DiagnosticReport) and report.status == "preliminary"
    assert report.identifier[0].value == "key-7"
    assert report.imagingStudy[0].identifier.value == "urn:oid:1.2.826.0.1.3680043.10.9.1"
    assert report.basedOn[0].identifier.value == "ACC|42^7"
    assert report.conclusion == summary(context())
    observations = [e.resource for e in parsed.entry[1:]]
    assert all(isinstance(o, Observation) for o in observations) and len(observations) == 2
    assert [r.reference for r in report.result] == [e.fullUrl for e in parsed.entry[1:]]
    first = observations[0]
    assert first.code.coding[0].code == "27925004" and first.bodySite.coding[0].code == "39607008"
    assert first.interpretation[0].coding[0].code == "AA"
    measured = {c.code.coding[0].display: float(c.valueQuantity.value) for c in first.component}
    assert measured == {"Diameter": 9.1, "Volume": 60.0, "Probability": 0.93}
    assert [e.request.ifNoneExist for e in parsed.entry] == [
        "identifier=urn:dicomnode:delivery|key-7", "identifier=urn:dicomnode:delivery|key-7-1",
        "identifier=urn:dicomnode:delivery|key-7-2"]  # fmt: skip
    graded = fhir.build_bundle(settings, context(findings=[dr_grade(3)]), "g")
    component = graded["entry"][1]["resource"]["component"]
    assert component[-1]["valueInteger"] == 3
    failed = fhir.build_bundle(settings, context("failed", findings=[], error="boom"), "f")
    assert failed["entry"][0]["resource"]["status"] == "cancelled" and len(failed["entry"]) == 1
