"""Library warnings reach the log without their text (it may quote patient data)."""

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
