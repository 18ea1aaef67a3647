"""Bounded request parameters: every id, page and date the API takes has a range, so a value
out of it is a 422 with a reason, never an overflow deep in SQL or datetime (a 500)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import Path, Query

from dicomnode import admin

#: ids are INTEGER columns: signed 32-bit in PostgreSQL (64 in SQLite); the smaller bound
#: for both, so that no id reaches SQL that PostgreSQL would refuse with an overflow
MAX_ID = 2**31 - 1
#: no listing has a billion rows to skip; beyond is a typo or a probe
MAX_OFFSET = 10**9
MAX_LIMIT = 1000
#: printable text, no control characters (PostgreSQL refuses NUL in a string)
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"

JobId = Annotated[int, Path(ge=0, le=MAX_ID, description="job id")]
OptionalJobId = Annotated[int | None, Query(ge=0, le=MAX_ID, description="job id")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
Since = Annotated[
    str | None,
    Query(
        alias="since", max_length=64, pattern=_PRINTABLE, description="2h, 3d, or ISO 8601 (UTC)"
    ),
]


def text(description: str | None = None, max_length: int = 256) -> Any:
    """A query parameter of printable text, at most ``max_length`` characters."""
    return Query(max_length=max_length, pattern=_PRINTABLE, description=description)


def since(value: str | None) -> datetime | None:
    """``since`` as a UTC time: InvalidQuery (400) for text that is neither a duration nor a
    date, ValueOutOfRange (422) for one no date can hold (``999999999w``, year 1 at +01:00)."""
    return admin.parse_since(value) if value else None
