"""Grids to draw and write phantoms on: axial, feet-first and oblique, centred where asked.

The anatomy is defined in patient coordinates, so the same phantom can be drawn on any of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from dicomnode.imaging.geometry import Geometry

Orientation = Literal["axial", "feet_first", "oblique"]


def triple(values: Iterable[float]) -> tuple[float, float, float]:
    """Three numbers (a point, an array's row, a draw of three) as a tuple of floats."""
    x, y, z = values
    return float(x), float(y), float(z)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """The 3x3 rotation by ``degrees`` about the patient axis ``x``, ``y`` or ``z``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def phantom_geometry(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: Orientation | ArrayLike = "axial",
    *,
    center: tuple[float, float, float] = (0.0, 20.0, -150.0),
) -> Geometry:
    """A grid centred on ``center`` (patient mm).

    ``axial``: head-first supine, slices going up (+z). ``feet_first``: feet-first supine as a
    scanner writes it (orientation -1 0 0 0 1 0, so columns run to the patient's right), slices
    going down (-z).
    ``oblique``: axial tilted 20 degrees about x and 10 about z. A 3x3 array gives the unit axes.
    """
    if isinstance(orientation, str):
        if orientation == "axial":
            direction = np.eye(3)
        elif orientation == "feet_first":
            direction = np.diag([-1.0, 1.0, -1.0])
        elif orientation == "oblique":
            direction = rotation("z", 10) @ rotation("x", 20)
        else:
            raise ValueError(f"orientation must be axial, feet_first or oblique: {orientation!r}")
    else:
        direction = np.asarray(orientation, dtype=float)
    half = (np.array(shape[::-1], dtype=float) - 1) / 2 * np.asarray(spacing, dtype=float)
    origin = np.asarray(center, dtype=float) - direction @ half
    return Geometry.from_parts(origin, direction, spacing, shape)
