"""Load a series from files into a Volume: sorted by position, rescaled, with exact geometry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.imaging.frames import decode, read_frames
from dicomnode.imaging.stack import Stack, StackRules, plan_one, plan_split
from dicomnode.imaging.volume import Volume

log = logging.getLogger(__name__)

DEFAULT_RULES = StackRules()


def _volume(datasets: Sequence[Dataset], stack: Stack) -> Volume:
    first = stack.frames[0]
    return Volume(
        array=decode(datasets, stack.frames),
        geometry=stack.geometry,
        frames=tuple(f.ref for f in stack.frames),
        modality=first.modality,
        series_instance_uid=first.series_uid,
    )


def load_series(paths: Sequence[Path | str], *, rules: StackRules = DEFAULT_RULES) -> Volume:
    """All files as one volume; raises a SeriesNotVolume subclass naming what is wrong."""
    datasets, frames = read_frames(paths)
    volume = _volume(datasets, plan_one(frames, rules))
    log.debug(
        "loaded %d files as a %s volume, spacing %s",
        len(datasets),
        volume.geometry.shape,
        tuple(round(s, 3) for s in volume.geometry.spacing),
        extra={"action": "imaging"},
    )
    return volume


def load_series_split(
    paths: Sequence[Path | str], *, rules: StackRules = DEFAULT_RULES
) -> list[Volume]:
    """The files as several volumes where separating them is safe.

    Separates series, localizers (each a one-slice volume, last), orientations and image sizes;
    stacks come largest first. Raises when any group still cannot form a volume (a gap, duplicate
    positions, uneven spacing), since dropping slices silently would hide a broken series.
    """
    datasets, frames = read_frames(paths)
    return [_volume(datasets, stack) for stack in plan_split(frames, rules)]
