"""An inference model as the queue's ``JobModel``: a job's series in, findings out.

On ``run`` the adapter finds the job's input series in the index, loads each as a volume
(``dicomnode.imaging.load_series``), checks them against what the model accepts, calls
``predict`` (seeded, cancellable between sliding windows), writes the masks beside the spool
(``results/<job id>/<mask>.npz``) and returns the findings as JSON with the inputs' geometry and
the time each stage took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import InputsRejected, ModelError
from dicomnode.inference.findings import findings_to_json, write_masks
from dicomnode.inference.protocol import InferenceModel, ModelSpec

if TYPE_CHECKING:
    from dicomnode.config import ResultsSettings
    from dicomnode.domain import Findings
    from dicomnode.imaging import Volume
    from dicomnode.inference.device import Device
    from dicomnode.queue.worker import JobContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesFiles:
    """One input series as the index has it."""

    series_instance_uid: str
    modality: str
    paths: tuple[Path, ...]  # absolute
    sop_classes: frozenset[str]
    last_received_at: datetime | None


class InferenceJobModel:
    """Runs an inference model for the worker (``dicomnode.queue.worker.JobModel``)."""

    def __init__(
        self,
        spec: ModelSpec,
        create: Callable[[], InferenceModel],
        *,
        sessions: Callable[[], Any] | None = None,
        database_url: str | None = None,
        required_series: Mapping[str, Mapping[str, str]] | None = None,
        seed: int = 0,
        deterministic: bool = True,
        threads: int = 0,
        load_series: Callable[[Sequence[Path]], Volume] | None = None,
        strict: bool = True,
        results: ResultsSettings | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._create = create
        self._sessions = sessions
        self._database_url = database_url
        self._engine: Any = None
        #: route name -> study-level input name -> pattern (a route's required_series)
        self.required_series = dict(required_series or {})
        self.seed, self.deterministic, self.threads = seed, deterministic, threads
        self._load_series = load_series
        #: False: a model that fails to load is logged, and its jobs fail with the reason,
        #: while the worker runs its other models (a worker on "every model")
        self.strict = strict
        #: the SEG/SR/SC written from each job's findings ([results]; None: the defaults)
        self.results = results
        self.model: InferenceModel | None = None
        self.device: Device | None = None
        self.load_s: float | None = None
        self.load_error: str | None = None

    # -- JobModel --------------------------------------------------------------------------

    def load(self, device: str | Device) -> None:
        from dicomnode.inference.device import configure_torch, resolve_device, settle_heap

        started = time.perf_counter()
        self.load_error = None
        try:
            resolved = resolve_device(device)
            configure_torch(
                resolved, seed=self.seed, deterministic=self.deterministic, threads=self.threads
            )
            model = self._create()
            model.load(resolved)
        except Exception as exc:
            if self.strict:
                raise
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error(
                "model %s could not be loaded on %s; its jobs will fail: %s",
                self.name,
                device,
                self.load_error,
                extra={"action": "model_load_failed"},
            )
            return
        self.model, self.device = model, resolved
        settle_heap()  # the model stays for the worker's life: keep the collector off it
        self.load_s = time.perf_counter() - started
        self._warm_results()

    def run(self, context: JobContext) -> Mapping[str, Any]:
        if self.load_error is not None:
            raise ModelError(f"model {self.name!r} could not be loaded: {self.load_error}")
        if self.model is None:
            raise ModelError(f"model {self.name!r} used before load()")
        if context.storage_dir is None:
            raise ModelError(f"model {self.name!r} needs the storage directory of the spool")
        started = time.perf_counter()
        job = context.job
        series = self.series_files(job.inputs, context.storage_dir)
        inputs, described = self.load_inputs(job.route, series)
        loaded = time.perf_counter()
        findings = self.predict(inputs, cancelled=context.cancelled)
        predicted = time.perf_counter()
        masks = write_masks(findings, context.storage_dir, job.id)
        result = findings_to_json(findings, masks)
        result["inputs"] = described
        result["device"] = str(self.device)
        objects = self.write_results(findings, inputs, series, context)
        if objects is not None:
            result["objects"] = objects
        result["timing_s"] = {
            "load_inputs": round(loaded - started, 4),
            "predict": round(predicted - loaded, 4),
            "results": round(time.perf_counter() - predicted, 4),
            "total": round(time.perf_counter() - started, 4),
        }
        return result

    # -- the steps -------------------------------------------------------------------------

    def predict(self, inputs: Volume | Mapping[str, Volume], *, cancelled: Any = None) -> Findings:
        """``predict`` seeded with the configured seed, stoppable through ``cancelled``."""
        from dicomnode.domain import Findings
        from dicomnode.inference.device import seed_everything
        from dicomnode.inference.sliding import cancellable

        if self.model is None:
            raise ModelError(f"model {self.name!r} used before load()")
        seed_everything(self.seed)
        with cancellable(cancelled):
            findings = self.model.predict(inputs)
        if not isinstance(findings, Findings):
            raise ModelError(
                f"model {self.name!r}: predict returned a {type(findings).__name__}, not Findings"
            )
        return findings

    def series_files(self, series_uids: Sequence[str], storage_dir: Path) -> list[SeriesFiles]:
        """The stored files of each input series, from the index."""
        from sqlalchemy import select

        from dicomnode.db.models import Instance, Series

        if not series_uids:
            raise InputsRejected(f"model {self.name!r}: the job has no input series")
        with self._session() as session:
            rows = session.execute(
                select(
                    Series.series_instance_uid,
                    Series.modality,
                    Series.last_received_at,
                    Instance.path,
                    Instance.sop_class_uid,
                )
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.series_instance_uid.in_(list(series_uids)))
                .order_by(Series.id, Instance.instance_number, Instance.id)
            ).all()
        grouped: dict[str, list[Any]] = {}
        for row in rows:
            grouped.setdefault(row.series_instance_uid, []).append(row)
        missing = [uid for uid in series_uids if uid not in grouped]
        if missing:
            raise InputsRejected(
                f"model {self.name!r}: input series {', '.join(missing)} not in the index "
                "(deleted, or never stored)"
            )
        return [
            SeriesFiles(
                uid,
                grouped[uid][0].modality or "",
                tuple(storage_dir / row.path for row in grouped[uid]),
                frozenset(row.sop_class_uid for row in grouped[uid]),
                grouped[uid][0].last_received_at,
            )
            for uid in dict.fromkeys(series_uids)
        ]

    def load_inputs(
        self, route: str, series: Sequence[SeriesFiles]
    ) -> tuple[Volume | dict[str, Volume], list[dict[str, Any]]]:
        """The volumes ``predict`` gets (one, or input name -> volume) and their description."""
        accepts = self.spec.info.accepts
        for item in series:
            self._check_accepted(item)
        if accepts.level == "series":
            if len(series) != 1:
                raise InputsRejected(
                    f"model {self.name!r} takes one series; the job has {len(series)}"
                )
            volume = self._volume(series[0])
            return volume, [_describe(None, volume)]
        named = self._name_inputs(route, series)
        volumes = {name: self._volume(item) for name, item in named.items()}
        return volumes, [_describe(name, volume) for name, volume in volumes.items()]

    def _warm_results(self) -> None:
        """highdicom's tables now, not in the first job (about a second); never fails a load."""
        from dicomnode.config import ResultsSettings
        from dicomnode.results.warm import warm_up

        if not (self.results or ResultsSettings()).enabled:
            return
        try:
            warm_up()
        except Exception as exc:  # the first job then pays the time, or reports the failure
            logger.warning("results warm-up failed: %s", exc, extra={"action": "results"})

    def write_results(
        self,
        findings: Findings,
        inputs: Volume | Mapping[str, Volume],
        series: Sequence[SeriesFiles],
        context: JobContext,
    ) -> list[dict[str, str]] | None:
        """The job's SEG, SR and SC in ``results/<job id>/dicom/`` (None: results are off).
        Dated when the input's last instance arrived, so a rerun writes the same objects."""
        from dicomnode.config import ResultsSettings
        from dicomnode.errors import ResultsError
        from dicomnode.results import FindingClass, build_results

        settings = self.results or ResultsSettings()
        if not settings.enabled or context.storage_dir is None:
            return None
        job = context.job
        received = [
            at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite's are naive UTC
            for at in (s.last_received_at for s in series)
            if at is not None
        ]
        when = max(received, default=job.received_at)
        info = self.spec.info
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
                context.storage_dir,
                job.id,
                route=job.route,
                when=when,
                classes=classes,
                procedure=info.params.get("procedure_reported"),
            )
        except ResultsError:
            raise
        except Exception as exc:  # a highdicom or I/O failure fails the job with its reason
            raise ResultsError(
                f"model {self.name!r}: results could not be written: {type(exc).__name__}: {exc}"
            ) from exc
        return [o.as_json() for o in objects]

    # -- helpers ---------------------------------------------------------------------------

    def _check_accepted(self, item: SeriesFiles) -> None:
        accepts = self.spec.info.accepts
        if accepts.modalities and item.modality not in accepts.modalities:
            raise InputsRejected(
                f"model {self.name!r} accepts modality {', '.join(accepts.modalities)}; series "
                f"{item.series_instance_uid} is {item.modality or 'without a modality'}"
            )
        if accepts.sop_classes:
            other = sorted(item.sop_classes - set(accepts.sop_classes))
            if other:
                raise InputsRejected(
                    f"model {self.name!r} accepts SOP classes {', '.join(accepts.sop_classes)}; "
                    f"series {item.series_instance_uid} has {', '.join(other)}"
                )

    def _volume(self, item: SeriesFiles) -> Volume:
        load = self._load_series
        if load is None:
            from dicomnode.imaging import is_planar, load_planar, load_series

            # ophthalmic frames (OCT B-scans, colour photographs) may have no patient positions
            load = load_planar if is_planar(item.modality, item.sop_classes) else load_series
        volume = load(list(item.paths))
        minimum = self.spec.info.accepts.min_slices
        if volume.array.shape[0] < minimum:
            raise InputsRejected(
                f"model {self.name!r} needs at least {minimum} slices; series "
                f"{item.series_instance_uid} has {volume.array.shape[0]}"
            )
        return volume

    def _name_inputs(self, route: str, series: Sequence[SeriesFiles]) -> dict[str, SeriesFiles]:
        """Study level: which series is which input (T1, T2, ...), by the route's
        required_series patterns, else the model's ``accepts.inputs``, matched as the intake
        matched them; without patterns, each series by its UID."""
        from pydicom import dcmread

        from dicomnode.completion import StudySeries, recognise, recognition_text

        patterns = self.required_series.get(_route_name(route)) or self.spec.info.accepts.inputs
        if not patterns:
            return {item.series_instance_uid: item for item in series}
        candidates = []
        for item in series:
            ds = dcmread(item.paths[0], stop_before_pixels=True)
            text = recognition_text(
                str(ds.get("SeriesDescription", "")),
                str(ds.get("ProtocolName", "")),
                str(ds.get("SequenceName", "")),
                contrast=bool(str(ds.get("ContrastBolusAgent", "")).strip()),
            )
            received = item.last_received_at or datetime.min
            if received.tzinfo is None:
                received = received.replace(tzinfo=UTC)
            candidates.append(StudySeries(item.series_instance_uid, text, True, received))
        found = recognise(candidates, patterns)
        if not found:
            raise InputsRejected(
                f"model {self.name!r}: none of the job's series matches its inputs "
                f"{', '.join(patterns)}"
            )
        by_uid = {item.series_instance_uid: item for item in series}
        return {name: by_uid[uid] for name, uid in found.items()}

    def _session(self) -> Any:
        if self._sessions is not None:
            return self._sessions()
        if self._database_url is None:
            raise ModelError(
                f"model {self.name!r} has no database to find the job's series in "
                "(give the adapter a session factory or a database URL)"
            )
        if self._engine is None:
            from dicomnode.db import make_engine, make_session_factory

            self._engine = make_engine(self._database_url)
            self._sessions = make_session_factory(self._engine)
        return self._sessions()


def _route_name(route: str) -> str:
    return route.partition("?")[0]


def _describe(name: str | None, volume: Volume) -> dict[str, Any]:
    geometry = volume.geometry
    return {
        "name": name,
        "series_instance_uid": volume.series_instance_uid,
        "modality": volume.modality,
        "shape": [int(n) for n in volume.array.shape],
        "spacing_mm": [round(float(s), 6) for s in geometry.spacing],
        "affine": [[float(v) for v in row] for row in geometry.affine],
    }
