"""Drift metrics on /metrics: what each model finds, per model and per source (the scanner's
Manufacturer and Manufacturer's Model Name, the calling AE that sent the series), so a sudden
change shows in Prometheus (deploy/prometheus/alerts.yml has the rules).

Counted over the jobs whose run finished with a result (confirming, sending, done), as counters
Prometheus takes ``rate`` or ``increase`` of:

- ``dicomnode_model_jobs_finished_total``, ``dicomnode_model_jobs_positive_total`` (a job with at
  least one positive finding: positive rate = positive / finished, in PromQL);
- ``dicomnode_model_confidence_sum`` and ``..._count`` (each job's highest finding probability:
  mean confidence = sum / count);
- ``dicomnode_model_indeterminate_findings_total`` (findings whose attributes say
  ``"indeterminate": true``), ``dicomnode_model_out_of_envelope_total`` (jobs whose result says
  ``"envelope": {"inside": false}``);
- ``dicomnode_model_run_seconds`` (sum and count of the model runs, started to finished).

Each job's figures are read from its result once and kept in the collector (a finished job's
result does not change; a retried one is read again), so a scrape reads only the jobs that
finished since the previous one. A job's source is what its result recorded when it ran
(``"source"``: the scanner from the input's header, the calling AE from the index), so it
outlives the spool's retention; for older results it is read once from the series' first
instance. A job its route refused (``skipped``, outside the envelope) counts too: the
out-of-envelope rate must see the inputs a model never ran on. At most :data:`MAX_SOURCES`
sources, those with the most jobs, keep their own labels; the rest are counted under
``other``, so a site with many scanners cannot flood Prometheus.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, or_, select

from dicomnode.admin import RAN
from dicomnode.api.context import ApiContext
from dicomnode.db.models import Instance, Job, Series
from dicomnode.domain import JobState
from dicomnode.queue.outcomes import positive

#: distinct (manufacturer, model, calling AE) label sets beyond which sources become "other"
MAX_SOURCES = 20
OTHER = "other"
UNKNOWN = "unknown"
LABELS = ["model", "manufacturer", "manufacturer_model", "calling_ae"]


@dataclass(frozen=True)
class Source:
    """Where a series came from: its scanner and the AE that sent it."""

    manufacturer: str = UNKNOWN
    manufacturer_model: str = UNKNOWN
    calling_ae: str = UNKNOWN


@dataclass(frozen=True)
class JobFigures:
    """What one finished job adds to the drift counters."""

    positive: bool
    confidence: float | None  # the highest finding probability; None: no finding
    indeterminate: int
    out_of_envelope: bool


def job_figures(result: Mapping[str, Any]) -> JobFigures:
    """A job result's drift figures (its ``findings`` and, when present, ``envelope``)."""
    findings = [f for f in result.get("findings") or () if isinstance(f, Mapping)]
    probabilities = [
        float(f["probability"]) for f in findings if isinstance(f.get("probability"), int | float)
    ]
    envelope = result.get("envelope")
    return JobFigures(
        positive=any(positive(f) for f in findings),
        confidence=max(probabilities) if probabilities else None,
        indeterminate=sum(
            (f.get("attributes") or {}).get("indeterminate") is True for f in findings
        ),
        out_of_envelope=isinstance(envelope, Mapping) and envelope.get("inside") is False,
    )


def recorded_source(value: Any) -> Source | None:
    """The source a job's result recorded (the pipeline's ``"source"``), or None."""
    if not isinstance(value, Mapping):
        return None
    return Source(
        str(value.get("manufacturer") or "").strip() or UNKNOWN,
        str(value.get("manufacturer_model") or "").strip() or UNKNOWN,
        str(value.get("calling_ae") or "").strip() or UNKNOWN,
    )


@dataclass(frozen=True)
class _Seen:
    updated_at: datetime
    model: str
    series: str
    figures: JobFigures
    run_s: float | None
    source: Source | None = None  # as the job's result recorded it; None: look it up


class DriftCollector(Collector):
    """The drift counters, from the finished jobs and their series' sources."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self._jobs: dict[int, _Seen] = {}
        self._sources: dict[str, Source] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._refresh()
            seen = list(self._jobs.values())
            sources = dict(self._sources)
        yield from _families(seen, sources)

    def _refresh(self) -> None:
        with self.ctx.sessions() as session:
            current = {
                row.id: row
                for row in session.execute(
                    select(
                        Job.id,
                        Job.updated_at,
                        Job.model,
                        Job.series_instance_uid,
                        Job.inputs,
                        Job.started_at,
                        Job.finished_at,
                    ).where(
                        Job.model != "",
                        or_(
                            Job.state.in_(RAN),
                            # refused by its envelope: claimed and run up to the check
                            and_(Job.state == JobState.SKIPPED.value, Job.started_at.is_not(None)),
                        ),
                    )
                )
            }
            for gone in set(self._jobs) - set(current):  # purged, or retried
                del self._jobs[gone]
            new = [
                job_id
                for job_id, row in current.items()
                if job_id not in self._jobs or self._jobs[job_id].updated_at != row.updated_at
            ]
            for start in range(0, len(new), 500):
                chunk = new[start : start + 500]
                for job_id, result in session.execute(
                    select(Job.id, Job.result).where(Job.id.in_(chunk))
                ):
                    row = current[job_id]
                    series = row.series_instance_uid or next(iter(row.inputs or ()), "")
                    run_s = None
                    if row.started_at is not None and row.finished_at is not None:
                        run_s = max((row.finished_at - row.started_at).total_seconds(), 0.0)
                    self._jobs[job_id] = _Seen(
                        row.updated_at,
                        row.model,
                        series,
                        job_figures(result or {}),
                        run_s,
                        recorded_source((result or {}).get("source")),
                    )
            needed = {seen.series for seen in self._jobs.values() if seen.source is None}
            for purged in set(self._sources) - needed:  # its jobs were purged
                del self._sources[purged]
            for series in sorted(needed - set(self._sources)):
                self._sources[series] = self._source(session, series)

    def _source(self, session: Any, series_uid: str) -> Source:
        """A series' scanner (from its first instance's header) and calling AE (the index)."""
        first = session.execute(
            select(Instance.path, Instance.calling_aet)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.series_instance_uid == series_uid)
            .order_by(Instance.received_at, Instance.id)
            .limit(1)
        ).first()
        if first is None:
            return Source()
        manufacturer = manufacturer_model = UNKNOWN
        path = Path(self.ctx.settings.node.storage_dir) / first.path
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        try:
            header = dcmread(path, stop_before_pixels=True,
                             specific_tags=[0x00080070, 0x00081090])  # fmt: skip
            manufacturer = str(header.get("Manufacturer", "")).strip() or UNKNOWN
            manufacturer_model = str(header.get("ManufacturerModelName", "")).strip() or UNKNOWN
        except (OSError, ValueError, InvalidDicomError):  # gone (retention) or unreadable
            pass
        return Source(
            manufacturer, manufacturer_model, (first.calling_aet or "").strip() or UNKNOWN
        )


def _families(seen: list[_Seen], sources: Mapping[str, Source]) -> Iterator[Metric]:
    counts: dict[Source, int] = {}
    for job in seen:
        source = job.source or sources.get(job.series, Source())
        counts[source] = counts.get(source, 0) + 1
    kept = {s for s, _ in sorted(counts.items(), key=lambda i: (-i[1], str(i[0])))[:MAX_SOURCES]}
    other = Source(OTHER, OTHER, OTHER)
    totals: dict[tuple[str, str, str, str], list[float]] = {}
    # finished, positive, confidence sum, confidence count, indeterminate, out of envelope,
    # run seconds sum, run count
    for job in seen:
        source = job.source or sources.get(job.series, Source())
        source = source if source in kept else other
        key = (job.model, source.manufacturer, source.manufacturer_model, source.calling_ae)
        row = totals.setdefault(key, [0.0] * 8)
        row[0] += 1
        row[1] += job.figures.positive
        if job.figures.confidence is not None:
            row[2] += job.figures.confidence
            row[3] += 1
        row[4] += job.figures.indeterminate
        row[5] += job.figures.out_of_envelope
        if job.run_s is not None:
            row[6] += job.run_s
            row[7] += 1
    finished = CounterMetricFamily(
        "dicomnode_model_jobs_finished", "Jobs whose model run finished, by model and source",
        labels=LABELS,
    )  # fmt: skip
    positives = CounterMetricFamily(
        "dicomnode_model_jobs_positive",
        "Finished jobs with at least one positive finding (not indeterminate, not grade 0)",
        labels=LABELS,
    )
    confidence = SummaryMetricFamily(
        "dicomnode_model_confidence",
        "Each finished job's highest finding probability (mean = sum / count)",
        labels=LABELS,
    )
    indeterminate = CounterMetricFamily(
        "dicomnode_model_indeterminate_findings",
        "Findings marked indeterminate (attributes.indeterminate = true)",
        labels=LABELS,
    )
    outside = CounterMetricFamily(
        "dicomnode_model_out_of_envelope",
        "Finished jobs whose input was outside the model's acquisition envelope",
        labels=LABELS,
    )
    run = SummaryMetricFamily(
        "dicomnode_model_run_seconds", "Model run time (started to finished), sum and count",
        labels=LABELS,
    )  # fmt: skip
    for key, row in sorted(totals.items()):
        labels = list(key)
        finished.add_metric(labels, row[0])
        positives.add_metric(labels, row[1])
        confidence.add_metric(labels, count_value=int(row[3]), sum_value=row[2])
        indeterminate.add_metric(labels, row[4])
        outside.add_metric(labels, row[5])
        run.add_metric(labels, count_value=int(row[7]), sum_value=row[6])
    yield from (finished, positives, confidence, indeterminate, outside, run)
