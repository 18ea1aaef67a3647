"""load_series on real files: geometry round trips, HU, enhanced, compressed, and every refusal."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from dicomnode.errors import (
    DuplicatePositions,
    LocalizerMixedIn,
    MismatchedFrames,
    MissingSlices,
    MixedOrientations,
    MixedSeries,
    NoImagePosition,
    SeriesNotVolume,
    UnevenSpacing,
    UnsupportedPixels,
)
from dicomnode.imaging import Geometry, StackRules, Volume, load_series, load_series_split
from dicomnode.phantoms.grids import phantom_geometry
from dicomnode.phantoms.writer import write_volume

SHAPE = (12, 20, 24)  # slices, rows, columns
SPACING = (0.8, 0.9, 2.5)  # column, row, slice mm
MARKER = (17, 5, 8)  # i, j, k on the written grid
TEST_FILES = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))  # type: ignore[arg-type]


def marked(geometry: Geometry) -> np.ndarray:
    """Air with one bright voxel at MARKER, and each slice's index in its first pixel."""
    array = np.full(geometry.shape, -1000.0)
    array[:, 0, 0] = np.arange(geometry.shape[0]) * 10 - 500
    i, j, k = MARKER
    array[k, j, i] = 700.0
    return array


def assert_round_trip(volume: Volume, written: Geometry) -> None:
    """The marker's patient point lands on the marker voxel, maps back, and names its frame."""
    assert volume.geometry.isclose(written)
    point = written.voxel_to_patient(MARKER)
    index = volume.geometry.array_index(point)
    assert volume.array[index] == pytest.approx(700.0)
    assert np.unravel_index(np.argmax(volume.array), volume.array.shape) == index
    back = volume.geometry.voxel_to_patient(volume.geometry.patient_to_voxel(point))
    np.testing.assert_allclose(back, point, atol=1e-6)
    # Slices are in position order whatever the file order: slice k holds written slice k.
    np.testing.assert_allclose(volume.array[:, 0, 0], np.arange(written.shape[0]) * 10 - 500)
    frame = volume.frame_at(point)
    assert frame == volume.frames[index[0]]
    ds = pydicom.dcmread(frame.path)
    if frame.frame_number is None:
        position = ds.ImagePositionPatient
        pixels = ds.pixel_array
    else:
        group = ds.PerFrameFunctionalGroupsSequence[frame.frame_number - 1]
        position = group.PlanePositionSequence[0].ImagePositionPatient
        pixels = ds.pixel_array[frame.frame_number - 1]
    np.testing.assert_allclose(
        [float(v) for v in position], written.voxel_to_patient([0, 0, MARKER[2]]), atol=1e-4
    )
    assert pixels[MARKER[1], MARKER[0]] == 700 + 1024


@pytest.mark.parametrize("orientation", ["axial", "feet_first", "oblique"])
@pytest.mark.parametrize("slice_order", ["ascending", "descending", "shuffled"])
def test_geometry_round_trip(tmp_path: Path, orientation: str, slice_order: str) -> None:
    geometry = phantom_geometry(SHAPE, SPACING, orientation)  # type: ignore[arg-type]
    paths = write_volume(marked(geometry), geometry, tmp_path, slice_order=slice_order, seed=3)  # type: ignore[arg-type]
    volume = load_series(paths)
    assert volume.array.dtype == np.float32
    assert volume.array.shape == SHAPE == volume.geometry.shape
    assert volume.geometry.spacing == pytest.approx(SPACING)
    assert volume.modality == "CT"
    assert volume.series_instance_uid == pydicom.dcmread(paths[0]).SeriesInstanceUID
    assert len({f.sop_instance_uid for f in volume.frames}) == SHAPE[0]
    assert all(f.frame_number is None for f in volume.frames)
    assert_round_trip(volume, geometry)


def test_feet_first_runs_down_and_shuffled_ignores_instance_numbers(tmp_path: Path) -> None:
    geometry = phantom_geometry(SHAPE, SPACING, "feet_first")
    paths = write_volume(marked(geometry), geometry, tmp_path, slice_order="shuffled", seed=1)
    volume = load_series(sorted(paths, key=lambda p: p.name, reverse=True))
    z = volume.geometry.voxel_to_patient([[0, 0, k] for k in range(SHAPE[0])])[:, 2]
    assert np.all(np.diff(z) == pytest.approx(-2.5))
    numbers = [pydicom.dcmread(f.path).InstanceNumber for f in volume.frames]
    assert numbers != sorted(numbers)


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
@pytest.mark.parametrize("slice_order", ["ascending", "shuffled"])
def test_enhanced_multiframe_round_trip(tmp_path: Path, orientation: str, slice_order: str) -> None:
    geometry = phantom_geometry(SHAPE, SPACING, orientation)  # type: ignore[arg-type]
    paths = write_volume(
        marked(geometry),
        geometry,
        tmp_path,
        enhanced=True,
        slice_order=slice_order,  # type: ignore[arg-type]
    )
    assert len(paths) == 1
    volume = load_series(paths)
    assert {f.sop_instance_uid for f in volume.frames} == {pydicom.dcmread(paths[0]).SOPInstanceUID}
    assert sorted(f.frame_number for f in volume.frames) == list(range(1, SHAPE[0] + 1))  # type: ignore[type-var]
    assert_round_trip(volume, geometry)


@pytest.mark.parametrize(
    ("unsigned", "rescale"),
    [(False, (1.0, -1024.0)), (True, (1.0, -1024.0)), (False, (0.5, -1000.0))],
)
def test_rescale_to_hu(tmp_path: Path, unsigned: bool, rescale: tuple[float, float]) -> None:
    geometry = phantom_geometry((3, 8, 10), (1.0, 1.0, 1.0))
    hu = np.linspace(-1024, 2000, 240).reshape(3, 8, 10).round()
    paths = write_volume(hu, geometry, tmp_path, unsigned=unsigned, rescale=rescale)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == (0 if unsigned else 1)
    assert ds.pixel_array.dtype == (np.uint16 if unsigned else np.int16)
    volume = load_series(paths)
    step = rescale[0]
    np.testing.assert_allclose(volume.array, np.round(hu / step) * step, atol=step / 2 + 1e-3)


def test_enhanced_rescale_and_unsigned(tmp_path: Path) -> None:
    geometry = phantom_geometry((4, 6, 6), (1.0, 1.0, 2.0))
    hu = np.arange(144, dtype=float).reshape(4, 6, 6) * 10 - 1000
    paths = write_volume(hu, geometry, tmp_path, enhanced=True, unsigned=True, rescale=(2.0, -1024))
    np.testing.assert_allclose(load_series(paths).array, hu, atol=1.0)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("enhanced", [False, True])
def test_compressed_series(tmp_path: Path, syntax: str, enhanced: bool) -> None:
    geometry = phantom_geometry((12, 64, 72), SPACING, "oblique")  # J2K needs 32+ pixels a side
    paths = write_volume(
        marked(geometry), geometry, tmp_path, transfer_syntax=syntax, enhanced=enhanced
    )
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.array, marked(geometry))
    assert_round_trip(volume, geometry)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_pydicom_compressed_files_decode(name: str) -> None:
    plain = load_series([get_testdata_file("MR_small.dcm")])  # type: ignore[list-item]
    compressed = load_series([get_testdata_file(name)])  # type: ignore[list-item]
    np.testing.assert_array_equal(compressed.array, plain.array)
    assert compressed.geometry == plain.geometry


def test_pydicom_ct_small_is_one_slice_in_hu() -> None:
    path = get_testdata_file("CT_small.dcm")
    volume = load_series([path])  # type: ignore[list-item]
    ds = pydicom.dcmread(path)  # type: ignore[arg-type]
    assert volume.array.shape == (1, 128, 128)
    np.testing.assert_array_equal(volume.array[0], ds.pixel_array.astype(np.float32) - 1024)
    np.testing.assert_allclose(volume.geometry.origin, [float(v) for v in ds.ImagePositionPatient])
    assert volume.geometry.spacing[:2] == pytest.approx(
        (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]))
    )
    assert volume.geometry.spacing[2] == pytest.approx(float(ds.SliceThickness))


def test_pydicom_ct_series_with_a_gap() -> None:
    files = sorted((TEST_FILES / "dicomdirtests/77654033/CT2").iterdir())
    with pytest.raises(MissingSlices, match=r"missing slices: 1 gap.*202\.50 mm.*1\.25 mm"):
        load_series(files)
    # Without the far slice, the rest is a regular 1.25 mm stack, whatever the file order.
    rest = [p for p in files if pydicom.dcmread(p).InstanceNumber != 18]
    volume = load_series(rest[::-1])
    assert volume.array.shape == (3, 16, 16)
    assert volume.geometry.spacing[2] == pytest.approx(1.25)
    z = [float(pydicom.dcmread(f.path).ImagePositionPatient[2]) for f in volume.frames]
    assert z == sorted(z)


def test_pydicom_radial_mr_has_mixed_orientations() -> None:
    files = sorted((TEST_FILES / "dicomdirtests/98892003/MR700").iterdir())
    with pytest.raises(MixedOrientations, match="7 orientations"):
        load_series(files)


def test_pydicom_folder_of_several_series() -> None:
    files = sorted((TEST_FILES / "dicomdirtests/98892003/MR2").iterdir())
    with pytest.raises(MixedSeries, match="3 series"):
        load_series(files)
    volumes = load_series_split(files)
    assert len(volumes) == len(files)
    assert {v.series_instance_uid for v in volumes} == {
        pydicom.dcmread(f).SeriesInstanceUID for f in files
    }


def pydicom_data(name: str) -> str:
    """A file of the pydicom-data package (enhanced CT/MR); skip where it is not installed."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} needs the pydicom-data package")
    return str(path)


def test_pydicom_data_enhanced_ct() -> None:
    path = pydicom_data("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    volume = load_series([path])
    assert volume.array.shape == (2, 512, 512)
    # Feet-first style orientation (-1 0 0 0 1 0): the normal is -z, so frame 2 (z -149) is first.
    assert [f.frame_number for f in volume.frames] == [2, 1]
    np.testing.assert_array_equal(volume.array, ds.pixel_array[::-1].astype(np.float32) - 1024)
    assert volume.geometry.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    np.testing.assert_allclose(volume.geometry.origin, (99.5, -301.5, -149.0))
    np.testing.assert_allclose(volume.geometry.direction, np.diag([-1.0, 1.0, -1.0]))


def test_pydicom_data_enhanced_mr_without_positions() -> None:
    path = pydicom_data("emri_small.dcm")
    with pytest.raises(NoImagePosition, match="10 frames without per-frame functional groups"):
        load_series([path])


# --- refusals -------------------------------------------------------------------------------


def axial_series(folder: Path, **options: object) -> tuple[list[Path], Geometry]:
    geometry = phantom_geometry(SHAPE, SPACING, "axial")
    return write_volume(marked(geometry), geometry, folder, **options), geometry  # type: ignore[arg-type]


def edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_missing_slice(tmp_path: Path) -> None:
    paths, _ = axial_series(tmp_path)
    del paths[5]
    message = r"5\.00 mm.*regular \(median\) step is 2\.50 mm.*about 1 slice"
    with pytest.raises(MissingSlices, match=message):
        load_series(paths)


def test_uneven_spacing_beyond_the_tolerance(tmp_path: Path) -> None:
    paths, geometry = axial_series(tmp_path)
    moved = geometry.voxel_to_patient([0, 0, 5]) + np.array([0, 0, 0.75])  # 30% of the 2.5 mm step
    edit(paths[5], ImagePositionPatient=[f"{v:.4f}" for v in moved])
    with pytest.raises(UnevenSpacing, match=r"steps from 1\.750 to 3\.250 mm.*10% tolerance"):
        load_series(paths)
    # The tolerance is configurable.
    volume = load_series(paths, rules=StackRules(spacing_tolerance=0.35))
    assert volume.array.shape == SHAPE


def test_slices_shifted_in_plane(tmp_path: Path) -> None:
    paths, geometry = axial_series(tmp_path)
    moved = geometry.voxel_to_patient([0, 0, 4]) + np.array([3.0, 0, 0])
    edit(paths[4], ImagePositionPatient=[f"{v:.4f}" for v in moved])
    with pytest.raises(UnevenSpacing, match=r"do not lie on one line.*3\.00 mm off"):
        load_series(paths)


def test_duplicate_positions(tmp_path: Path) -> None:
    paths, _ = axial_series(tmp_path)
    copy = tmp_path / "copy.dcm"
    shutil.copy(paths[3], copy)
    uid = generate_uid()
    ds = pydicom.dcmread(copy)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(copy)
    with pytest.raises(DuplicatePositions, match=r"both lie at .* mm along the slice normal"):
        load_series([*paths, copy])
    # The same instance twice is one instance, not a duplicate position.
    assert load_series([*paths, paths[3]]).array.shape == SHAPE


def test_localizer_mixed_in_and_split(tmp_path: Path) -> None:
    paths, geometry = axial_series(tmp_path / "axial")
    series_uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    coronal = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]).T  # IOP 1 0 0 0 0 -1
    scout = phantom_geometry((1, 40, 30), (2.0, 2.0, 1.0), coronal)
    scout_paths = write_volume(
        np.zeros(scout.shape),
        scout,
        tmp_path / "scout",
        series_uid=series_uid,
        study_uid=pydicom.dcmread(paths[0]).StudyInstanceUID,
        image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    mixed = [*paths[:6], *scout_paths, *paths[6:]]
    with pytest.raises(LocalizerMixedIn, match=r"1 localizer image.*12 slices.*load_series_split"):
        load_series(mixed)
    volumes = load_series_split(mixed)
    assert [v.array.shape for v in volumes] == [SHAPE, (1, 40, 30)]
    assert_round_trip(volumes[0], geometry)
    assert volumes[1].geometry.isclose(scout)


def test_other_orientation_without_localizer_flag(tmp_path: Path) -> None:
    paths, geometry = axial_series(tmp_path / "axial")
    ds = pydicom.dcmread(paths[0])
    oblique = phantom_geometry((4, 20, 24), SPACING, "oblique")
    other = write_volume(
        np.zeros(oblique.shape),
        oblique,
        tmp_path / "oblique",
        series_uid=ds.SeriesInstanceUID,
        study_uid=ds.StudyInstanceUID,
    )
    with pytest.raises(MixedOrientations, match=r"2 orientations.*12 at \[1, 0, 0, 0, 1, 0\]"):
        load_series([*paths, *other])
    volumes = load_series_split([*other, *paths])
    assert [v.array.shape for v in volumes] == [SHAPE, (4, 20, 24)]
    assert_round_trip(volumes[0], geometry)
    assert volumes[1].geometry.isclose(oblique)


def test_mismatched_rows_and_columns(tmp_path: Path) -> None:
    paths, geometry = axial_series(tmp_path / "a")
    ds = pydicom.dcmread(paths[0])
    small = Geometry.from_parts(
        geometry.voxel_to_patient([0, 0, 12]), np.eye(3), SPACING, (1, 10, 10)
    )
    extra = write_volume(
        np.zeros(small.shape),
        small,
        tmp_path / "b",
        series_uid=ds.SeriesInstanceUID,
        study_uid=ds.StudyInstanceUID,
    )
    with pytest.raises(MismatchedFrames, match=r"is 10x10 \(rows x columns\) but .* is 20x24"):
        load_series([*paths, *extra])


def test_mismatched_pixel_spacing(tmp_path: Path) -> None:
    paths, _ = axial_series(tmp_path)
    edit(paths[2], PixelSpacing=["0.5", "0.5"])
    with pytest.raises(MismatchedFrames, match=r"pixel spacing \[0\.5, 0\.5\] mm"):
        load_series(paths)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient"])
def test_no_image_position(tmp_path: Path, keyword: str) -> None:
    paths, _ = axial_series(tmp_path)
    edit(paths[7], **{keyword: None})
    with pytest.raises(NoImagePosition, match=f"{paths[7].name} has no valid"):
        load_series(paths)


def test_two_series(tmp_path: Path) -> None:
    first, _ = axial_series(tmp_path / "a", seed=1)
    second, _ = axial_series(tmp_path / "b", seed=2)
    with pytest.raises(MixedSeries, match="2 series"):
        load_series(first + second)
    assert [v.array.shape for v in load_series_split(first + second)] == [SHAPE, SHAPE]


def test_not_dicom_and_empty(tmp_path: Path) -> None:
    paths, _ = axial_series(tmp_path)
    note = tmp_path / "truth.json"
    note.write_text("{}")
    with pytest.raises(SeriesNotVolume, match=r"truth\.json is not a DICOM file"):
        load_series([*paths, note])
    with pytest.raises(SeriesNotVolume, match="no files"):
        load_series([])


def test_colour_is_refused() -> None:
    with pytest.raises(UnsupportedPixels, match="3 samples per pixel"):
        load_series([get_testdata_file("SC_rgb_rle.dcm")])  # type: ignore[list-item]


def test_gantry_tilt_is_kept_exact(tmp_path: Path) -> None:
    """A tilted CT stack (slices offset in y as z rises) loads with a sheared slice axis."""
    affine = phantom_geometry(SHAPE, SPACING).affine.copy()
    affine[1, 2] = np.tan(np.radians(15)) * SPACING[2]
    tilted = Geometry(affine, SHAPE)
    paths = write_volume(marked(tilted), tilted, tmp_path, slice_order="shuffled")
    volume = load_series(paths)
    assert_round_trip(volume, tilted)


def _pydicom_images() -> list[Path]:
    """pydicom's own single-frame test files, every one that opens as DICOM."""
    found = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        try:
            if "Rows" in ds and int(ds.get("NumberOfFrames", 1) or 1) == 1:
                found.append(path)
        except ValueError:
            continue  # a value pydicom refuses (this session validates strictly)
    return found


def test_attributes_read_raw_equal_pydicom_s(tmp_path: Path) -> None:
    # frames.py reads attributes from the raw elements, not through pydicom's conversion:
    # the records must equal those of the same files with every element converted
    from dicomnode.imaging.frames import decode, frames_of, read_dataset

    compared = 0
    for path in _pydicom_images():
        try:
            raw = read_dataset(path)
            records = frames_of(raw, str(path), 0)
        except SeriesNotVolume:
            continue
        converted = read_dataset(path)
        try:
            for element in converted.iterall():
                _ = element.value  # converts each element in place
        except ValueError:
            continue  # a value pydicom refuses (this session validates strictly)
        assert frames_of(converted, str(path), 0) == records, path.name
        if records[0].rows and int(raw.get("SamplesPerPixel", 1)) == 1:
            try:
                expected = converted.pixel_array
            except Exception:
                continue  # no decoder here: decode() names the transfer syntax
            rescaled = expected * records[0].slope + records[0].intercept
            np.testing.assert_allclose(decode([raw], records), rescaled[None], err_msg=path.name)
        compared += 1
    assert compared >= 20
