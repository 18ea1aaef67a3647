"""A classification's results (oct_grading-like: a diabetic retinopathy grade, lesion types and a
Grad-CAM attention map) on a multi-frame OCT: a TID 1500 SR with the grade as a coded value,
and Secondary Capture images of the map over the most attended B-scans."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.config import ResultsSettings
from dicomnode.domain import Code, Finding, Findings
from dicomnode.imaging import Volume, load_series
from dicomnode.results import FindingClass, build_results
from dicomnode.results.sc import blend, select_frames
from dicomnode.testing import validators

hd = pytest.importorskip("highdicom")

DR = Code("4855003", "SCT", "Diabetic retinopathy")
EXUDATE = Code("274741008", "SCT", "Retinal hard exudates")
WHEN = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def oct_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Volume]:
    from dicomnode.phantoms.retina import retina_phantom, write_ophthalmic

    phantom = retina_phantom("OPT", 2, 5)
    paths = write_ophthalmic(phantom, tmp_path_factory.mktemp("oct"))
    return paths, load_series(paths)


def attention_map(shape: tuple[int, ...], hot: list[int]) -> np.ndarray:
    """A Gaussian blob in the middle of the ``hot`` slices, a faint one elsewhere."""
    _, rows, columns = shape
    jj, ii = np.mgrid[0:rows, 0:columns]
    blob = np.exp(
        -(((jj - rows / 2) / (rows / 8)) ** 2 + ((ii - columns / 2) / (columns / 8)) ** 2)
    )
    out = np.repeat((blob * 40)[None], shape[0], axis=0)
    for k in hot:
        out[k] = blob * 255
    return np.rint(out).astype(np.uint8)


def grading(volume: Volume, hot: list[int]) -> Findings:
    probabilities = [0.05, 0.1, 0.7, 0.1, 0.05]
    return Findings(
        "oct_grading", "0.1.0", True,
        (
            Finding("dr_grade", DR, 0.7, attributes={"grade": 2, "probabilities": probabilities,
                                                      "scale": "ICDR"}),
            Finding("hard_exudates", EXUDATE, 0.81, attributes={"frames": hot}),
        ),
        {"attention": attention_map(volume.geometry.shape, hot)},
        summary={"grade": 2, "probabilities": probabilities,
                 "grade_meaning": "ICDR 2: moderate non-proliferative diabetic retinopathy"},
    )  # fmt: skip


def test_grade_and_attention_give_an_sr_and_secondary_captures(
    oct_series: tuple[list[Path], Volume], tmp_path: Path
) -> None:
    validators.require_tool("dciodvfy")
    validators.require_tool("tid1500reader")
    paths, volume = oct_series
    hot = [7, 12, 18]
    objects, _ = build_results(
        grading(volume, hot), volume, paths, ResultsSettings(), tmp_path, 11,
        route="retina", when=WHEN,
        classes=[FindingClass("dr_grade", DR), FindingClass("hard_exudates", EXUDATE)],
    )  # fmt: skip
    # no mask: no SEG; the attention map's three SCs, one key image (both findings where the
    # model looked) and its KOS
    assert [o.kind for o in objects] == ["SR", "SC", "SC", "SC", "SC", "KO"]
    for entry in objects:
        report = validators.dciodvfy(tmp_path / entry.path)
        assert report.errors == (), f"{entry.kind}: {report.output}"

    source = dcmread(paths[0], stop_before_pixels=True)
    shown = []
    for entry in objects[1:4]:
        sc = dcmread(tmp_path / entry.path)
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.PatientID == source.PatientID
        assert sc.Laterality == source.ImageLaterality  # the eye, from the source
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        (reference,) = sc.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        shown.append(int(reference.ReferencedFrameNumber))
        assert "demo weights" in sc.ImageComments
        pixels = sc.pixel_array
        assert pixels.shape == (volume.array.shape[1], volume.array.shape[2], 3)
        red, green, blue = (int(v) for v in pixels[pixels.shape[0] // 2, pixels.shape[1] // 2])
        assert red > 2 * blue and red > green  # the hot centre is red
    # the three most attended B-scans, as the source's frame numbers
    assert sorted(shown) == sorted(volume.frames[k].frame_number for k in hot)

    sr_path = tmp_path / objects[0].path
    report = validators.tid1500reader(sr_path, tmp_path / "sr.json")
    assert len(report["Measurements"]) == 2
    content = hd.sr.srread(sr_path).content
    grade, lesion = content.get_image_measurement_groups()
    # each on the most attended B-scan, boxed where the attention is at least half its peak:
    # the box's area comes first, inferred from the box
    for group in (grade, lesion):
        assert group.tracking_identifier.startswith("Cornerstone3DTools@^0.1.0:RectangleROI:")
        area = group.get_measurements()[0]
        assert (area.name.meaning, area.unit.value) == ("Area", "mm2")
        (box,) = area.referenced_coordinates
        (image,) = [i for i in box.ContentSequence if i.ValueType == "IMAGE"]
        (reference,) = image.ReferencedSOPSequence
        assert reference.ReferencedSOPInstanceUID == volume.frames[hot[0]].sop_instance_uid
        assert reference.ReferencedFrameNumber == volume.frames[hot[0]].frame_number
        attention = grading(volume, hot).masks["attention"][hot[0]]
        js, is_ = np.nonzero(attention >= 0.5 * attention.max())
        c0, r0, c1, r1 = is_.min(), js.min(), is_.max() + 1, js.max() + 1
        assert box.value.tolist() == [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]]
        spacing = volume.geometry.pixel_spacing
        assert area.value == pytest.approx((c1 - c0) * (r1 - r0) * spacing[0] * spacing[1])
    (evaluation,) = grade.get_qualitative_evaluations()
    assert evaluation.name.value == "4855003"
    assert evaluation.value.value == "312904009"  # moderate non-proliferative DR
    (presence,) = lesion.get_qualitative_evaluations()
    assert (presence.name.value, presence.value.value) == ("274741008", "52101004")  # present
    _, severity, probability = grade.get_measurements()
    assert (severity.name.meaning, severity.unit.value) == ("Severity", "{grade}")
    assert severity.value == 2
    assert probability.value == pytest.approx(0.7)
    comments = [
        str(item.TextValue) for item in dcmread(sr_path).ContentSequence[-1].ContentSequence
    ]
    assert comments == [
        "oct_grading 0.1.0 ran with demo weights: not for clinical use.",
        "ICDR 2: moderate non-proliferative diabetic retinopathy",
        "Probability of each grade (ICDR): 0: 0.050, 1: 0.100, 2: 0.700, 3: 0.100, 4: 0.050",
    ]


def test_attention_map_of_the_wrong_shape_fails_with_the_shapes(
    oct_series: tuple[list[Path], Volume], tmp_path: Path
) -> None:
    from dicomnode.errors import ResultsError

    paths, volume = oct_series
    findings = grading(volume, [3])
    bad = Findings(findings.model, findings.version, True, findings.findings,
                   {"attention": findings.masks["attention"][:, ::2]})  # fmt: skip
    with pytest.raises(ResultsError, match=r"attention map is \(25, 64, 128\); the source"):
        build_results(bad, volume, paths, ResultsSettings(), tmp_path, 12, route="retina",
                      when=WHEN)  # fmt: skip


def test_frames_shown_are_all_or_the_most_attended() -> None:
    attention = np.zeros((6, 4, 4), dtype=np.uint8)
    attention[4] = 200
    attention[1] = 100
    attention[5] = 50
    assert select_frames(attention, 3) == [1, 4, 5]
    assert select_frames(attention, 10) == list(range(6))
    grey = np.full((4, 4), 100, dtype=np.uint8)
    assert np.array_equal(blend(grey, np.zeros((4, 4), np.uint8), 0.5)[..., 0], grey)
    hot = blend(grey, np.full((4, 4), 255, np.uint8), 0.5)
    assert hot[0, 0].tolist() == [178, 50, 50]  # half grey, half the top of the scale (red)


@pytest.mark.parametrize("jpeg", [False, True], ids=["rgb", "jpeg"])
def test_colour_fundus_photograph_gets_its_heat_map_in_colour(tmp_path: Path, jpeg: bool) -> None:
    from dicomnode.imaging import load_planar
    from dicomnode.phantoms.retina import retina_phantom, write_ophthalmic

    validators.require_tool("dciodvfy")
    phantom = retina_phantom("OP", 3, 8)
    paths = write_ophthalmic(phantom, tmp_path / "op", jpeg=jpeg)
    volume = load_planar(paths)
    assert volume.array.shape[-1] == 3  # colour frames: [k, j, i, 3]
    findings = grading(volume, [0])
    objects, _ = build_results(findings, volume, paths, ResultsSettings(), tmp_path / "store", 13,
                               route="retina", when=WHEN)  # fmt: skip
    # one photograph: one image shown; its key image and KOS
    assert [o.kind for o in objects] == ["SR", "SC", "SC", "KO"]
    for entry in objects:
        report = validators.dciodvfy(tmp_path / "store" / entry.path)
        assert report.errors == (), report.output
    sc = dcmread(tmp_path / "store" / objects[1].path)
    source = dcmread(paths[0])
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    pixels, original = sc.pixel_array.astype(int), source.pixel_array.astype(int)
    original = original[0] if original.ndim == 4 else original
    attention = findings.masks["attention"][0]
    cold = attention < 45  # where the map is faint, the photograph shows through
    assert np.abs(pixels[cold] - original[cold]).mean() < 20
    hot = np.unravel_index(int(np.argmax(attention)), attention.shape)
    assert pixels[hot][0] > pixels[hot][2]  # red over the hottest point


def coded_values(ds: Any) -> list[str]:
    """Every code value in an SR's content tree (concept names and values)."""
    found = []
    for item in ds.get("ContentSequence", []):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            found += [str(code.CodeValue) for code in item.get(key, [])]
        found += coded_values(item)
    return found


def test_an_indeterminate_grade_is_written_as_indeterminate_never_as_absent(
    oct_series: tuple[list[Path], Volume], tmp_path: Path
) -> None:
    """Grade 0 was the most likely, but not confidently: the SR evaluates the finding as
    Indeterminate (SNOMED CT 82334004), with no grade, no Absent and no severity number; its
    words, the key image's and the KOS's say indeterminate with the probabilities."""
    from dicomnode.inference import findings_to_json

    validators.require_tool("dciodvfy")
    validators.require_tool("tid1500reader")
    paths, volume = oct_series
    probabilities = [0.62, 0.2, 0.1, 0.05, 0.03]
    attributes = {
        "grade": None,
        "most_likely_grade": 0,
        "probabilities": probabilities,
        "scale": "ICDR",
        "grade_meaning": "Indeterminate",
        "indeterminate": True,
    }
    findings = Findings(
        "oct_grading", "0.1.0", True,
        (Finding("dr_grade", DR, 0.62, attributes=attributes),),
        {"attention": attention_map(volume.geometry.shape, [7])},
        summary={"grade": None, "indeterminate": True, "most_likely_grade": 0,
                 "probabilities": probabilities, "grade_meaning": "Indeterminate"},
    )  # fmt: skip
    objects, _ = build_results(
        findings, volume, paths, ResultsSettings(), tmp_path, 14, route="retina", when=WHEN,
        classes=[FindingClass("dr_grade", DR)],
    )  # fmt: skip
    for entry in objects:
        report = validators.dciodvfy(tmp_path / entry.path)
        assert report.errors == (), f"{entry.kind}: {report.output}"
    (sr_entry,) = [o for o in objects if o.kind == "SR"]
    sr_path = tmp_path / sr_entry.path
    validators.tid1500reader(sr_path, tmp_path / "sr.json")
    (group,) = hd.sr.srread(sr_path).content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name.value, evaluation.value.value) == ("4855003", "82334004")
    assert evaluation.value.meaning == "Indeterminate"
    assert [m.name.meaning for m in group.get_measurements()] == ["Area", "Probability"]
    sr = dcmread(sr_path)
    codes_written = coded_values(sr)
    assert "82334004" in codes_written
    # neither Absent nor any ICDR grade's code
    for code in ("272519000", "312903003", "312904009", "312905005", "59276001"):
        assert code not in codes_written
    texts = []

    def collect(ds: Any) -> None:
        for item in ds.get("ContentSequence", []):
            if item.ValueType == "TEXT":
                texts.append(str(item.TextValue))
            collect(item)

    collect(sr)
    (comment,) = [t for t in texts if t.startswith("Diabetic retinopathy")]
    assert comment == (
        "Diabetic retinopathy: indeterminate (grade probabilities 0: 0.62, 1: 0.20, 2: 0.10, "
        "3: 0.05, 4: 0.03)"
    )
    assert "Indeterminate" in texts
    words = " ".join(texts).lower()
    assert "absent" not in words and "no dr" not in words and "no apparent" not in words
    # the key images and the KOS say the same
    for entry in objects:
        ds = dcmread(tmp_path / entry.path, stop_before_pixels=True)
        if entry.kind == "SC" and "key image" in str(ds.get("ImageComments", "")):
            assert "indeterminate" in str(ds.ImageComments)
            assert "No DR" not in str(ds.ImageComments)
        if entry.kind == "KO":
            assert "indeterminate" in coded_and_text(ds)
    # the job's findings JSON
    written = findings_to_json(findings)
    assert written["findings"][0]["attributes"]["indeterminate"] is True
    assert (
        written["summary"]["grade"] is None
        and written["findings"][0]["attributes"]["grade"] is None
    )


def coded_and_text(ds: Any) -> str:
    """All text values of a KOS's content tree, joined."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            out.append(str(item.TextValue))
        out.append(coded_and_text(item))
    return " ".join(out)
