"""Logging setup, for entry points only (the library itself logs to a NullHandler).

Log lines carry an ``action`` tag (``extra={"action": ...}``) and the ids that matter
(association, job), never patient names or IDs at INFO.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(action)s] %(message)s"


class _StderrNow(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, so a stream swapped or
    closed meanwhile (a daemon's redirect, a test's capture) never breaks a worker's logging."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class _ActionDefault(logging.Filter):
    """Give records without an ``action`` a dash so the format never fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "action"):
            record.action = "-"
        return True


def configure(level: str | int = "INFO") -> None:
    """Send dicomnode's logs to stderr; pynetdicom's own chatter only at DEBUG."""
    handler = _StderrNow()
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_ActionDefault())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    debug = logging.getLevelName(level) == "DEBUG" or level == logging.DEBUG
    # pynetdicom logs request identifiers and dataset summaries at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    # Libraries that log every run or statement at INFO: only at DEBUG.
    for chatty in ("alembic", "apscheduler"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)
