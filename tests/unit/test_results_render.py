"""The key image renderer (numpy and Pillow, no DICOM) and the words of the key images."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.domain import Code, Finding, Findings, MaskRef
from dicomnode.imaging.geometry import Geometry
from dicomnode.results.common import Producer
from dicomnode.results.regions import KeyRegion, point_region
from dicomnode.results.render import (
    WARNING,
    Line,
    Outline,
    colour_of,
    key_image,
    scale_factor,
)
from dicomnode.results.summary import DEMO_WARNING, key_slices, summary_text
from dicomnode.results.wording import finding_names, finding_text

NODULE = Code("27925004", "SCT", "Nodule")
DR = Code("4855003", "SCT", "Diabetic retinopathy")


def test_scale_factor_brings_the_long_side_to_512() -> None:
    assert scale_factor(64, 64) == 8
    assert scale_factor(100, 60) == 6  # 600
    assert scale_factor(512, 512) == 1 and scale_factor(2000, 1000) == 1


def test_key_image_scales_outlines_and_writes_the_panel() -> None:
    grey = np.full((32, 48), 90, dtype=np.uint8)
    grey[10:20, 10:20] = 200
    box = ((10.0, 10.0), (20.0, 10.0), (20.0, 20.0), (10.0, 20.0), (10.0, 10.0))
    square = KeyRegion(3, "POLYLINE", box, (box[0], box[2]))
    spot = KeyRegion(3, "POINT", ((40.5, 5.5),))
    lines = [
        Line("m 1"),
        Line("Nodule 1: 5.0 mm, p=0.90", colour_of(0)),
        Line(DEMO_WARNING, WARNING),
    ]
    out = key_image(grey, [Outline(square, colour_of(0), "Nodule 1"),
                           Outline(spot, colour_of(1), "Nodule 2")], lines)  # fmt: skip
    factor = scale_factor(32, 48)
    assert factor == 11 and out.dtype == np.uint8 and out.shape[1] == 48 * factor
    height = 32 * factor
    assert out.shape[0] > height + 3 * 10  # a band of three lines
    image = out[:height]
    # nearest neighbour: the source pixels, grey, away from the drawing
    assert image[5 * factor + 3, 2 * factor + 3].tolist() == [90, 90, 90]
    assert image[15 * factor, 15 * factor + 20].tolist() in ([200, 200, 200], list(colour_of(0)))
    green = np.all(image == colour_of(0), axis=-1)
    for c, r in box:  # the outline's corners, scaled
        x, y = int(c * factor), int(r * factor)
        assert green[y - 2 : y + 3, x - 2 : x + 3].any()
    assert not green[:, 30 * factor :].any()  # nothing of it far right
    cyan = np.all(image == colour_of(1), axis=-1)
    x, y = int(40.5 * factor), int(5.5 * factor)
    assert cyan[y, x - 6 : x + 7].any() and cyan[y - 6 : y + 7, x].any()  # the cross
    band = out[height:]
    assert np.all(band == WARNING, axis=-1).any() and np.all(band == colour_of(0), axis=-1).any()
    # the same input, the same pixels
    again = key_image(grey, [Outline(square, colour_of(0), "Nodule 1"),
                             Outline(spot, colour_of(1), "Nodule 2")], lines)  # fmt: skip
    assert np.array_equal(out, again)


def test_key_image_of_rgb_and_long_lines_wrapped() -> None:
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 120
    one = key_image(rgb, [], [Line("short")])
    many = key_image(rgb, [], [Line(" ".join(["word"] * 200))])
    assert one.shape[1] == many.shape[1] == 30 * scale_factor(20, 30)
    assert many.shape[0] > one.shape[0]  # wrapped onto more lines
    assert one[0, 0].tolist() == [120, 0, 0]
    with pytest.raises(ValueError, match="grey or RGB"):
        key_image(np.zeros((4, 4, 2), np.uint8), [], [])


def test_finding_words() -> None:
    nodules = [
        Finding("nodule", NODULE, 0.91, diameter_mm=12.34, volume_mm3=905.2,
                mask=MaskRef("nodules", 1)),
        Finding("nodule", NODULE, 0.5, diameter_mm=6.0, mask=MaskRef("nodules", 2)),
    ]  # fmt: skip
    tumour = Finding("enhancing_tumor", NODULE, 0.88, volume_mm3=14_200.0, mask=MaskRef("t", 3))
    grade = Finding("dr_grade", DR, 0.85, attributes={"grade": 3, "scale": "ICDR"})
    present = Finding("hard_exudates", DR, 0.81)
    names = finding_names([*nodules, tumour, grade, present])
    assert names == ["Nodule 1", "Nodule 2", "Enhancing tumor", "Diabetic retinopathy",
                     "Hard exudates"]  # fmt: skip
    every = [*nodules, tumour, grade, present]
    texts = [finding_text(f, n) for f, n in zip(every, names, strict=True)]
    assert texts == [
        "Nodule 1: 12.3 mm, 905 mm3, p=0.91",
        "Nodule 2: 6.0 mm, p=0.50",
        "Enhancing tumor: 14.2 mL, p=0.88",
        "Diabetic retinopathy grade 3 (Severe NPDR), p=0.85",
        "Hard exudates: present, p=0.81",
    ]
    assert DEMO_WARNING == "DEMO WEIGHTS: NOT FOR CLINICAL USE"
    findings = Findings("m", "1", True, tuple(nodules))
    assert summary_text(findings, Producer("m", "1", True)).endswith(DEMO_WARNING)
    assert "DEMO" not in summary_text(findings, Producer("m", "1", False))


def test_key_slices_most_probable_first_then_in_slice_order() -> None:
    def at(k: int) -> KeyRegion:
        return KeyRegion(k, "POINT", ((1.0, 1.0),))

    findings = Findings("m", "1", False, tuple(
        Finding("nodule", NODULE, p) for p in (0.5, 0.9, 0.5, 0.7, 0.5)))  # fmt: skip
    regions = [at(9), at(4), at(2), at(9), at(6)]
    assert key_slices(findings, regions, 10) == [(4, [1]), (9, [0, 3]), (2, [2]), (6, [4])]
    assert key_slices(findings, regions, 2) == [(4, [1]), (9, [0, 3])]
    assert key_slices(Findings("m", "1", False), [], 3) == []


def test_point_region_of_a_centre_given_as_a_tuple() -> None:
    """A finding with a centre but no mask: its point on the nearest slice (a plain tuple of
    three millimetres, as findings hold it)."""
    geometry = Geometry.from_parts((0.0, 0.0, 0.0), np.eye(3), (2.0, 2.0, 5.0), (4, 10, 10))
    region = point_region(geometry, (4.0, 6.0, 10.0), None)
    assert region.slice_index == 2 and region.graphic_type == "POINT"
    assert region.points == ((2.5, 3.5),)
    circle = point_region(geometry, (4.0, 6.0, 10.0), 8.0)
    assert circle.graphic_type == "CIRCLE" and circle.points[1] == (4.5, 3.5)


def test_summary_settings_are_checked() -> None:
    from pydantic import ValidationError

    from dicomnode.config import ResultsSettings

    settings = ResultsSettings()
    assert (settings.summary, settings.summary_series_number, settings.kos_series_number) == (
        True, 9904, 9905,
    )  # fmt: skip
    assert settings.summary_max_images == 8
    with pytest.raises(ValidationError, match="may use only"):
        ResultsSettings(summary_description="{patient} key images")
    with pytest.raises(ValidationError, match="may use only"):
        ResultsSettings(kos_description="{model")
    for wrong in (0, 101):
        with pytest.raises(ValidationError):
            ResultsSettings(summary_max_images=wrong)
