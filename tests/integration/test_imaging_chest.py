"""Phantom chest CT -> DICOM files -> load_series -> resample to the lung model's spacing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import RLELossless

from dicomnode.imaging import Volume, load_series, resample
from dicomnode.phantoms.chest import HU, Truth, chest_ct

LUNG_SPACING = (0.703, 0.703, 1.25)


def assert_truth_in(volume: Volume, truth: Truth) -> None:
    """Every nodule's centre, found from its patient mm, shows the nodule's HU."""
    for nodule in truth.nodules:
        index = volume.geometry.array_index(nodule.center_mm)
        patch = volume.array[tuple(slice(max(n - 1, 0), n + 2) for n in index)]
        assert abs(float(np.median(patch)) - HU[nodule.kind]) < 40, nodule


@pytest.mark.parametrize(
    ("orientation", "options"),
    [
        ("feet_first", {"enhanced": True, "transfer_syntax": RLELossless}),
        ("oblique", {"slice_order": "shuffled", "transfer_syntax": RLELossless}),
    ],
)
def test_phantom_through_the_model_preprocessing(
    tmp_path: Path, orientation: str, options: dict[str, object]
) -> None:
    phantom = chest_ct((64, 160, 160), (1.0, 1.0, 2.0), orientation, nodules=5, seed=21)  # type: ignore[arg-type]
    paths = phantom.write(tmp_path, **options)
    truth = Truth.load(tmp_path)
    volume = load_series(paths)
    assert_truth_in(volume, truth)
    lung = resample(volume, LUNG_SPACING)
    assert lung.geometry.spacing == pytest.approx(LUNG_SPACING)
    assert_truth_in(lung, truth)
    # A finding on the resampled grid maps back to the source frame holding it.
    written = {str(p) for p in paths}
    for nodule in truth.nodules:
        frame = volume.frame_at(nodule.center_mm)
        assert frame.path in written
        assert (frame.frame_number is not None) == bool(options.get("enhanced"))


@pytest.mark.slow
def test_full_size_series_loads_quickly(tmp_path: Path) -> None:
    """512 x 512 x 300 slices, as a scanner sends them: timings printed for RESULTS."""
    start = time.perf_counter()
    phantom = chest_ct((300, 512, 512), (0.7, 0.7, 1.25), nodules=8, seed=5)
    generated = time.perf_counter() - start
    paths = phantom.write(tmp_path, slice_order="shuffled")
    start = time.perf_counter()
    volume = load_series(paths)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    lung = resample(volume, LUNG_SPACING)
    resampled = time.perf_counter() - start
    print(f"phantom {generated:.2f} s, load {loaded:.2f} s, resample {resampled:.2f} s")
    assert volume.array.shape == (300, 512, 512)
    assert_truth_in(volume, phantom.truth)
    assert_truth_in(lung, phantom.truth)
    assert loaded < 30, f"loading 300 slices took {loaded:.1f} s"
