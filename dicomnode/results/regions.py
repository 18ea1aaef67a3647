"""Where a finding shows best on one source image: its key slice, and its outline (or point, or
circle) there in that image's pixel coordinates.

A viewer draws a TID 1500 measurement from a 2-D region on a referenced image (OHIF needs one
in every group, or it cannot place the numbers), and a person reads a finding from the slice
where it is largest. The SR's image regions and the summary images both come from here, so the
outline a radiologist sees burned in is the one the viewer draws.

Coordinates are DICOM image coordinates ``(column, row)``: the top left corner of the top left
pixel is ``(0, 0)``, so the centre of pixel ``[row j, column i]`` is ``(i + 0.5, j + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicomnode.domain import Finding, Findings
from dicomnode.errors import ResultsError
from dicomnode.imaging.geometry import Geometry

#: angular bins of an outline: a point every 5 degrees at most
OUTLINE_BINS = 72
#: a classification's region on its key image: the pixels at least this share of the maximum
ATTENTION_SHARE = 0.5


@dataclass(frozen=True)
class KeyRegion:
    """A finding's region on slice ``slice_index`` of the input volume (a DICOM graphic)."""

    slice_index: int
    #: DICOM Graphic Type: POLYLINE (closed: first point repeated last), CIRCLE (centre, then a
    #: point on the circle) or POINT
    graphic_type: str
    points: tuple[tuple[float, float], ...]
    #: the longest chord of the region on this slice (two points), for a length to draw
    long_axis: tuple[tuple[float, float], tuple[float, float]] | None = None

    def graphic_data(self) -> np.ndarray:
        return np.array(self.points, dtype=np.float64)

    @property
    def tool(self) -> str:
        """The cornerstone3D tool (OHIF's) that draws this graphic: a freehand outline, a
        rectangle (a 5-point axis-aligned box), a circle or a probe."""
        if self.graphic_type == "CIRCLE":
            return "CircleROI"
        if self.graphic_type == "POINT":
            return "Probe"
        if len(self.points) == 5 and _is_box(self.points):
            return "RectangleROI"
        return "PlanarFreehandROI"

    def area_mm2(self, spacing_row_col: tuple[float, float]) -> float | None:
        """The area inside the outline (or circle) in mm2, given the pixel spacing (row,
        column); None for a point."""
        scale = spacing_row_col[0] * spacing_row_col[1]
        if self.graphic_type == "CIRCLE":
            (c0, r0), (c1, r1) = self.points[:2]
            return float(np.pi * ((c1 - c0) ** 2 + (r1 - r0) ** 2) * scale)
        if self.graphic_type == "POLYLINE" and len(self.points) >= 4:
            array = self.graphic_data()
            x, y = array[:, 0], array[:, 1]
            return float(abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2 * scale)
        return None

    def long_axis_mm(self, spacing_row_col: tuple[float, float]) -> float | None:
        """The long axis in millimetres, given the pixel spacing (row, column)."""
        if self.long_axis is None:
            return None
        (c0, r0), (c1, r1) = self.long_axis
        return float(np.hypot((c1 - c0) * spacing_row_col[1], (r1 - r0) * spacing_row_col[0]))


def key_slice(hit: np.ndarray) -> int | None:
    """The slice (first axis) where the boolean mask ``hit`` covers most pixels (the first of
    equals), or None when it is empty."""
    areas = hit.reshape(hit.shape[0], -1).sum(axis=1)
    if not areas.any():
        return None
    return int(np.argmax(areas))


def mask_region(labels: np.ndarray, value: int) -> KeyRegion | None:
    """The region of label ``value`` of ``labels`` ``[slice, row, column]`` on its key slice:
    the outline of its pixels there, or a circle of the same area when it is too small for
    one. None when no voxel has the label."""
    bounds = _bounds(labels == value)
    if bounds is None:
        return None
    (k0, k1), (j0, j1), (i0, i1) = bounds
    box = labels[k0:k1, j0:j1, i0:i1] == value
    k = key_slice(box)
    assert k is not None  # the box holds the label
    rows, columns = np.nonzero(box[k])
    return plane_region(rows + j0, columns + i0, k0 + k)


def plane_region(rows: np.ndarray, columns: np.ndarray, slice_index: int) -> KeyRegion:
    """The outline (or circle) of the pixels ``(rows, columns)`` of one slice."""
    centre_c, centre_r = float(columns.mean()) + 0.5, float(rows.mean()) + 0.5
    outline = _outline(rows, columns, centre_c, centre_r)
    axis = _long_axis(outline) if len(outline) >= 2 else None
    if len(outline) < 3:
        radius = max(float(np.sqrt(len(rows) / np.pi)), 0.5)
        return KeyRegion(
            slice_index, "CIRCLE", ((centre_c, centre_r), (centre_c + radius, centre_r)), axis
        )
    return KeyRegion(slice_index, "POLYLINE", (*outline, outline[0]), axis)


def point_region(
    geometry: Geometry, centre_mm: tuple[float, float, float], diameter_mm: float | None
) -> KeyRegion:
    """A finding known only by its centre (and diameter): a circle of that diameter around
    it, or the point, on the slice nearest to it."""
    i, j, k = (float(v) for v in np.atleast_2d(geometry.patient_to_voxel(centre_mm))[0])
    slices = geometry.shape[0]
    index = int(np.clip(round(k), 0, slices - 1))
    centre = (i + 0.5, j + 0.5)
    if not diameter_mm:
        return KeyRegion(index, "POINT", (centre,))
    radius = diameter_mm / 2 / geometry.spacing[0]
    return KeyRegion(
        index, "CIRCLE", (centre, (centre[0] + radius, centre[1])),
        ((centre[0] - radius, centre[1]), (centre[0] + radius, centre[1])),
    )  # fmt: skip


def attention_region(attention: np.ndarray | None, shape: tuple[int, int, int]) -> KeyRegion:
    """Where a classification looked: on the slice of highest mean attention, the box around
    the pixels of at least half the highest attention; without a map, the whole middle
    slice. A grade is about the whole input, and a viewer still needs an image to show it on."""
    if attention is None or not attention.size or float(attention.max()) <= 0:
        return whole_image(shape, shape[0] // 2)
    scores = attention.reshape(attention.shape[0], -1).astype(np.float64).mean(axis=1)
    k = int(np.argmax(scores))
    plane = attention[k].astype(np.float64)
    rows, columns = np.nonzero(plane >= ATTENTION_SHARE * plane.max())
    return _box(k, int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1)


def whole_image(shape: tuple[int, int, int], slice_index: int) -> KeyRegion:
    """All of slice ``slice_index`` (what "nothing found here" is said about)."""
    return _box(slice_index, 0, shape[1], 0, shape[2])


def _box(k: int, r0: int, r1: int, c0: int, c1: int) -> KeyRegion:
    corners = ((c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0))
    points = tuple((float(c), float(r)) for c, r in corners)
    return KeyRegion(k, "POLYLINE", points, (points[0], points[2]))


def _is_box(points: tuple[tuple[float, float], ...]) -> bool:
    """Whether five points are a closed box with sides along the rows and columns."""
    (a, b, c, d, e) = points
    return a == e and a[1] == b[1] and b[0] == c[0] and c[1] == d[1] and d[0] == a[0]


def _bounds(hit: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Per axis, the half-open range holding every True of ``hit``."""
    ranges = []
    for axis in range(hit.ndim):
        others = tuple(a for a in range(hit.ndim) if a != axis)
        present = np.flatnonzero(hit.any(axis=others))
        if not present.size:
            return None
        ranges.append((int(present[0]), int(present[-1]) + 1))
    return tuple(ranges)


def _outline(
    rows: np.ndarray, columns: np.ndarray, centre_c: float, centre_r: float
) -> list[tuple[float, float]]:
    """Around the centre, in each angular bin, the outer corner of the farthest pixel: the
    outline of a star-shaped region (a nodule, a tumour, the outside of a ring of oedema),
    clockwise on screen, without repeated points."""
    # the four corners of each pixel, so that even one pixel has an outline around it
    cs = np.concatenate([columns, columns + 1, columns + 1, columns]).astype(np.float64)
    rs = np.concatenate([rows, rows, rows + 1, rows + 1]).astype(np.float64)
    dc, dr = cs - centre_c, rs - centre_r
    angle = np.arctan2(dr, dc)
    distance = np.hypot(dc, dr)
    # about one bin per two pixels of perimeter: a bin narrower than a pixel at the rim would
    # pick a corner inside the region
    count = int(np.clip(np.pi * float(distance.max()), 8, OUTLINE_BINS))
    bins = ((angle + np.pi) / (2 * np.pi) * count).astype(np.int64) % count
    # farthest first within each bin, then the first of each bin
    order = np.lexsort((-distance, bins))
    first = np.ones(order.size, dtype=bool)
    first[1:] = bins[order][1:] != bins[order][:-1]
    chosen = order[first]
    points: list[tuple[float, float]] = []
    for index in chosen:
        point = (float(cs[index]), float(rs[index]))
        if not points or point != points[-1]:
            points.append(point)
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    return points


Point = tuple[float, float]


def _long_axis(points: list[Point]) -> tuple[Point, Point]:
    """The two points farthest apart (the first such pair)."""
    array = np.array(points)
    distances = np.hypot(*(array[:, None, :] - array[None, :, :]).transpose(2, 0, 1))
    a, b = np.unravel_index(int(np.argmax(distances)), distances.shape)
    return points[min(a, b)], points[max(a, b)]


def mask_of(findings: Findings, finding: Finding) -> np.ndarray:
    """The label map ``finding`` refers to."""
    assert finding.mask is not None
    name = finding.mask.name
    if name not in findings.masks:
        raise ResultsError(
            f"finding {finding.label!r} refers to mask {name!r}; the model returned "
            f"masks {sorted(findings.masks) or 'none'}"
        )
    return np.asarray(findings.masks[name])


def finding_regions(
    findings: Findings, geometry: Geometry, attention: np.ndarray | None = None
) -> tuple[KeyRegion, ...]:
    """Each finding's region, in the findings' order: on its mask's key slice; else around its
    centre; else (a classification) where the model looked, or the whole middle slice."""
    shape = geometry.shape
    regions = []
    for finding in findings.findings:
        region = None
        if finding.mask is not None:
            region = mask_region(mask_of(findings, finding), finding.mask.value)
        if region is None and finding.centre_mm is not None:
            region = point_region(geometry, finding.centre_mm, finding.diameter_mm)
        if region is None:
            region = attention_region(attention, shape)
        regions.append(region)
    return tuple(regions)
