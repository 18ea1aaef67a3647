"""Frames -> ordered stacks with exact geometry, or a clear reason why they cannot be one.

Pure logic on frame records (no I/O), so every failure case is cheap to test and to explain.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dicomnode.errors import (
    DuplicatePositions,
    LocalizerMixedIn,
    MismatchedFrames,
    MissingSlices,
    MixedOrientations,
    MixedSeries,
    NoImagePosition,
    UnevenSpacing,
)
from dicomnode.imaging.frames import FrameInfo
from dicomnode.imaging.geometry import Geometry


@dataclass(frozen=True)
class StackRules:
    """How irregular a stack may be before it is refused."""

    #: A step may differ from the regular step by this fraction (0.10 = 10%).
    spacing_tolerance: float = 0.10
    #: A step this many times the regular step or more is a gap: slices are missing.
    gap_factor: float = 1.5
    #: Two orientations closer than this (degrees, per axis) are the same.
    orientation_tolerance_deg: float = 0.5
    #: Positions along the normal closer than this (mm) are the same position.
    duplicate_mm: float = 0.01
    #: How far (in pixels) a slice may sit off the line through the first and last.
    drift_pixels: float = 0.5


@dataclass(frozen=True)
class Stack:
    """Frames sorted along the slice normal and the grid they form."""

    frames: tuple[FrameInfo, ...]
    geometry: Geometry


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _iop(frame: FrameInfo) -> tuple[np.ndarray, np.ndarray]:
    o = np.asarray(frame.orientation, dtype=np.float64)
    return _unit(o[:3]), _unit(o[3:])


def _fmt_iop(frame: FrameInfo) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in np.round(frame.orientation or (), 3) + 0.0) + "]"


def _same_orientation(a: FrameInfo, b: FrameInfo, tolerance_deg: float) -> bool:
    (ra, ca), (rb, cb) = _iop(a), _iop(b)
    cos = np.cos(np.radians(tolerance_deg))
    return bool(np.dot(ra, rb) >= cos and np.dot(ca, cb) >= cos)


def orientation_groups(frames: Iterable[FrameInfo], rules: StackRules) -> list[list[FrameInfo]]:
    """Frames clustered by orientation, largest group first."""
    groups: list[list[FrameInfo]] = []
    for frame in frames:
        for group in groups:
            if _same_orientation(group[0], frame, rules.orientation_tolerance_deg):
                group.append(frame)
                break
        else:
            groups.append([frame])
    return sorted(groups, key=len, reverse=True)


def _check_one_series(frames: Sequence[FrameInfo]) -> None:
    series = sorted({f.series_uid for f in frames})
    if len(series) > 1:
        raise MixedSeries(f"the files belong to {len(series)} series; a volume needs one")
    references = sorted({f.frame_of_reference for f in frames})
    if len(references) > 1:
        raise MixedSeries(
            f"the frames use {len(references)} frames of reference (Frame of Reference UID); "
            "a volume needs one"
        )


def _check_positions(frames: Sequence[FrameInfo]) -> None:
    for frame in frames:
        missing = [
            name
            for name, value in (
                ("Image Position (Patient)", frame.position),
                ("Image Orientation (Patient)", frame.orientation),
                ("Pixel Spacing", frame.pixel_spacing),
            )
            if value is None
        ]
        if missing:
            raise NoImagePosition(
                f"{frame.name} has no valid {' or '.join(missing)}, so it cannot be placed in space"
            )
        assert frame.orientation is not None  # else it was missing, raised above
        r, c = np.asarray(frame.orientation[:3]), np.asarray(frame.orientation[3:])
        if (
            min(np.linalg.norm(r), np.linalg.norm(c)) < 1e-6
            or np.linalg.norm(np.cross(r, c)) < 1e-3
        ):
            raise NoImagePosition(
                f"{frame.name} has a degenerate Image Orientation (Patient) {_fmt_iop(frame)}: "
                "expected two perpendicular unit vectors"
            )


def _check_sizes(frames: Sequence[FrameInfo]) -> None:
    first = frames[0]
    for frame in frames[1:]:
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise MismatchedFrames(
                f"{frame.name} is {frame.rows}x{frame.columns} (rows x columns) "
                f"but {first.name} is {first.rows}x{first.columns}; a volume needs one size"
            )
        # _check_positions ran first: every frame has its pixel spacing
        assert frame.pixel_spacing is not None and first.pixel_spacing is not None
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise MismatchedFrames(
                f"{frame.name} has pixel spacing {list(frame.pixel_spacing or ())} mm "
                f"but {first.name} has {list(first.pixel_spacing or ())} mm; a volume needs one"
            )


def build_stack(frames: Sequence[FrameInfo], rules: StackRules) -> Stack:
    """Sort one orientation's frames along its normal, check the steps, and derive the grid."""
    _check_positions(frames)
    _check_sizes(frames)
    rows = np.array([_iop(f)[0] for f in frames]).mean(axis=0)
    cols = np.array([_iop(f)[1] for f in frames]).mean(axis=0)
    row_dir, col_dir = _unit(rows), _unit(cols)
    normal = _unit(np.cross(row_dir, col_dir))
    positions = np.array([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    ordered = tuple(frames[i] for i in order)
    row_spacing, column_spacing = ordered[0].pixel_spacing

    if len(ordered) == 1:
        step = normal * (ordered[0].thickness or 1.0)
    else:
        _check_steps(ordered, along, rules)
        _check_line(ordered, positions, along, normal, min(row_spacing, column_spacing), rules)
        step = (positions[-1] - positions[0]) / (len(ordered) - 1)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * column_spacing  # i (column index) runs along the row direction
    affine[:3, 1] = col_dir * row_spacing  # j (row index) runs along the column direction
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    first = ordered[0]
    return Stack(ordered, Geometry(affine, (len(ordered), first.rows, first.columns)))


def _check_steps(frames: Sequence[FrameInfo], along: np.ndarray, rules: StackRules) -> None:
    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < rules.duplicate_mm)
    if duplicates.size:
        at = duplicates[0]
        raise DuplicatePositions(
            f"duplicate positions: {frames[at].name} and {frames[at + 1].name} both lie at "
            f"{along[at]:.2f} mm along the slice normal ({duplicates.size} such pair(s); several "
            "phases, echoes or reconstructions in one series?)"
        )
    # The median step is the regular one: most steps of a series with missing slices are regular.
    regular = float(np.median(steps))
    gaps = np.flatnonzero(steps >= rules.gap_factor * regular)
    if gaps.size:
        at = gaps[0]
        missing = round(steps[at] / regular) - 1
        raise MissingSlices(
            f"missing slices: {gaps.size} gap(s) in {len(frames)} slices; the first is "
            f"{steps[at]:.2f} mm between {along[at]:.2f} and {along[at + 1]:.2f} mm along the "
            f"slice normal where the regular (median) step is {regular:.2f} mm "
            f"(about {max(missing, 1)} slice(s) missing)"
        )
    deviation = np.abs(steps - regular) / regular
    if deviation.max() > rules.spacing_tolerance:
        raise UnevenSpacing(
            f"uneven slice spacing: steps from {steps.min():.3f} to {steps.max():.3f} mm around "
            f"a median step of {regular:.3f} mm, beyond the {rules.spacing_tolerance:.0%} "
            "tolerance"
        )


def _check_line(
    frames: Sequence[FrameInfo],
    positions: np.ndarray,
    along: np.ndarray,
    normal: np.ndarray,
    pixel: float,
    rules: StackRules,
) -> None:
    """Slices must sit on one line (straight or tilted), not shift about in plane."""
    offsets = positions - np.outer(along, normal)
    slope = (offsets[-1] - offsets[0]) / (along[-1] - along[0])
    residual = np.linalg.norm(offsets - offsets[0] - np.outer(along - along[0], slope), axis=1)
    worst = int(np.argmax(residual))
    if residual[worst] > rules.drift_pixels * pixel:
        raise UnevenSpacing(
            f"slices do not lie on one line: {frames[worst].name} is {residual[worst]:.2f} mm "
            f"off the line through the first and last slice (tolerance "
            f"{rules.drift_pixels * pixel:.2f} mm)"
        )


def plan_one(frames: Sequence[FrameInfo], rules: StackRules) -> Stack:
    """All frames as one stack, or the reason they are not one."""
    _check_one_series(frames)
    localizers = [f for f in frames if f.localizer]
    if localizers and len(localizers) < len(frames):
        raise LocalizerMixedIn(
            f"{len(localizers)} localizer image(s) (Image Type LOCALIZER, e.g. "
            f"{localizers[0].name}) are mixed in with {len(frames) - len(localizers)} slices; "
            "load_series_split separates them"
        )
    _check_positions(frames)
    groups = orientation_groups(frames, rules)
    if len(groups) > 1:
        counts = ", ".join(f"{len(g)} at {_fmt_iop(g[0])}" for g in groups[:4])
        more = f" and {len(groups) - 4} more" if len(groups) > 4 else ""
        raise MixedOrientations(
            f"the frames have {len(groups)} orientations (Image Orientation (Patient)): "
            f"{counts}{more}; a volume needs one (localizers mixed in? "
            "load_series_split separates them)"
        )
    return build_stack(frames, rules)


def plan_split(frames: Sequence[FrameInfo], rules: StackRules) -> list[Stack]:
    """Separate what is safely separable (series, localizers, orientations, image sizes).

    Each localizer frame is its own one-slice stack (a projection, not a slice of a volume). Every
    other group must form a stack by itself; if one cannot, the whole split fails with its reason.
    """
    stacks: list[Stack] = []
    keyed: dict[tuple[str, str], list[FrameInfo]] = {}
    for frame in frames:
        keyed.setdefault((frame.series_uid, frame.frame_of_reference), []).append(frame)
    for members in keyed.values():
        _check_positions(members)
        for frame in (f for f in members if f.localizer):
            stacks.append(build_stack([frame], rules))
        slices = [f for f in members if not f.localizer]
        for group in orientation_groups(slices, rules):
            by_size: dict[tuple[object, ...], list[FrameInfo]] = {}
            for frame in group:
                spacing = tuple(round(v, 3) for v in frame.pixel_spacing or ())
                by_size.setdefault((frame.rows, frame.columns, spacing), []).append(frame)
            stacks.extend(build_stack(same, rules) for same in by_size.values())
    return sorted(stacks, key=lambda s: (s.frames[0].localizer, -len(s.frames)))
