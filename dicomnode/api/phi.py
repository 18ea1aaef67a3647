"""What a token without the ``phi`` scope may not see: patient and study attributes.

Such a token (a monitor, an operator's dashboard) gets the same JSON with these attributes
blanked (``null``; lists empty) wherever they appear, and DICOM UIDs in free text (errors,
audit details) replaced by ``<uid>``: a job stays a job id, a model, a route, a state and its
stage times. The study, accession and patient filters need ``phi`` too (a filter answers
whether a patient has jobs here).
"""

from __future__ import annotations

import re
from typing import Any

#: keys whose values name a patient or a study (DICOM UIDs and the file paths built from them)
PHI_KEYS = frozenset(
    {
        "patient_id",
        "patient_name",
        "issuer_of_patient_id",
        "birth_date",
        "patient_birth_date",
        "sex",
        "patient_sex",
        "accession_number",
        "accession",
        "study_instance_uid",
        "series_instance_uid",
        "sop_instance_uid",
        "study_date",
        "study_time",
        "study_id",
        "study_description",
        "series_description",
        "referring_physician_name",
        "institution_name",
        "inputs",
        "dedupe_key",
        "path",
        "missing_instances",  # a request's SOP Instance UIDs still to retrieve
        "program_output",  # a command model's stdout and stderr: its words may name the patient
    }
)
#: free-text keys that may quote a UID
TEXT_KEYS = frozenset({"error", "last_error", "detail", "reason"})
#: a DICOM UID: four or more numeric components
_UID = re.compile(r"(?<![\d.])\d+(?:\.\d+){3,}(?![\d.])")
#: query parameters that select by patient or study
PHI_FILTERS = ("study", "accession", "patient_id")


def redact(value: Any) -> Any:
    """``value`` (JSON-ready: dicts, lists, scalars) without patient or study attributes."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key in PHI_KEYS:
                out[key] = [] if isinstance(item, list) else None
            elif key in TEXT_KEYS and isinstance(item, str):
                out[key] = _UID.sub("<uid>", item)
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value
