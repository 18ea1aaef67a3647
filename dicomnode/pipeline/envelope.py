"""The envelope check between a job's inputs and its model: each input series' header against
what the model was validated for (:mod:`dicomnode.envelope`), and what the route's policy makes
of a verdict: a refusal with its "not analysed" SR, or a flag on the result."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.envelope import (
    Envelope,
    EnvelopeVerdict,
    InputHeader,
    input_header,
    series_header,
)
from dicomnode.errors import EnvelopeRefused, ResultsError

if TYPE_CHECKING:
    from dicomnode.config import ResultsSettings
    from dicomnode.imaging import Volume
    from dicomnode.pipeline.inputs import SeriesFiles

#: the policy of a job whose route is not configured (a job of a removed route): the safe one
DEFAULT_POLICY = "refuse"


def _header(path: Path | str) -> Any:
    from pydicom import dcmread

    from dicomnode.imaging.frames import DEFER_SIZE

    return dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)


def volume_header(envelope: Envelope, volume: Volume) -> InputHeader:
    """A loaded input's header values: its first frame's header (pixels not read again) and
    the volume's slice count."""
    ds = _header(volume.frames[0].path)
    return input_header(ds, frames=int(volume.array.shape[0]), series=envelope.series)


def files_header(envelope: Envelope, paths: Sequence[Path | str]) -> InputHeader:
    """A stored series' header values without loading it: the first file's header, its frame
    count (Number of Frames of a single multi-frame file, else the number of files)."""
    ds = _header(paths[0])
    if len(paths) == 1:
        return series_header([ds], envelope.series)
    return input_header(ds, frames=len(paths), series=envelope.series)


def judge_volumes(envelope: Envelope, inputs: Volume | Mapping[str, Volume]) -> EnvelopeVerdict:
    """The verdict on a job's loaded inputs (one volume, or input name -> volume)."""
    if not isinstance(inputs, Mapping):
        return envelope.check(volume_header(envelope, inputs))
    return EnvelopeVerdict.combine(
        {name: envelope.check(volume_header(envelope, volume)) for name, volume in inputs.items()}
    )


def judge_files(envelope: Envelope, series: Mapping[str, Sequence[Path | str]]) -> EnvelopeVerdict:
    """The verdict on stored series (name or UID -> files), from their headers only."""
    return EnvelopeVerdict.combine(
        {name: envelope.check(files_header(envelope, paths)) for name, paths in series.items()}
    )


def envelope_json(
    envelope: Envelope | None, verdict: EnvelopeVerdict | None, policy: str
) -> dict[str, Any]:
    """What a job's result says of the envelope: always present, so the API always says."""
    if envelope is None or verdict is None:
        return {"inside": True, "declared": False, "policy": policy}
    return verdict.as_json(policy)


def refusal(
    *,
    model: str,
    version: str,
    demo: bool,
    verdict: EnvelopeVerdict,
    inputs: Volume | Mapping[str, Volume],
    series: Sequence[SeriesFiles],
    settings: ResultsSettings,
    output: Path,
    job_id: int,
    route: str,
    received_at: datetime,
    described: list[dict[str, Any]],
) -> EnvelopeRefused:
    """The error that ends a job whose input the route refuses: its reason names the model
    and every attribute outside; its result holds the verdict and the "not analysed" SR
    (written to ``results/<job id>/dicom/`` under ``output``), which goes to the route's
    destinations."""
    from dicomnode.results import build_not_analysed, write_objects

    reason = f"outside the acquisition envelope of model {model!r}: {verdict.text}"
    result: dict[str, Any] = {
        "model": model,
        "version": version,
        "demo": demo,
        "envelope": verdict.as_json("refuse"),
        "inputs": described,
        "findings": [],
    }
    if settings.enabled and settings.sr:
        received = [s.last_received_at for s in series if s.last_received_at is not None]
        try:
            built = build_not_analysed(
                model, version, demo, inputs,
                [path for item in series for path in item.paths], settings,
                route=route, when=max(received, default=received_at), reason=verdict.text,
            )  # fmt: skip
            objects = write_objects(built, output, job_id)
        except ResultsError:
            raise
        except Exception as exc:
            raise ResultsError(
                f"model {model!r}: the 'not analysed' SR could not be written: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        result["objects"] = [o.as_json() for o in objects]
    return EnvelopeRefused(reason, result)
