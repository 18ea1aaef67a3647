"""FHIR R4: the outcome as a DiagnosticReport with one Observation per finding, POSTed to the
server's base URL as one transaction Bundle, so the report and its findings are filed together
or not at all. Each resource is validated with fhir.resources before it goes (its R4B models,
whose DiagnosticReport, Observation and Bundle are R4's).

Each entry is a conditional create (``ifNoneExist`` on its identifier, system
``urn:dicomnode:delivery``: the delivery id, and ``<id>-<n>`` for the n-th finding), so a
retry after a lost answer files nothing twice on a server that honours it. The report points at
the study (``imagingStudy`` by its Study Instance UID) and the order (``basedOn`` by the
accession number); the patient is named by identifier only.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from dicomnode.config import NotificationSettings
from dicomnode.errors import NotificationRefused, NotifyError
from dicomnode.notify.http import post_json
from dicomnode.notify.message import describe_finding, finding_name, summary

IDENTIFIER_SYSTEM = "urn:dicomnode:delivery"
MODEL_SYSTEM = "urn:dicomnode:model"
CONTENT_TYPE = "application/fhir+json"
#: FHIR code systems of the coding schemes the models use
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}
UCUM = SYSTEMS["UCUM"]
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: the measurements' concepts, as the node's TID 1500 SR codes them (results/sr.py)
DIAMETER = ("81827009", "SCT", "Diameter")
VOLUME = ("118565006", "SCT", "Volume")
PROBABILITY = ("122157", "DCM", "Probability")
SEVERITY = ("246112005", "SCT", "Severity")
STATUS = {"P": "preliminary", "F": "final"}


def coding(value: str, scheme: str, meaning: str) -> dict[str, str]:
    """A FHIR Coding of a DICOM-style code (scheme designator -> its FHIR system URI; an
    unknown scheme becomes ``urn:dicomnode:scheme:<scheme>``)."""
    system = SYSTEMS.get(scheme, f"urn:dicomnode:scheme:{scheme}")
    return {"system": system, "code": value, "display": meaning}


def _code(code: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not code or not code.get("value"):
        return None
    return coding(str(code["value"]), str(code.get("scheme") or ""), str(code.get("meaning") or ""))


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": round(float(value), 4), "unit": unit, "system": UCUM, "code": unit}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _components(finding: Mapping[str, Any]) -> list[dict[str, Any]]:
    attributes = finding.get("attributes") or {}
    parts: list[dict[str, Any]] = []
    for concept, key, unit in ((DIAMETER, "diameter_mm", "mm"), (VOLUME, "volume_mm3", "mm3"),
                               (PROBABILITY, "probability", "1")):  # fmt: skip
        if (value := _number(finding.get(key))) is not None:
            parts.append({"code": {"coding": [coding(*concept)]},
                          "valueQuantity": _quantity(value, unit)})  # fmt: skip
    if (grade := _number(attributes.get("grade"))) is not None:
        parts.append({"code": {"coding": [coding(*SEVERITY)], "text": "grade"},
                      "valueInteger": int(grade)})  # fmt: skip
    return parts


def _interpretation(finding: Mapping[str, Any]) -> str:
    if (finding.get("attributes") or {}).get("indeterminate") is True:
        return "IND"
    if finding.get("critical"):
        return "AA"
    return "A" if finding.get("positive") else "N"


def _date(study: Mapping[str, Any]) -> str | None:
    digits = "".join(c for c in str(study.get("study_date") or "") if c.isdigit())
    return f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}" if len(digits) == 8 else None


def _full_url(delivery_id: str, part: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'dicomnode:{delivery_id}:{part}')}"


def _entry(resource: dict[str, Any], full_url: str, identifier: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={IDENTIFIER_SYSTEM}|{identifier}",
        },
    }


def build_bundle(
    settings: NotificationSettings, context: Mapping[str, Any], delivery_id: str
) -> dict[str, Any]:
    """The transaction Bundle of ``context``, validated (NotifyError naming what is wrong)."""
    job = context.get("job") or {}
    study = context.get("study") or {}
    result = context.get("result") or {}
    failed = context.get("event") == "failed"
    status = "cancelled" if failed else STATUS[settings.result_status]
    common: dict[str, Any] = {"issued": context.get("at")}
    if study.get("patient_id"):
        subject: dict[str, Any] = {"value": str(study["patient_id"])}
        if study.get("issuer_of_patient_id"):
            subject["assigner"] = {"display": str(study["issuer_of_patient_id"])}
        common["subject"] = {"identifier": subject}
    if (date := _date(study)) is not None:
        common["effectiveDateTime"] = date
    entries = []
    for number, finding in enumerate(() if failed else context.get("findings") or (), 1):
        key = f"{delivery_id}-{number}"
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": key}],
            "status": status,
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "imaging", "display": "Imaging"}]}],
            "code": {"text": finding_name(finding)},
            **common,
            "interpretation": [{"coding": [{"system": INTERPRETATION,
                                            "code": _interpretation(finding)}]}],
            "note": [{"text": describe_finding(finding)}],
        }  # fmt: skip
        if (finding_type := _code(finding.get("finding_type"))) is not None:
            observation["code"]["coding"] = [finding_type]
        if (site := _code(finding.get("finding_site"))) is not None:
            observation["bodySite"] = {"coding": [site]}
        if components := _components(finding):
            observation["component"] = components
        entries.append(_entry(observation, _full_url(delivery_id, str(number)), key))
    model = str(result.get("model") or job.get("model") or "")
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": delivery_id}],
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                  "code": "RAD", "display": "Radiology"}]}],
        "code": {"coding": [{"system": MODEL_SYSTEM, "code": model,
                             "display": f"{model} AI analysis"}],
                 "text": f"{model} AI analysis"},
        **common,
        "conclusion": summary(context),
    }  # fmt: skip
    if study.get("accession_number"):
        report["basedOn"] = [{"identifier": {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                 "code": "ACSN"}]},
            "value": str(study["accession_number"])}}]  # fmt: skip
    if job.get("study_instance_uid"):
        uid = f"urn:oid:{job['study_instance_uid']}"
        report["imagingStudy"] = [{"identifier": {"system": "urn:dicom:uid", "value": uid}}]
    if entries:
        report["result"] = [{"reference": entry["fullUrl"]} for entry in entries]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [_entry(report, _full_url(delivery_id, "report"), delivery_id), *entries],
    }
    validate(bundle)
    return bundle


def validate(bundle: Mapping[str, Any]) -> Any:
    """The Bundle as fhir.resources reads it (each entry as its own resource's model);
    NotifyError with the validation's reasons when it is not valid."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    try:
        return Bundle.model_validate(bundle)
    except ValidationError as exc:
        raise NotifyError(f"the FHIR Bundle is not valid R4: {exc}") from exc


def deliver(settings: NotificationSettings, context: Mapping[str, Any], delivery_id: str) -> str:
    """POST the Bundle to the server's base URL; what it filed (``HTTP 200:
    DiagnosticReport/12``). NotificationRefused when it answers an error, or a transaction
    response with an entry that failed."""
    assert settings.url is not None
    response = post_json(
        settings,
        settings.url.rstrip("/"),
        build_bundle(settings, context, delivery_id),
        delivery_id=delivery_id,
        event=str(context.get("event")),
        content_type=CONTENT_TYPE,
    )
    try:
        answer = response.json()
    except ValueError as exc:
        raise NotificationRefused(f"{settings.url} answered HTTP {response.status_code} without "
                                  "a JSON transaction response") from exc  # fmt: skip
    if not isinstance(answer, Mapping) or answer.get("resourceType") != "Bundle":
        raise NotificationRefused(
            f"{settings.url} answered HTTP {response.status_code} with no transaction-response "
            "Bundle"
        )
    statuses = [str((e.get("response") or {}).get("status", "")) for e in answer.get("entry") or ()]
    if not statuses or any(not s.startswith("2") for s in statuses):
        raise NotificationRefused(f"{settings.url} did not file every entry: {statuses}")
    first = (answer["entry"][0].get("response") or {}).get("location") or statuses[0]
    return f"HTTP {response.status_code}: {first}"
