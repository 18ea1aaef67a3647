"""Brain MRI phantoms: the anatomy and tumor in patient space, the four contrasts, and the study
written as four MR series of one Frame of Reference with the truth beside them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.imaging import Geometry, load_series
from dicomnode.phantoms.brain import (
    CSF,
    EDEMA,
    ENHANCING,
    NECROSIS,
    STUDY,
    WHITE,
    BrainPhantom,
    BrainTruth,
    SeriesPlan,
    brain_phantom,
    random_plans,
)
from dicomnode.phantoms.writer import MR_IMAGE_STORAGE

#: small, coarse series, so that writing a study takes a moment
SMALL = tuple(plan.scaled(2.5) for plan in STUDY)


def test_the_same_seed_gives_the_same_phantom_and_others_differ() -> None:
    a, b, c = brain_phantom(11), brain_phantom(11), brain_phantom(12)
    assert a.tumor == b.tumor and a.head == b.head
    assert a.tumor.centre != c.tumor.centre


def test_the_tumor_nests_core_in_rim_in_edema() -> None:
    phantom = brain_phantom(21)
    tumor = phantom.tumor
    centre = np.array(tumor.centre)
    assert phantom.tissue(centre[None])[0] == (NECROSIS if tumor.necrotic_mm else ENHANCING)
    volumes = phantom.volumes_mm3()
    assert volumes["enhancing_tumor"] > 0 and volumes["edema"] > volumes["enhancing_tumor"] / 4
    # 4/3 pi r^3 of the enhancing shell, give or take its lumps and stretch
    core = volumes["necrotic_core"] + volumes["enhancing_tumor"]
    assert core == pytest.approx(4 / 3 * np.pi * tumor.enhancing_mm**3, rel=0.6)


def _around_tumor(phantom: BrainPhantom, spacing: float, tilt: float = 0.0) -> Geometry:
    side = 2 * phantom.tumor_reach_mm() + 4
    plan = SeriesPlan("T1c", "", "axial", (spacing,) * 3, (side, side, side), tilt_deg=tilt)  # type: ignore[arg-type]
    return plan.geometry(phantom.tumor.centre)


def test_truth_holds_on_any_grid() -> None:
    phantom = brain_phantom(22)
    volumes = phantom.volumes_mm3()
    for geometry in (_around_tumor(phantom, 1.0), _around_tumor(phantom, 1.0, tilt=20)):
        labels = phantom.truth_on(geometry)
        for v, name in ((1, "necrotic_core"), (2, "edema"), (3, "enhancing_tumor")):
            assert (labels == v).sum() == pytest.approx(volumes[name], rel=0.05, abs=50)


def test_contrasts_show_what_a_radiologist_expects() -> None:
    phantom = brain_phantom(23, noise=0.0)
    geometry = STUDY[3].scaled(2.0).geometry(phantom.centre)
    tissue = phantom.tissue_on(geometry)
    rel = {}
    for contrast in ("T1", "T1c", "T2", "FLAIR"):  # relative to white matter: gain, bias cancel
        image = phantom.render(contrast, geometry)
        white = float(image[tissue == WHITE].mean())
        rel[contrast] = {t: float(image[tissue == t].mean()) / white
                         for t in (CSF, EDEMA, ENHANCING)}  # fmt: skip
    assert rel["FLAIR"][EDEMA] > 1.5 and rel["FLAIR"][CSF] < 0.5  # bright edema, dark CSF
    assert rel["T2"][CSF] > 2 and rel["T2"][EDEMA] > 1.5
    assert rel["T1c"][ENHANCING] > 1.4 > rel["T1"][ENHANCING] * 1.5  # the rim enhances


def test_a_study_is_written_as_four_mr_series_of_one_frame_of_reference(tmp_path: Path) -> None:
    phantom = brain_phantom(24)
    study = phantom.write(tmp_path / "study", SMALL)
    truth = BrainTruth.load(tmp_path / "study")
    assert truth == study.truth
    assert set(study.paths) == {"T1c", "T1", "T2", "FLAIR"}
    frames, orientations = set(), set()
    for contrast, paths in study.paths.items():
        ds = dcmread(paths[0])
        assert ds.SOPClassUID == MR_IMAGE_STORAGE and ds.Modality == "MR"
        assert ds.StudyInstanceUID == truth.study_instance_uid
        assert ds.SeriesInstanceUID == truth.series[contrast]
        assert ds.SeriesDescription == truth.descriptions[contrast]
        assert ("ContrastBolusAgent" in ds) == (contrast == "T1c")
        assert "brain" in ds.StudyDescription.lower()
        frames.add(ds.FrameOfReferenceUID)
        orientations.add(tuple(round(float(v), 2) for v in ds.ImageOrientationPatient))
        volume = load_series(paths)
        assert volume.geometry.isclose(study.geometries[contrast], atol_mm=1e-3)
        # the pixels are the rendered image, stored as integers
        assert volume.array.max() > 100
    assert frames == {truth.frame_of_reference_uid}
    assert len(orientations) >= 3  # sagittal, axial, tilted axial


def test_random_protocols_vary_orientation_resolution_and_field_of_view() -> None:
    rng = np.random.default_rng(5)
    plans = [plan for _ in range(6) for plan in random_plans(rng)]
    assert {p.orientation for p in plans} == {"axial", "sagittal", "coronal"}
    assert len({p.spacing for p in plans}) == len(plans)
    assert {p.contrast for p in plans} == {"T1c", "T1", "T2", "FLAIR"}
    assert all(p.spacing[2] <= 1.3 for p in plans if p.contrast == "T1c")
