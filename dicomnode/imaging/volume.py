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
    """Rescaled voxels (HU for CT) indexed ``[k, j, i]``, and where they lie in the patient."""

    array: np.ndarray
    geometry: Geometry
    frames: tuple[FrameRef, ...]
    modality: str
    series_instance_uid: str

    def __post_init__(self) -> None:
        if self.array.shape != self.geometry.shape:
            raise ValueError(
                f"array shape {self.array.shape} differs from the geometry's {self.geometry.shape}"
            )
        if len(self.frames) != self.array.shape[0]:
            raise ValueError(f"{len(self.frames)} frame refs for {self.array.shape[0]} slices")
        object.__setattr__(self, "frames", tuple(self.frames))

    def frame_at(self, xyz: ArrayLike) -> FrameRef:
        """The source frame whose slice holds a patient point (mm)."""
        k, _, _ = self.geometry.array_index(xyz)
        return self.frames[k]
