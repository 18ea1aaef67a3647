"""A job's outputs: its masks beside the spool, its findings as JSON, and its SEG, SR, SC
(attention map and key images) and KOS written as DICOM for the send queue."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import ResultsError

if TYPE_CHECKING:
    from dicomnode.config import ResultsSettings
    from dicomnode.domain import Findings
    from dicomnode.imaging import Volume
    from dicomnode.inference.protocol import ModelSpec
    from dicomnode.pipeline.inputs import SeriesFiles

logger = logging.getLogger(__name__)


def warm_results(settings: ResultsSettings) -> None:
    """highdicom's tables now, not in the first job (about a second); never fails a load."""
    from dicomnode.results.warm import warm_up

    if not settings.enabled:
        return
    try:
        warm_up()
    except Exception as exc:  # the first job then pays the time, or reports the failure
        logger.warning("results warm-up failed: %s", exc, extra={"action": "results"})


def write_results(
    spec: ModelSpec,
    findings: Findings,
    inputs: Volume | Mapping[str, Volume],
    series: Sequence[SeriesFiles],
    settings: ResultsSettings,
    storage_dir: Path,
    *,
    job_id: int,
    route: str,
    received_at: datetime,
    caution: str = "",
    not_analysed: str | None = None,
) -> list[dict[str, str]] | None:
    """The job's SEG, SR, SC and KO in ``results/<job id>/dicom/`` under ``storage_dir`` (the run's
    staging root), as the result's ``objects`` (None: results are off). Dated when the inputs'
    last instance arrived (``received_at`` for a job whose series have no time), so a rerun
    writes the same objects. ``not_analysed``: the route refused the input, and why: the SR
    that says so, alone."""
    from dicomnode.results import FindingClass, build_results

    if not settings.enabled:
        return None
    received = [s.last_received_at for s in series if s.last_received_at is not None]
    info = spec.info
    classes = [
        FindingClass(
            label.name,
            label.finding_type.code,
            label.finding_site.code if label.finding_site is not None else None,
        )
        for label in sorted(info.labels, key=lambda label: label.value)
    ]
    try:
        objects, _ = build_results(
            findings,
            inputs,
            [path for item in series for path in item.paths],
            settings,
            storage_dir,
            job_id,
            route=route,
            when=max(received, default=received_at),
            classes=classes,
            procedure=info.params.get("procedure_reported"),
            caution=caution,
            not_analysed=not_analysed,
        )
    except ResultsError:
        raise
    except Exception as exc:  # a highdicom or I/O failure fails the job with its reason
        raise ResultsError(
            f"model {spec.name!r}: results could not be written: {type(exc).__name__}: {exc}"
        ) from exc
    return [o.as_json() for o in objects]
