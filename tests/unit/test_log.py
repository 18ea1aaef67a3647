"""The log: library warnings without their text (it may quote patient data), and one record
is one line, whatever a peer put in it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import pytest

from dicomnode import log


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def _warn_about_a_name() -> None:
    from highdicom.valuerep import check_person_name

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # pytest records warnings per test: route this one through logging, as serve does
        logging.captureWarnings(False)
        logging.captureWarnings(True)
        check_person_name("DOE JOHN")


def test_highdicom_warning_is_logged_without_the_name(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("INFO")
    _warn_about_a_name()
    logging.getLogger("pydicom").warning("Invalid value for VR PN: %r", "DOE JOHN")
    logging.getLogger("dicomnode.intake").warning("series %s kept", "1.2.3")
    text = capsys.readouterr().err
    assert "DOE" not in text and "JOHN" not in text, text
    assert "UserWarning at" in text and "withheld" in text
    assert "series 1.2.3 kept" in text  # our own lines are untouched


def test_debug_shows_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("DEBUG")
    _warn_about_a_name()
    assert "DOE JOHN" in capsys.readouterr().err


@pytest.fixture
def configured() -> Iterator[None]:
    """The handler dicomnode.log.configure installs (it writes to whatever sys.stderr is)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    log.configure("INFO")
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


EVIL = "EVIL\n2024-01-01 00:00:00 INFO    forged [x] admin logged in\x1b[31m\r\x07\x7f\x9b\u2028"


@pytest.mark.usefixtures("configured")
def test_library_records_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    # pynetdicom quotes a peer's AE title as it came (utils.set_ae)
    logging.getLogger("pynetdicom.utils").error("Invalid 'Calling AE Title' value '%s'", EVIL)
    text = capsys.readouterr().err
    assert text.count("\n") == 1, text  # one line, its own end
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text and "\x9b" not in text
    assert "\u2028" not in text and "\x7f" not in text
    assert "EVIL\\n2024-01-01" in text and "\\x1b[31m\\r\\x07\\x7f\\x9b\\u2028" in text


@pytest.mark.usefixtures("configured")
def test_traceback_keeps_its_lines_but_no_escape_codes(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        raise ValueError("bad \x1b[2J value\nsecond")
    except ValueError:
        logging.getLogger("dicomnode.test").exception("failed for %s", "AE\nX")
    text = capsys.readouterr().err
    first, *rest = text.splitlines()
    assert first.endswith("failed for AE\\nX")
    assert rest[0] == "Traceback (most recent call last):"
    assert "\x1b" not in text and "\\x1b[2J" in text


def test_plain_text_is_unchanged() -> None:
    assert log.escape_controls("Association 3 from 10.0.0.1 as 'CT1': é ü") == (
        "Association 3 from 10.0.0.1 as 'CT1': é ü"
    )
    assert log.escape_controls("a\tb\0") == "a\\tb\\x00"
