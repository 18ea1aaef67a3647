"""One model's pipeline, which the worker runs for each of its jobs: the inputs from the index,
loaded and checked; the model, seeded and cancellable; the masks, findings and DICOM objects.

It is the worker's ``JobModel`` (:mod:`dicomnode.queue.worker`): the worker claims a job, calls
:meth:`ModelPipeline.run`, and the job's finish hands the result's objects to the send queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dicomnode.errors import ModelError
from dicomnode.pipeline.envelope import DEFAULT_POLICY, envelope_json, judge_volumes, refusal
from dicomnode.pipeline.inputs import find_series, load_inputs

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dicomnode.config import ResultsSettings
    from dicomnode.inference.device import Device
    from dicomnode.inference.protocol import InferenceModel, ModelSpec
    from dicomnode.queue.worker import JobContext

logger = logging.getLogger(__name__)


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
    #: route name -> what an input outside the model's envelope does ("refuse" or "flag");
    #: a route not named refuses
    envelope_policies: Mapping[str, str] = field(default_factory=dict)


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
        # inputs -> envelope check -> model: an input the model was not validated for is
        # refused before it runs, or flagged in every object it writes
        envelope = self.spec.info.envelope
        policy = self.settings.envelope_policies.get(route, DEFAULT_POLICY)
        verdict = judge_volumes(envelope, inputs) if envelope is not None else None
        if verdict is not None and not verdict.inside and policy == "refuse":
            raise refusal(
                model=self.name,
                version=str(getattr(self.model, "version", self.spec.info.version)),
                demo=bool(getattr(self.model, "demo", self.spec.info.demo)),
                verdict=verdict, inputs=inputs, series=series, settings=self.results,
                output=output, job_id=job.id, route=job.route,
                received_at=job.received_at, described=described,
            )  # fmt: skip
        caveat = verdict.text if verdict is not None and not verdict.inside else ""
        loaded = time.perf_counter()
        findings = predict(self.model, inputs, seed=self.settings.seed, cancelled=context.cancelled)
        predicted = time.perf_counter()
        result = findings_to_json(findings, write_masks(findings, output, job.id))
        result["inputs"] = described
        result["device"] = str(self.device)
        result["envelope"] = envelope_json(envelope, verdict, policy)
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
            caveat=caveat,
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
