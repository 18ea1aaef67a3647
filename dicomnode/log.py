"""Logging setup, for entry points only (the library itself logs to a NullHandler).

Log lines carry an ``action`` tag (``extra={"action": ...}``) and the ids that matter
(association, job), never patient names or IDs at INFO.

Text from the network (AE titles, UIDs, a library's message quoting them) reaches log lines:
our calls quote it with ``%r``, and :class:`SafeFormatter` escapes every control character
left in any record's line, ours or a library's, so that no peer can forge a line or send
escape codes to an administrator's terminal.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(action)s] %(message)s"
#: C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with each control character backslash-escaped (``\\n``, ``\\x1b``), so it
    stays on one line and shows, rather than does, what it holds."""
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escaped, text)


class SafeFormatter(logging.Formatter):
    """One record, one line: control characters in the formatted line are escaped. A
    traceback keeps its lines (it is ours), but not any other control character."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape_controls(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        # the line is escaped whole above; what follows it is a traceback or a stack
        return escape_controls(super().format(record), keep_newlines=True)


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


#: loggers of the libraries that quote a dataset's values in what they say (pydicom's and
#: highdicom's checks of a name or a date, and the Python warnings they raise)
QUOTING_LOGGERS = ("py.warnings", "pydicom", "highdicom")
# pynetdicom's own lines stay (escaped, and only WARNING and above): they are about the protocol
# (AE titles, contexts, statuses), and its INFO, which summarises datasets, is off at INFO.
_WARNING_HEAD = re.compile(r"(?P<file>[^\n]*?):(?P<line>\d+): (?P<category>\w+): ")


class WithholdLibraryText(logging.Filter):
    """Keep a library's log lines and warnings, but not their text: it may quote a patient's
    name or birth date (highdicom's "The string 'DOE JOHN' is unlikely to represent...").

    The line says which library warned, where, and that the text is withheld; running at DEBUG
    (where patient data may appear anyway) shows the text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == name or record.name.startswith(name + ".")
                   for name in QUOTING_LOGGERS):  # fmt: skip
            return True
        where = f"{record.module}:{record.lineno}"
        source = record.name
        if record.name == "py.warnings":
            args = record.args if isinstance(record.args, tuple) else ()
            head = _WARNING_HEAD.match(str(args[0] if args else record.msg))
            if head is not None:
                module = head["file"].rsplit("site-packages/", 1)[-1]
                source, where = head["category"], f"{module}:{head['line']}"
        record.msg = "%s at %s (text withheld: it may quote patient data; level DEBUG shows it)"
        record.args = (source, where)
        record.exc_info = record.exc_text = None
        return True


def configure(level: str | int = "INFO") -> None:
    """Send dicomnode's logs to stderr; pynetdicom's own chatter only at DEBUG."""
    handler = _StderrNow()
    handler.setFormatter(SafeFormatter(_FORMAT))
    handler.addFilter(_ActionDefault())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    debug = numeric == logging.DEBUG
    # Warnings go to the log, not bare to stderr; their text only at DEBUG.
    logging.captureWarnings(True)
    if not debug:
        handler.addFilter(WithholdLibraryText())
    # pynetdicom logs request identifiers and dataset summaries at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    # Libraries that log every run, statement or object built at INFO: only at DEBUG.
    for chatty in ("alembic", "apscheduler", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)
