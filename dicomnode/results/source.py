"""The source images a job's results refer to: their headers, and which file and frame each
slice of the input volume came from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.errors import ResultsError
from dicomnode.imaging.frames import DEFER_SIZE

if TYPE_CHECKING:
    from dicomnode.imaging import FrameRef

#: Type 2 attributes of the Patient and General Study modules that every result object copies:
#: a source without them (they may be absent in what a modality sends) gets them empty, so the
#: objects built from it are still valid.
TYPE2_DEFAULTS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def read_headers(paths: Iterable[Path | str]) -> dict[str, Dataset]:
    """The header (no pixel data) of each file by SOP Instance UID, type 2 gaps filled."""
    headers: dict[str, Dataset] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, defer_size=DEFER_SIZE)
        except Exception as exc:
            raise ResultsError(f"source file {str(path)!r} cannot be read: {exc}") from exc
        for keyword in TYPE2_DEFAULTS:
            if keyword not in ds:
                setattr(ds, keyword, "")
        headers[str(ds.SOPInstanceUID)] = ds
    return headers


@dataclass(frozen=True)
class SourceImages:
    """The source series of one volume: its datasets (headers, in the volume's slice order of
    first appearance) and, for each slice ``k``, its dataset index and frame number."""

    datasets: tuple[Dataset, ...]
    #: per slice k: (index into ``datasets``, 1-based frame number or None for single-frame)
    slices: tuple[tuple[int, int | None], ...]
    series_instance_uid: str

    @property
    def multiframe(self) -> bool:
        return any(frame is not None for _, frame in self.slices)

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return (len(self.slices), int(self.first.Rows), int(self.first.Columns))

    def dataset_of(self, k: int) -> tuple[Dataset, int | None]:
        """The dataset and frame number slice ``k`` came from."""
        index, frame = self.slices[k]
        return self.datasets[index], frame

    @classmethod
    def for_volume(
        cls, frames: Sequence[FrameRef], headers: dict[str, Dataset], series_instance_uid: str
    ) -> SourceImages:
        """Match each slice's :class:`FrameRef` to its header (from :func:`read_headers`)."""
        order: dict[str, int] = {}
        datasets: list[Dataset] = []
        slices: list[tuple[int, int | None]] = []
        for k, ref in enumerate(frames):
            uid = ref.sop_instance_uid
            if uid not in order:
                if uid not in headers:
                    raise ResultsError(
                        f"slice {k} of series {series_instance_uid} comes from instance {uid}, "
                        "which is not among the job's source files"
                    )
                order[uid] = len(datasets)
                datasets.append(headers[uid])
            slices.append((order[uid], ref.frame_number))
        if not datasets:
            raise ResultsError(f"series {series_instance_uid} has no source images")
        return cls(tuple(datasets), tuple(slices), series_instance_uid)
