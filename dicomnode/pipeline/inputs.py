"""A job's inputs: its series found in the index, checked against what the model accepts, and
loaded as the volumes ``predict`` takes (one, or study-level inputs by name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.errors import InputsRejected

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from dicomnode.imaging import Volume
    from dicomnode.inference.protocol import Accepts, ModelSpec


@dataclass(frozen=True)
class SeriesFiles:
    """One input series as the index has it."""

    series_instance_uid: str
    modality: str
    paths: tuple[Path, ...]  # absolute
    sop_classes: frozenset[str]
    last_received_at: datetime | None
    body_part: str = ""  # Body Part Examined, as the index has it
    calling_aet: str = ""  # the AE that sent its first instance

    def source(self) -> dict[str, str]:
        """Where the series came from, as the job's result keeps it for the drift metrics
        (which outlive the spool): the scanner's make and model from its first header, the
        calling AE from the index."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        header: Any = {}
        if self.paths:
            try:
                header = dcmread(self.paths[0], stop_before_pixels=True,
                                 specific_tags=[0x00080070, 0x00081090])  # fmt: skip
            except (OSError, ValueError, InvalidDicomError):  # the load says why, not this
                header = {}
        return {
            "manufacturer": str(header.get("Manufacturer", "")).strip(),
            "manufacturer_model": str(header.get("ManufacturerModelName", "")).strip(),
            "calling_ae": self.calling_aet.strip(),
        }


def find_series(
    session: Session, series_uids: Sequence[str], storage_dir: Path, model: str
) -> list[SeriesFiles]:
    """The stored files of each input series, in the order of ``series_uids``; InputsRejected
    naming the series the index does not have."""
    from sqlalchemy import select

    from dicomnode.db.models import Instance, Series

    if not series_uids:
        raise InputsRejected(f"model {model!r}: the job has no input series")
    rows = session.execute(
        select(
            Series.series_instance_uid,
            Series.modality,
            Series.last_received_at,
            Series.body_part_examined,
            Instance.path,
            Instance.sop_class_uid,
            Instance.calling_aet,
            Instance.received_at,
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
            f"model {model!r}: input series {', '.join(missing)} not in the index "
            "(deleted, or never stored)"
        )
    return [
        SeriesFiles(
            uid,
            grouped[uid][0].modality or "",
            tuple(storage_dir / row.path for row in grouped[uid]),
            frozenset(row.sop_class_uid for row in grouped[uid]),
            grouped[uid][0].last_received_at,
            grouped[uid][0].body_part_examined or "",
            min(grouped[uid], key=lambda row: row.received_at).calling_aet or "",
        )
        for uid in dict.fromkeys(series_uids)
    ]


def load_inputs(
    spec: ModelSpec,
    series: Sequence[SeriesFiles],
    patterns: Mapping[str, str],
) -> tuple[Volume | dict[str, Volume], list[dict[str, Any]]]:
    """The volumes ``predict`` gets (one, or input name -> volume) and their description.

    A study-level model's series are named by ``patterns`` (input name -> pattern: the route's
    required_series, else the model's ``accepts.inputs``), as the intake matched them."""
    accepts = spec.info.accepts
    for item in series:
        check_accepted(spec, item)
    if accepts.level == "series":
        if len(series) != 1:
            raise InputsRejected(f"model {spec.name!r} takes one series; the job has {len(series)}")
        volume = _volume(spec, series[0])
        return volume, [describe(None, volume)]
    named = name_inputs(spec.name, series, patterns or accepts.inputs)
    volumes = {name: _volume(spec, item) for name, item in named.items()}
    return volumes, [describe(name, volume) for name, volume in volumes.items()]


def check_accepted(spec: ModelSpec, item: SeriesFiles) -> None:
    """InputsRejected when the series' modality, SOP classes or body part are not the
    model's."""
    check_series(spec.name, spec.info.accepts, item)


def check_series(model: str, accepts: Accepts, item: SeriesFiles) -> None:
    """InputsRejected when the series' modality, SOP classes or body part are not those
    ``accepts`` names (any model: a package, a bundle, a command)."""
    name = model
    if accepts.modalities and item.modality not in accepts.modalities:
        raise InputsRejected(
            f"model {name!r} accepts modality {', '.join(accepts.modalities)}; series "
            f"{item.series_instance_uid} is {item.modality or 'without a modality'}"
        )
    if accepts.sop_classes:
        other = sorted(item.sop_classes - set(accepts.sop_classes))
        if other:
            raise InputsRejected(
                f"model {name!r} accepts SOP classes {', '.join(accepts.sop_classes)}; "
                f"series {item.series_instance_uid} has {', '.join(other)}"
            )
    if accepts.body_parts and item.body_part.upper() not in accepts.body_parts:
        raise InputsRejected(
            f"model {name!r} accepts body part {', '.join(accepts.body_parts)}; series "
            f"{item.series_instance_uid} is {item.body_part or 'without a Body Part Examined'}"
        )


def name_inputs(
    model: str, series: Sequence[SeriesFiles], patterns: Mapping[str, str]
) -> dict[str, SeriesFiles]:
    """Study level: which series is which input (T1, T2, ...), matched by ``patterns`` as the
    intake matched them; without patterns, each series by its UID."""
    from pydicom import dcmread

    from dicomnode.completion import StudySeries, recognise, recognition_text
    from dicomnode.imaging.frames import DEFER_SIZE

    if not patterns:
        return {item.series_instance_uid: item for item in series}
    candidates = []
    for item in series:
        ds = dcmread(item.paths[0], stop_before_pixels=True, defer_size=DEFER_SIZE)
        text = recognition_text(
            str(ds.get("SeriesDescription", "")),
            str(ds.get("ProtocolName", "")),
            str(ds.get("SequenceName", "")),
            contrast=bool(str(ds.get("ContrastBolusAgent", "")).strip()),
        )
        received = item.last_received_at or datetime.min.replace(tzinfo=UTC)
        candidates.append(StudySeries(item.series_instance_uid, text, True, received))
    found = recognise(candidates, patterns)
    if not found:
        raise InputsRejected(
            f"model {model!r}: none of the job's series matches its inputs {', '.join(patterns)}"
        )
    by_uid = {item.series_instance_uid: item for item in series}
    return {name: by_uid[uid] for name, uid in found.items()}


def describe(name: str | None, volume: Volume) -> dict[str, Any]:
    """An input as the job's result records it: its series, shape and grid."""
    geometry = volume.geometry
    return {
        "name": name,
        "series_instance_uid": volume.series_instance_uid,
        "modality": volume.modality,
        "shape": [int(n) for n in volume.array.shape],
        "spacing_mm": [round(float(s), 6) for s in geometry.spacing],
        "affine": [[float(v) for v in row] for row in geometry.affine],
    }


def find_prior_series(
    session: Session,
    job_id: int,
    match: Mapping[str, Any],
    storage_dir: Path,
    model: str,
) -> list[tuple[str, str, SeriesFiles]]:
    """The priors retrieved for a job (its done ``prior`` requests), most recent first: each
    study's UID, its date and the series matching ``match``'s series attributes (Modality,
    BodyPartExamined, SeriesDescription, ProtocolName, SeriesNumber; any of a list), the one
    with the most instances. A study with no such series is left out."""
    from pydicom import dcmread
    from sqlalchemy import func, select

    from dicomnode.config import SERIES_QUERY_KEYS
    from dicomnode.db.models import Instance, Series, Study, StudyRequest
    from dicomnode.routing import value_matches

    wanted = {
        key: [value] if isinstance(value, str) else list(value)
        for key, value in match.items()
        if key in SERIES_QUERY_KEYS
    }
    studies = session.execute(
        select(Study.study_instance_uid, Study.study_date, Study.study_time)
        .join(StudyRequest, StudyRequest.study_instance_uid == Study.study_instance_uid)
        .where(StudyRequest.for_job == job_id, StudyRequest.purpose == "prior",
               StudyRequest.state == "done")
        .order_by(Study.study_date.desc(), Study.study_time.desc())
    ).all()  # fmt: skip
    found = []
    for study_uid, study_date, _ in dict.fromkeys(studies):
        candidates = session.execute(
            select(Series.series_instance_uid, func.count(Instance.id), func.min(Instance.path))
            .join(Instance, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .where(Study.study_instance_uid == study_uid)
            .group_by(Series.series_instance_uid)
        ).all()
        best: tuple[int, str] | None = None
        for series_uid, count, path in candidates:
            header = dcmread(storage_dir / path, stop_before_pixels=True)
            if all(
                any(value_matches(str(header.get(key, "")), option) for option in options)
                for key, options in wanted.items()
            ) and (best is None or count > best[0]):
                best = (int(count), str(series_uid))
        if best is not None:
            [series] = find_series(session, [best[1]], storage_dir, model)
            found.append((str(study_uid), str(study_date or ""), series))
    return found


def load_volume(spec: ModelSpec, item: SeriesFiles) -> Volume:
    """One series as the volume the model takes (InputsRejected: too few slices)."""
    return _volume(spec, item)


def _volume(spec: ModelSpec, item: SeriesFiles) -> Volume:
    from dicomnode.imaging import is_planar, load_planar, load_series

    # ophthalmic frames (OCT B-scans, colour photographs) may have no patient positions
    load = load_planar if is_planar(item.modality, item.sop_classes) else load_series
    volume = load(list(item.paths))
    minimum = spec.info.accepts.min_slices
    if volume.array.shape[0] < minimum:
        raise InputsRejected(
            f"model {spec.name!r} needs at least {minimum} slices; series "
            f"{item.series_instance_uid} has {volume.array.shape[0]}"
        )
    return volume
