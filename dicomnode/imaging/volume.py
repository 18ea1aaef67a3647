"""A series as one 3D array with its geometry and the source frame of every slice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from dicomnode.imaging.geometry import Geometry


@dataclass(frozen=True)
class FrameRef:
    """Which source frame a slice came from, so results can reference it (SEG, SR)."""

    sop_instance_uid: str
    sop_class_uid: str
    #: 1-based frame of a multi-frame object; None for a single-frame instance.
    frame_number: int | None
    path: str


@dataclass(frozen=True, eq=False)
class Volume:
    """Rescaled voxels (HU for CT) indexed ``[k, j, i]``, and where they lie in the patient.

    Colour frames (fundus photographs, ``dicomnode.imaging.planar``) add a trailing RGB axis:
    ``[k, j, i, 3]``; the geometry still describes ``[k, j, i]``.
    """

    array: np.ndarray
    geometry: Geometry
    frames: tuple[FrameRef, ...]
    modality: str
    series_instance_uid: str

    def __post_init__(self) -> None:
        colour = self.array.ndim == 4 and self.array.shape[3] == 3
        if self.array.shape[: 3 if colour else None] != self.geometry.shape:
            raise ValueError(
                f"array shape {self.array.shape} differs from the geometry's {self.geometry.shape}"
            )
        if len(self.frames) != self.array.shape[0]:
            raise ValueError(f"{len(self.frames)} frame refs for {self.array.shape[0]} slices")
        object.__setattr__(self, "frames", tuple(self.frames))

    @property
    def samples(self) -> int:
        """Samples per voxel: 1 (grey) or 3 (RGB)."""
        return 3 if self.array.ndim == 4 else 1

    def frame_at(self, xyz: ArrayLike) -> FrameRef:
        """The source frame whose slice holds a patient point (mm)."""
        k, _, _ = self.geometry.array_index(xyz)
        return self.frames[k]
