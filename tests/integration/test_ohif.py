"""The node's result objects as radiologists see them: OHIF v3 in Chromium, reading Orthanc.

A chest CT phantom with two nodules, its SEG and its TID 1500 SR go into Orthanc (DICOMweb);
OHIF (the prebuilt @ohif/app of scripts/setup.sh) shows them in Debian's Chromium driven by
Playwright. Screenshots and the browser's console log are kept under the test's tmp_path (their
folder is printed when a test fails).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.results import build_objects, write_objects
from dicomnode.testing.browser import kept
from dicomnode.testing.ohif import OhifServer, Thumbnail, Viewer, ohif_stack, require_ohif
from dicomnode.testing.orthanc import Orthanc
from dicomnode.testing.waiting import wait_until
from tests.integration.test_results_objects import (
    NODULE_CLASS,
    SETTINGS,
    WHEN,
    Chest,
    nodule_findings,
    write_chest,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Study:
    chest: Chest
    uid: str
    #: InstanceNumber -> the phantom's slice index k
    slice_of_instance: dict[int, int]


@dataclass(frozen=True)
class Stack:
    pacs: Orthanc
    server: OhifServer
    viewer: Viewer
    study: Study
    out: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Orthanc holding the phantom CT, its SEG and SR; OHIF in front of it; one browser."""
    dist = require_ohif()
    root = tmp_path_factory.mktemp("ohif")
    chest = write_chest(root / "ct")
    built = build_objects(
        nodule_findings(chest.phantom), chest.volume, chest.paths, SETTINGS,
        route="chest-ct", when=WHEN, classes=[NODULE_CLASS],
    )  # fmt: skip
    objects = write_objects(built, root / "storage", 1)
    headers = [dcmread(path, stop_before_pixels=True) for path in chest.paths]
    study = Study(
        chest,
        str(headers[0].StudyInstanceUID),
        {int(ds.InstanceNumber): k for k, ds in enumerate(headers)},
    )
    with ohif_stack(root, dist) as (pacs, server, viewer):
        for path in [*chest.paths, *(root / "storage" / o.path for o in objects)]:
            pacs.upload(path)
        yield Stack(pacs, server, viewer, study, root / "out")
        viewer.console.write(root / "out" / "console.json")


@pytest.fixture
def keep(stack: Stack, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The test's screenshots and console log under tmp_path; their folder printed on failure."""
    failed_before = request.session.testsfailed
    with kept(
        stack.viewer, tmp_path, lambda: request.session.testsfailed > failed_before
    ) as folder:
        yield folder


def open_study(stack: Stack) -> dict[str, Thumbnail]:
    thumbnails = stack.viewer.open_study(stack.server.viewer_url(stack.study.uid))
    return {thumbnail.modality: thumbnail for thumbnail in thumbnails}


def shown_slice(viewer: Viewer) -> int:
    """The InstanceNumber of the image the viewport shows."""
    return viewer.shown_instance()


def test_ohif_shows_the_ct_and_the_seg_over_it(stack: Stack, keep: Path) -> None:
    viewer = stack.viewer
    series = open_study(stack)
    assert {"CT", "SEG", "SR", "KO", "OT"} <= set(series), series
    assert viewer.wait_rendered() > 0.2  # the CT, not a black viewport
    viewer.screenshot(keep / "ct.png")
    assert viewer.coloured_fraction() < 1e-4  # grey: nothing coloured before the SEG

    viewer.load_series(series["SEG"])
    # OHIF previews the SEG and asks whether to open it
    asked = viewer.answer_prompts(wait=15)
    assert any("Segmentation" in question for question in asked), asked
    coloured = viewer.wait_coloured(min_share=1e-3)
    viewer.screenshot(keep / "seg.png")
    labels = stack.study.chest.phantom.nodule_labels
    instance = shown_slice(viewer)
    k = stack.study.slice_of_instance[instance]
    assert labels[k].any(), f"OHIF shows the SEG on instance {instance} (slice {k}): no nodule"
    assert "nodule" in viewer.show_tab("panelSegmentation").lower()

    # six slices on, neither nodule is there: the overlay goes
    viewer.scroll(6)
    elsewhere = stack.study.slice_of_instance[shown_slice(viewer)]
    assert abs(elsewhere - k) == 6 and not labels[elsewhere].any()
    viewer.screenshot(keep / "seg-elsewhere.png")
    assert viewer.coloured_fraction() < coloured / 10
    assert viewer.console.entries, "the browser's console log is empty"


def key_slice_of(stack: Stack, label: int) -> int:
    """The phantom slice where nodule ``label`` covers the most pixels."""
    labels = stack.study.chest.phantom.nodule_labels
    return int(np.argmax((labels == label).sum(axis=(1, 2))))


def wait_slice(stack: Stack, k: int, what: str) -> None:
    """Wait until the viewport shows phantom slice ``k``."""
    wait_until(lambda: stack.study.slice_of_instance[shown_slice(stack.viewer)] == k,
               what=f"{what} (slice {k})")  # fmt: skip


def open_sr(stack: Stack, *, track: bool) -> list[str]:
    """Open the study, then its SR, tracking its measurements or not; the questions asked."""
    return stack.viewer.open_report(stack.server.viewer_url(stack.study.uid), track=track)


def test_ohif_draws_each_finding_with_its_numbers_on_its_key_slice(
    stack: Stack, keep: Path
) -> None:
    """The SR opens on the first finding's key slice (where the nodule is largest), its outline
    drawn with its name, area, diameter, volume and probability beside it; the arrows go to the
    next."""
    viewer = stack.viewer
    asked = open_sr(stack, track=False)
    assert any("tracking measurements" in question for question in asked), asked
    truths = stack.study.chest.phantom.truth.nodules
    for number, truth in enumerate(truths, start=1):
        wait_slice(stack, key_slice_of(stack, truth.label), f"nodule {number}'s key slice")
        text = " | ".join(viewer.wait_annotations())
        viewer.screenshot(keep / f"sr-{number}.png")
        assert f"Nodule {number}: {truth.diameter_mm:.1f} mm" in text, text
        assert "Area: " in text and " mm2" in text, text
        assert f"Diameter: {truth.diameter_mm:.2f} mm" in text, text
        assert f"Volume: {truth.volume_mm3:.2f} mm3" in text, text
        assert "Probability: " in text, text
        if number < len(truths):
            viewer.page.locator("[data-cy='viewport-action-arrows-right']").first.click()
    said = viewer.console.matching("SR", "measurement", "error", "unable")
    (keep / "sr-console.json").write_text(json.dumps(said, indent=1))
    assert not viewer.console.matching("pageerror"), viewer.console.matching("pageerror")
    assert not viewer.console.matching("Unable to generate tool state")
    assert not viewer.console.matching("not rehydratable")


def test_ohif_lists_each_finding_with_its_numbers_among_the_measurements(
    stack: Stack, keep: Path
) -> None:
    """Tracked, the SR's findings become OHIF measurements: the panel lists each under its
    name and numbers, and choosing one shows its key slice."""
    viewer = stack.viewer
    viewer.console.clear()
    open_sr(stack, track=True)
    truths = stack.study.chest.phantom.truth.nodules
    panel = wait_until(
        lambda: (
            (text := viewer.show_tab("trackedMeasurements")).count("Nodule ") >= len(truths)
            and text
        ),
        what="the findings in OHIF's measurements panel",
    )
    viewer.screenshot(keep / "measurements.png")
    assert f"Measurements ({len(truths)})" in panel, panel
    for number, truth in enumerate(truths, start=1):
        line = f"Nodule {number}: {truth.diameter_mm:.1f} mm, {truth.volume_mm3:.0f} mm3, p="
        assert line in panel, panel
    for number, truth in reversed(list(enumerate(truths, start=1))):
        viewer.page.get_by_text(f"Nodule {number}: ").first.click()
        wait_slice(stack, key_slice_of(stack, truth.label), f"nodule {number}'s key slice")
        viewer.screenshot(keep / f"measurement-{number}.png")
    (keep / "tracked-console.json").write_text(
        json.dumps(viewer.console.matching("SR", "measurement", "error", "unable"), indent=1)
    )
    assert not viewer.console.matching("pageerror"), viewer.console.matching("pageerror")
    # OHIF tries to rebuild every group as a tool; a finding's SEG segment group (TID 1411) has
    # no 2-D coordinates, so it says so once per finding, and nothing else
    unable = viewer.console.matching("Unable to generate tool state")
    assert len(unable) == len(truths), unable
    assert all("No spatial coordinates group found" in entry["text"] for entry in unable)
