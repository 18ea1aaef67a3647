"""Deterministic UIDs for a job's result objects.

Every UID is derived from the job's *key*: the model's name and version, the route and the
sorted SOP Instance UIDs of its input. The same job run twice (a retry, a resend, a crash and
restart) therefore writes the same SEG, SR and SC UIDs, so a PACS that already holds them
replaces rather than duplicates them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from dicomnode.errors import ResultsError

#: DICOM UIDs are at most 64 characters of digits and dots
MAX_UID = 64
#: the namespace of the name-based UUIDs under 2.25
NAMESPACE = uuid.UUID("6f1c3a52-4c1e-5b7e-9d0a-2b6c1d1e7a11")


def job_key(model: str, version: str, route: str, source_uids: Iterable[str]) -> str:
    """A hex digest naming one job's input: model, version, route and its source instances."""
    digest = hashlib.sha256()
    for part in (model, version, route, *sorted(set(source_uids))):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def derive_uid(root: str, *parts: object) -> str:
    """The UID named by ``parts``: ``2.25.`` and a name-based (SHA-1) UUID as an integer
    (ISO/IEC 9834-8) without a root; else the root and digits of a hash (pydicom's)."""
    name = "\0".join(map(str, parts))
    if not root:
        return f"2.25.{uuid.uuid5(NAMESPACE, name).int}"
    from pydicom.uid import generate_uid

    uid = str(generate_uid(root, [name]))
    if len(uid) > MAX_UID:  # a checked root (at most 40 characters) leaves room
        raise ResultsError(f"derived UID {uid!r} is longer than {MAX_UID} characters")
    return uid


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of one job's results, derived from its :func:`job_key`."""

    key: str
    #: "": 2.25.<UUID as an integer>; else a checked root ending in "." (ResultsSettings)
    root: str = ""

    def uid(self, *parts: object) -> str:
        """The UID named by ``parts`` (e.g. ``("seg", "series")``) for this job."""
        return derive_uid(self.root, self.key, *parts)

    def series(self, kind: str) -> str:
        return self.uid(kind, "series")

    def instance(self, kind: str, number: int = 1) -> str:
        return self.uid(kind, "instance", number)

    def device_uid(self, model: str, version: str) -> str:
        """The model as a device: the same UID in every job it runs (not job-derived)."""
        return derive_uid(self.root, "dicomnode device", model, version)
