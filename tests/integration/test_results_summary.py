"""Key images (Secondary Captures with each finding outlined and its numbers burned in) and the
Key Object Selection document that flags them, on a chest CT (single-frame and enhanced), a
brain-like three-label segmentation and an OCT classification: valid (dciodvfy), read back as
built, the same bytes on a rerun, the outline where the SR's region is, the text panel and the
demo warning where they belong, and the KOS referring to exactly the key images and their
source slices."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import ResultsSettings
from dicomnode.domain import Code, Finding, Findings, MaskRef
from dicomnode.imaging import Volume, load_series
from dicomnode.phantoms.chest import chest_ct
from dicomnode.phantoms.writer import write_volume
from dicomnode.results import FindingClass, build_objects, build_results, write_objects
from dicomnode.results.regions import KeyRegion, finding_regions
from dicomnode.results.render import WARNING, colour_of, scale_factor
from dicomnode.testing import validators
from tests.integration.test_results_classification import DR, EXUDATE, grading
from tests.integration.test_results_objects import (
    NODULE_CLASS,
    SETTINGS,
    WHEN,
    Chest,
    json_of,
    nodule_findings,
    write_chest,
)

hd = pytest.importorskip("highdicom")

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: an outline's pixels lie within this many pixels of its scaled points (2 px wide, rounding)
NEAR = 3
#: no pixel of a finding's colour farther than this from its region (its label fits inside)
FAR = 200


@pytest.fixture(scope="module", params=["single-frame", "enhanced"])
def chest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Chest:
    enhanced = request.param == "enhanced"
    return write_chest(tmp_path_factory.mktemp(request.param), enhanced=enhanced)


def built_and_written(
    findings: Findings,
    volume: Volume | dict[str, Volume],
    paths: Sequence[Path],
    storage: Path,
    settings: ResultsSettings = SETTINGS,
    classes: Sequence[FindingClass] = (),
) -> dict[str, Any]:
    built = build_objects(findings, volume, paths, settings, route="summary", when=WHEN,
                          classes=classes)  # fmt: skip
    objects = write_objects(built, storage, 1)
    return {
        "storage": storage,
        "objects": objects,
        "built": {name: ds for _, name, ds in built.datasets},
        "timing": built.timing_s,
    }


def plain(ds: Dataset) -> Any:
    """A dataset as JSON values (dates as highdicom built them, DA objects, as their text)."""
    return json.loads(json.dumps(json_of(ds), default=str))


def key_entries(run: dict[str, Any]) -> list[Any]:
    return [o for o in run["objects"] if Path(o.path).name.startswith("key-")]


def kos_entry(run: dict[str, Any]) -> Any:
    (entry,) = [o for o in run["objects"] if o.kind == "KO"]
    return entry


def slice_of(volume: Volume, reference: Dataset) -> int:
    """The volume slice a Source Image Sequence item refers to."""
    frame = reference.get("ReferencedFrameNumber")
    for k, ref in enumerate(volume.frames):
        if ref.sop_instance_uid == reference.ReferencedSOPInstanceUID and (
            frame is None or int(frame) == ref.frame_number
        ):
            return k
    raise AssertionError(f"{reference.ReferencedSOPInstanceUID} is no slice of the volume")


def images_by_slice(run: dict[str, Any], volume: Volume) -> dict[int, Dataset]:
    out = {}
    for entry in key_entries(run):
        ds = dcmread(run["storage"] / entry.path)
        (reference,) = ds.SourceImageSequence
        out[slice_of(volume, reference)] = ds
    return out


def outline_points(region: KeyRegion, factor: int) -> list[tuple[int, int]]:
    """Points of the drawn outline, (x, y) in the scaled image."""
    if region.graphic_type == "CIRCLE":
        (cx, cy), (ex, ey) = region.points
        radius = float(np.hypot(ex - cx, ey - cy))
        angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        points = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
    else:
        points = list(region.points)
    return [(round(c * factor), round(r * factor)) for c, r in points]


def assert_outlined(
    pixels: np.ndarray, region: KeyRegion, colour: tuple[int, int, int], factor: int, height: int
) -> None:
    """``colour`` at every outline point of ``region`` and nowhere far from it (above the text
    panel, which lists the finding in its colour)."""
    hit = np.all(pixels[:height] == colour, axis=-1)
    for x, y in outline_points(region, factor):
        window = hit[max(y - NEAR, 0) : y + NEAR + 1, max(x - NEAR, 0) : x + NEAR + 1]
        assert window.any(), f"no {colour} outline near ({x}, {y})"
    xs, ys = zip(*outline_points(region, factor), strict=True)
    rows, columns = np.nonzero(hit)
    far = (
        (columns < min(xs) - FAR)
        | (columns > max(xs) + FAR)
        | (rows < min(ys) - FAR)
        | (rows > max(ys) + FAR)
    )
    assert not far.any(), f"{colour} far from its region, at {rows[far][:3]}, {columns[far][:3]}"


def band_of(pixels: np.ndarray, height: int) -> np.ndarray:
    band = pixels[height:]
    assert band.shape[0] >= 40, "no text panel below the image"
    black = np.all(band == 0, axis=-1)
    assert black.mean() > 0.6, "the text panel is not on black"
    assert not black.all(), "the text panel has no text"
    return band


def has_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(pixels == colour, axis=-1).any())


def assert_valid_and_read_back(run: dict[str, Any]) -> None:
    validators.require_tool("dciodvfy")
    for entry in [*key_entries(run), kos_entry(run)]:
        path = run["storage"] / entry.path
        report = validators.dciodvfy(path)
        assert report.errors == (), f"{entry.path}: {report.output}"
        built = run["built"][Path(entry.path).name]
        if entry.kind == "KO":
            read = hd.ko.KeyObjectSelectionDocument.from_dataset(dcmread(path))
        else:
            read = dcmread(path)
        assert plain(read) == plain(built)


def assert_kos_refers_to_the_key_images(run: dict[str, Any], volume: Volume) -> Dataset:
    kos_path = run["storage"] / kos_entry(run).path
    kos = dcmread(kos_path)
    assert kos.SOPClassUID == KOS_CLASS and kos.Modality == "KO"
    keys = [dcmread(run["storage"] / e.path) for e in key_entries(run)]
    root = kos.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("113000", "DCM")  # Of Interest
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    referenced = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID): i for i in images}
    sources: dict[str, set[int]] = {}
    for key in keys:
        (reference,) = key.SourceImageSequence
        frames = sources.setdefault(str(reference.ReferencedSOPInstanceUID), set())
        if "ReferencedFrameNumber" in reference:
            frames.add(int(reference.ReferencedFrameNumber))
    assert set(referenced) == {str(k.SOPInstanceUID) for k in keys} | set(sources)
    assert len(images) == len(referenced)  # each once
    for uid, frames in sources.items():
        item = referenced[uid].ReferencedSOPSequence[0]
        listed = item.get("ReferencedFrameNumber")
        if frames:
            values = listed if isinstance(listed, Sequence) else [listed]
            assert sorted(int(v) for v in values) == sorted(frames)
        else:
            assert listed is None
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == set(referenced)  # complete, and nothing else
    (study,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == keys[0].StudyInstanceUID == kos.StudyInstanceUID
    device = hd.ko.KeyObjectSelectionDocument.from_dataset(kos).content.get_observer_contexts()
    assert device  # the model, as a device
    return kos


def kos_description(kos: Dataset) -> str:
    (text,) = [
        str(i.TextValue)
        for i in kos.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    return text


@pytest.fixture(scope="module")
def chest_run(chest: Chest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return built_and_written(
        nodule_findings(chest.phantom), chest.volume, chest.paths,
        tmp_path_factory.mktemp("storage"), classes=[NODULE_CLASS],
    )  # fmt: skip


def test_chest_key_images_and_kos_are_valid_and_read_back_as_built(
    chest_run: dict[str, Any], chest: Chest
) -> None:
    assert [o.kind for o in chest_run["objects"]] == ["SEG", "SR", "SC", "SC", "KO"]
    assert [Path(o.path).name for o in chest_run["objects"][2:]] == [
        "key-001.dcm", "key-002.dcm", "kos.dcm",
    ]  # fmt: skip
    assert_valid_and_read_back(chest_run)
    assert set(chest_run["timing"]) >= {"summary", "kos"}
    source = dcmread(chest.paths[0], stop_before_pixels=True)
    for number, entry in enumerate(key_entries(chest_run), start=1):
        ds = dcmread(chest_run["storage"] / entry.path)
        assert ds.SOPClassUID == SC_CLASS and entry.sop_class_uid == SC_CLASS
        assert ds.SeriesNumber == 9904 and ds.InstanceNumber == number
        assert ds.SeriesDescription == "lung_nodule key images (demo)"
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.BurnedInAnnotation == "NO"
        assert (ds.StudyInstanceUID, ds.PatientID) == (source.StudyInstanceUID, source.PatientID)
        assert ds.PatientOrientation == ["L", "P"]  # axial rows and columns
        assert "demo weights: not for clinical use" in ds.ImageComments
        assert ds.DerivationDescription
    kos = dcmread(chest_run["storage"] / kos_entry(chest_run).path)
    assert kos.SeriesNumber == 9905 and kos.SeriesDescription == "lung_nodule key objects (demo)"


def test_each_nodule_is_outlined_where_the_sr_region_is(
    chest_run: dict[str, Any], chest: Chest
) -> None:
    findings = nodule_findings(chest.phantom)
    regions = finding_regions(findings, chest.volume.geometry)
    images = images_by_slice(chest_run, chest.volume)
    assert sorted(images) == sorted(r.slice_index for r in regions)  # one image per key slice
    _, rows, columns = chest.volume.geometry.shape
    factor = scale_factor(rows, columns)
    assert max(rows, columns) * factor >= 512
    for index, (finding, region) in enumerate(zip(findings.findings, regions, strict=True)):
        pixels = images[region.slice_index].pixel_array
        assert pixels.shape[1] == columns * factor
        assert_outlined(pixels, region, colour_of(index), factor, rows * factor)
        band = band_of(pixels, rows * factor)
        assert has_colour(band, colour_of(index))  # its line, in its colour
        assert has_colour(band, WARNING)  # demo weights
        other = colour_of(1 - index)
        assert not has_colour(pixels, other)  # the other nodule is on the other image
        comments = images[region.slice_index].ImageComments
        assert f"Nodule {index + 1}: {finding.diameter_mm:.1f} mm" in comments
        assert f"p={finding.probability:.2f}" in comments


def test_kos_flags_exactly_the_key_images_and_their_source_slices(
    chest_run: dict[str, Any], chest: Chest
) -> None:
    kos = assert_kos_refers_to_the_key_images(chest_run, chest.volume)
    text = kos_description(kos)
    assert "Nodule 1: 10.0 mm" in text and "Nodule 2: 8.0 mm" in text
    assert "DEMO WEIGHTS: NOT FOR CLINICAL USE" in text


def test_rerun_writes_the_same_bytes_and_summary_off_writes_neither(
    chest: Chest, tmp_path: Path
) -> None:
    findings = nodule_findings(chest.phantom)
    runs = []
    for n in range(2):
        objects, _ = build_results(
            findings, chest.volume, chest.paths, SETTINGS, tmp_path / f"run{n}", 5,
            route="chest-ct", when=WHEN, classes=[NODULE_CLASS],
        )  # fmt: skip
        runs.append(objects)
    for a, b in zip(*runs, strict=True):
        assert a.as_json() == b.as_json()
        assert (tmp_path / "run0" / a.path).read_bytes() == (
            tmp_path / "run1" / b.path
        ).read_bytes()
    # summary off: neither the key images nor the KOS; an earlier run's files are removed
    objects, _ = build_results(
        findings, chest.volume, chest.paths, ResultsSettings(summary=False), tmp_path / "run0",
        5, route="chest-ct", when=WHEN, classes=[NODULE_CLASS],
    )  # fmt: skip
    assert [o.kind for o in objects] == ["SEG", "SR"]
    folder = tmp_path / "run0" / "results" / "5" / "dicom"
    assert sorted(p.name for p in folder.glob("*.dcm")) == ["seg.dcm", "sr.dcm"]


def test_real_weights_carry_no_demo_warning(chest: Chest, tmp_path: Path) -> None:
    run = built_and_written(
        nodule_findings(chest.phantom, demo=False), chest.volume, chest.paths, tmp_path,
        classes=[NODULE_CLASS],
    )  # fmt: skip
    _, rows, columns = chest.volume.geometry.shape
    height = rows * scale_factor(rows, columns)
    for entry in key_entries(run):
        ds = dcmread(tmp_path / entry.path)
        assert "demo" not in ds.ImageComments.lower()
        assert "demo" not in ds.SeriesDescription
        assert not has_colour(band_of(ds.pixel_array, height), WARNING)
    kos = dcmread(tmp_path / kos_entry(run).path)
    assert "DEMO" not in kos_description(kos)


def test_no_findings_give_a_key_image_of_the_middle_slice_saying_so(
    chest: Chest, tmp_path: Path
) -> None:
    empty = Findings("lung_nodule", "0.1.0", True, (), {})
    run = built_and_written(empty, chest.volume, chest.paths, tmp_path, classes=[NODULE_CLASS])
    assert [o.kind for o in run["objects"]] == ["SR", "SC", "KO"]
    assert_valid_and_read_back(run)
    (k,) = images_by_slice(run, chest.volume)
    assert k == chest.volume.geometry.shape[0] // 2
    (entry,) = key_entries(run)
    ds = dcmread(tmp_path / entry.path)
    assert "No nodule found" in ds.ImageComments
    _, rows, columns = chest.volume.geometry.shape
    band = band_of(ds.pixel_array, rows * scale_factor(rows, columns))
    assert has_colour(band, WARNING)
    kos = assert_kos_refers_to_the_key_images(run, chest.volume)
    assert "No nodule found" in kos_description(kos)


def brain_study(folder: Path) -> tuple[Findings, dict[str, Volume], list[Path], list[FindingClass]]:
    """As test_results_objects' three-label brain tumour: edema, enhancing rim, necrotic core
    in one label map on FLAIR of a FLAIR + T1 study (real weights)."""
    phantom = chest_ct((24, 48, 48), (2.0, 2.0, 3.0), "oblique", seed=9, vessels=False)
    study = "1.2.826.0.1.3680043.10.1447.78"
    volumes, paths = {}, []
    for name in ("FLAIR", "T1"):
        files = write_volume(phantom.array, phantom.geometry, folder / name, study_uid=study,
                             series_description=name, seed=len(paths))  # fmt: skip
        volumes[name] = load_series(files)
        paths += files
    tumor = np.zeros(phantom.geometry.shape, dtype=np.uint8)
    tumor[8:16, 16:32, 16:32] = 2
    tumor[10:14, 20:28, 20:28] = 3
    tumor[11:13, 22:26, 22:26] = 1
    codes = {"necrotic_core": Code("6574001", "SCT", "Necrosis"),
             "edema": Code("79654002", "SCT", "Edema"),
             "enhancing_tumor": Code("108369006", "SCT", "Neoplasm")}  # fmt: skip
    brain = Code("12738006", "SCT", "Brain structure")
    voxel_mm3 = float(abs(np.linalg.det(phantom.geometry.affine[:3, :3])))
    findings = Findings(
        "brain_tumor", "0.2.0", False,
        tuple(
            Finding(name, codes[name], p, brain, mask=MaskRef("tumor", v),
                    volume_mm3=float((tumor == v).sum()) * voxel_mm3)
            for name, v, p in (("edema", 2, 0.8), ("enhancing_tumor", 3, 0.88),
                               ("necrotic_core", 1, 0.6))
        ),
        {"tumor": tumor},
        reference=volumes["FLAIR"].series_instance_uid,
    )  # fmt: skip
    classes = [FindingClass(name, code, brain) for name, code in codes.items()]
    return findings, volumes, paths, classes


def test_brain_labels_each_on_its_key_slice_most_probable_first(tmp_path: Path) -> None:
    findings, volumes, paths, classes = brain_study(tmp_path / "mr")
    flair = volumes["FLAIR"]
    regions = finding_regions(findings, flair.geometry)
    assert [r.slice_index for r in regions] == [8, 10, 11]  # where each covers most
    run = built_and_written(findings, volumes, paths, tmp_path / "all", classes=classes)
    assert_valid_and_read_back(run)
    images = images_by_slice(run, flair)
    assert list(images) == [10, 8, 11]  # by probability: enhancing, edema, necrotic core
    _, rows, columns = flair.geometry.shape
    factor = scale_factor(rows, columns)
    for index, region in enumerate(regions):
        pixels = images[region.slice_index].pixel_array
        assert_outlined(pixels, region, colour_of(index), factor, rows * factor)
        assert not has_colour(band_of(pixels, rows * factor), WARNING)  # real weights
    assert "Edema: 21.5 mL, p=0.80" in images[8].ImageComments  # 1792 voxels of 12 mm3
    assert "Enhancing tumor: 2688 mm3, p=0.88" in images[10].ImageComments  # 224 voxels
    kos = assert_kos_refers_to_the_key_images(run, flair)
    assert "Necrotic core" in kos_description(kos)
    # at most two images: the two most probable findings' slices
    few = built_and_written(findings, volumes, paths, tmp_path / "few",
                            ResultsSettings(summary_max_images=2), classes)  # fmt: skip
    assert list(images_by_slice(few, flair)) == [10, 8]
    assert_valid_and_read_back(few)
    assert_kos_refers_to_the_key_images(few, flair)


def test_oct_grade_and_lesion_share_the_most_attended_b_scan(tmp_path: Path) -> None:
    from dicomnode.phantoms.retina import retina_phantom, write_ophthalmic

    paths = write_ophthalmic(retina_phantom("OPT", 2, 5), tmp_path / "oct")
    volume = load_series(paths)
    findings = grading(volume, [12])
    classes = [FindingClass("dr_grade", DR), FindingClass("hard_exudates", EXUDATE)]
    run = built_and_written(findings, volume, paths, tmp_path / "store", classes=classes)
    # the attention map's three SCs, one key image, its KOS
    assert [o.kind for o in run["objects"]] == ["SR", "SC", "SC", "SC", "SC", "KO"]
    assert_valid_and_read_back(run)
    images = images_by_slice(run, volume)
    assert list(images) == [12]  # both findings: where the model looked
    (ds,) = images.values()
    assert ds.Laterality == dcmread(paths[0], stop_before_pixels=True).ImageLaterality
    assert "Diabetic retinopathy grade 2 (Moderate NPDR), p=0.70" in ds.ImageComments
    assert "Hard exudates: present, p=0.81" in ds.ImageComments
    (region, _) = finding_regions(findings, volume.geometry, findings.masks["attention"])
    assert region.graphic_type == "POLYLINE" and region.slice_index == 12
    _, rows, columns = volume.geometry.shape
    factor = scale_factor(rows, columns)
    pixels = ds.pixel_array
    assert (
        pixels.shape == (pixels.shape[0], columns * factor, 3) and pixels.shape[0] > rows * factor
    )
    for index in (0, 1):  # the same box, drawn in both colours, each labelled
        assert has_colour(pixels[: rows * factor], colour_of(index))
    assert_outlined(pixels, region, colour_of(1), factor, rows * factor)
    assert has_colour(band_of(pixels, rows * factor), WARNING)
    kos = assert_kos_refers_to_the_key_images(run, volume)
    assert "grade 2" in kos_description(kos)
