"""One model's pipeline, which the worker runs for each of its jobs: the inputs from the index,
loaded and checked; the model, seeded and cancellable; the masks, findings and DICOM objects.

It is the worker's ``JobModel`` (:mod:`dicomnode.queue.worker`): the worker claims a job, calls
:meth:`ModelPipeline.run`, and the job's finish hands the result's objects to the send queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomnode.errors import ModelError
from dicomnode.pipeline.envelope import Acquisition, OutsideEnvelope, Verdict, check_envelope
from dicomnode.pipeline.inputs import SeriesFiles, find_series, load_inputs

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.orm import Session

    from dicomnode.config import ResultsSettings
    from dicomnode.imaging import Volume
    from dicomnode.inference.device import Device
    from dicomnode.inference.protocol import InferenceModel, ModelSpec, Prior
    from dicomnode.queue.worker import JobContext

logger = logging.getLogger(__name__)

#: the route of ``dicomnode models run``: an admin trying a model on files, whose input outside
#: the model's envelope is run and flagged rather than refused
TRIAL_ROUTE = "models-run"


@dataclass(frozen=True)
class PipelineSettings:
    """What every pipeline of a worker shares."""

    #: the node's session factory; without one, a database opened from ``database_url``
    sessions: Callable[[], Session] | None = None
    database_url: str | None = None
    #: route name -> study-level input name -> pattern (the routes' required_series)
    required_series: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    seed: int = 0
    #: False: a model that fails to load is logged, and its jobs fail with the reason, while
    #: the worker runs its other models (a worker on "every model")
    strict: bool = True
    #: the SEG/SR/SC written from each job's findings (None: the defaults)
    results: ResultsSettings | None = None
    #: route name -> what an input outside the model's envelope gets: "refuse" (the default)
    #: or "flag"
    envelope_policy: Mapping[str, str] = field(default_factory=dict)
    #: route name -> its ``priors.match``: which series of a retrieved prior study the model
    #: gets (routes without priors are absent)
    priors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def envelope_policy_of(self, route: str) -> str:
        """What ``route`` (its name, without the job's ``?`` suffix) does with an input outside
        its model's envelope: its setting, else refuse; ``models run`` flags (an admin trying
        a model on files wants to see what it makes of them)."""
        return self.envelope_policy.get(route, "flag" if route == TRIAL_ROUTE else "refuse")


class ModelPipeline:
    """Runs one model for the worker: a job's series in, its findings and objects out."""

    def __init__(
        self,
        spec: ModelSpec,
        load_model: Callable[[Device], InferenceModel],
        settings: PipelineSettings | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._load_model = load_model
        self.settings = settings or PipelineSettings()
        from dicomnode.config import ResultsSettings

        self.results = self.settings.results or ResultsSettings()
        self._sessions = self.settings.sessions
        self._engine: Any = None
        self.model: InferenceModel | None = None
        self.device: Device | None = None
        self.load_s: float | None = None
        self.load_error: str | None = None

    # -- JobModel --------------------------------------------------------------------------

    def load(self, device: str | Device) -> None:
        from dicomnode.inference.device import resolve_device
        from dicomnode.pipeline.outputs import warm_results

        started = time.perf_counter()
        self.load_error = None
        try:
            resolved = resolve_device(device)
            model = self._load_model(resolved)
        except Exception as exc:
            if self.settings.strict:
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
        self.load_s = time.perf_counter() - started
        warm_results(self.results)

    def run(self, context: JobContext) -> Mapping[str, Any]:
        from dicomnode.inference.findings import findings_to_json, write_masks
        from dicomnode.inference.run import predict
        from dicomnode.pipeline.outputs import write_results

        if self.load_error is not None:
            raise ModelError(f"model {self.name!r} could not be loaded: {self.load_error}")
        if self.model is None:
            raise ModelError(f"model {self.name!r} used before load()")
        if context.storage_dir is None:
            raise ModelError(f"model {self.name!r} needs the storage directory of the spool")
        started = time.perf_counter()
        job, storage_dir = context.job, context.storage_dir
        # the files go to the run's private folder, published only while it holds the lease;
        # their recorded paths, relative to it, are the final ones
        output = context.output_root or storage_dir
        with self._session() as session:
            series = find_series(session, job.inputs, storage_dir, self.name)
        route = job.route.partition("?")[0]
        patterns = self.settings.required_series.get(route, {})
        inputs, described = load_inputs(self.spec, series, patterns)
        policy = self.settings.envelope_policy_of(route)
        verdict = self._check_envelope(series, inputs)
        if not verdict.inside:
            if policy != "flag":
                raise self._refusal(verdict, policy, inputs, series, described, context)
            logger.warning(
                "job %s: input outside model %s's envelope, run and flagged: %s",
                job.id,
                self.name,
                "; ".join(verdict.reasons),
                extra={"action": "envelope_flagged", "job_id": job.id},
            )
        priors = []
        if route in self.settings.priors:
            priors = self._priors(job.id, job.study_instance_uid, route, storage_dir)
        loaded = time.perf_counter()
        findings = predict(
            self.model,
            inputs,
            seed=self.settings.seed,
            cancelled=context.cancelled,
            priors=priors,
        )
        predicted = time.perf_counter()
        result = findings_to_json(findings, write_masks(findings, output, job.id))
        result["inputs"] = described
        result["envelope"] = verdict.as_json(policy)
        result["source"] = series[0].source()
        result["device"] = str(self.device)
        if route in self.settings.priors:
            result["priors"] = [
                {"study_instance_uid": p.study_instance_uid,
                 "series_instance_uid": p.series_instance_uid, "study_date": p.study_date}
                for p in priors
            ]  # fmt: skip
        objects = write_results(
            self.spec,
            findings,
            inputs,
            series,
            self.results,
            output,
            job_id=job.id,
            route=job.route,
            received_at=job.received_at,
            caution="" if verdict.inside else verdict.sentence(self.name),
        )
        if objects is not None:
            result["objects"] = objects
        result["timing_s"] = {
            "load_inputs": round(loaded - started, 4),
            "predict": round(predicted - loaded, 4),
            "results": round(time.perf_counter() - predicted, 4),
            "total": round(time.perf_counter() - started, 4),
        }
        return result

    def _refusal(
        self,
        verdict: Verdict,
        policy: str,
        inputs: Volume | Mapping[str, Volume],
        series: Sequence[SeriesFiles],
        described: Any,
        context: JobContext,
    ) -> OutsideEnvelope:
        """The route refuses the input: the job is skipped, and its result says why and holds
        the SR that tells the PACS the study was not analysed (not retried: see the worker)."""
        from dicomnode.domain import Findings
        from dicomnode.pipeline.outputs import write_results

        assert context.storage_dir is not None  # checked by run()
        job = context.job
        sentence = verdict.sentence(self.name)
        result: dict[str, Any] = {
            "inputs": described,
            "envelope": verdict.as_json(policy),
            "source": series[0].source(),
        }
        objects = write_results(
            self.spec,
            Findings(
                self.name,
                str(getattr(self.model, "version", self.spec.info.version)),
                bool(getattr(self.model, "demo", self.spec.info.demo)),
            ),
            inputs,
            series,
            self.results,
            context.output_root or context.storage_dir,
            job_id=job.id,
            route=job.route,
            received_at=job.received_at,
            not_analysed=f"Not analysed: {sentence}.",
        )
        if objects is not None:
            result["objects"] = objects
        return OutsideEnvelope(sentence, result)

    def _priors(self, job_id: int, study_uid: str, route: str, storage_dir: Path) -> list[Prior]:
        """The job's prior studies that the node retrieved for it (:mod:`dicomnode.fetch.priors`),
        most recent first: of each, the series that matches the route's ``priors.match`` (the
        one with the most instances), loaded as the job's input is. One that does not load is
        left out, with a warning: a prior only adds to the job."""
        from sqlalchemy import select

        from dicomnode.db.models import Study
        from dicomnode.inference.protocol import Prior
        from dicomnode.pipeline.inputs import find_prior_series, load_volume

        with self._session() as session:
            found = find_prior_series(
                session, job_id, self.settings.priors.get(route, {}), storage_dir, self.name
            )
            today = session.scalar(
                select(Study.study_date).where(Study.study_instance_uid == study_uid)
            )
        priors = []
        for prior_uid, study_date, item in found:
            try:
                volume = load_volume(self.spec, item)
            except Exception as exc:
                logger.warning(
                    "job %s: a prior series could not be loaded, left out: %s",
                    job_id,
                    f"{type(exc).__name__}: {exc}",
                    extra={"action": "prior_unloadable", "job_id": job_id},
                )
                continue
            priors.append(
                Prior(volume, prior_uid, item.series_instance_uid, study_date,
                      _days_between(study_date, today or ""))
            )  # fmt: skip
        return priors

    def _check_envelope(
        self, series: Sequence[SeriesFiles], inputs: Volume | Mapping[str, Volume]
    ) -> Verdict:
        """The loaded input against the model's envelope (each series' first header)."""
        from pydicom import dcmread

        volumes = [inputs] if not isinstance(inputs, Mapping) else list(inputs.values())
        by_series = {volume.series_instance_uid: volume for volume in volumes}
        checked = [
            Acquisition.of_volume(
                dcmread(item.paths[0], stop_before_pixels=True),
                by_series[item.series_instance_uid],
            )
            for item in series
            if item.series_instance_uid in by_series and item.paths
        ]
        return check_envelope(self.spec.info.envelope, checked)

    def _session(self) -> Session:
        if self._sessions is None:  # the first time, from the database URL
            if self.settings.database_url is None:
                raise ModelError(
                    f"model {self.name!r} has no database to find the job's series in "
                    "(give the pipeline a session factory or a database URL)"
                )
            from dicomnode.db import make_engine, make_session_factory

            self._engine = make_engine(self.settings.database_url)
            self._sessions = make_session_factory(self._engine)
        return self._sessions()


def _days_between(earlier: str, later: str) -> int | None:
    """Days from one DICOM date (YYYYMMDD) to another; None when either is not a date."""
    from datetime import date

    try:
        first = date(int(earlier[:4]), int(earlier[4:6]), int(earlier[6:8]))
        second = date(int(later[:4]), int(later[4:6]), int(later[6:8]))
    except ValueError:
        return None
    return (second - first).days
