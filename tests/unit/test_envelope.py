"""The acquisition envelope: each key of model.toml's [envelope] against a header and volume."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicomnode.envelope import Envelope
from dicomnode.imaging import Volume
from dicomnode.imaging.geometry import Geometry
from dicomnode.imaging.volume import FrameRef
from dicomnode.pipeline.envelope import Acquisition, check_envelope

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def ct(
    slices: int = 20, rows: int = 64, columns: int = 48, **header: object
) -> tuple[Dataset, Volume]:
    """A header and a volume of 0.7 x 0.8 mm pixels, slices 2.5 mm apart."""
    geometry = Geometry.from_parts((0, 0, 0), np.eye(3), (0.8, 0.7, 2.5), (slices, rows, columns))
    frames = tuple(
        FrameRef(f"1.2.{k}", "1.2.840.10008.5.1.4.1.1.2", None, "") for k in range(slices)
    )
    volume = Volume(np.zeros((slices, rows, columns), np.float32), geometry, frames, "CT", "1.2")
    ds = Dataset()
    ds.Modality = "CT"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "2.5"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    return ds, volume


def reasons(envelope: Envelope, *series: tuple[Dataset, Volume]) -> tuple[str, ...]:
    inputs = [Acquisition.of_volume(header, volume) for header, volume in series or [ct()]]
    return check_envelope(envelope, inputs).reasons


def test_an_empty_envelope_takes_everything() -> None:
    assert check_envelope(Envelope(), [Acquisition.of_volume(*ct())]).inside


def test_each_key_names_the_value_and_what_was_expected() -> None:
    assert reasons(Envelope(modalities=["mr"])) == ("modality CT is not MR",)
    assert reasons(Envelope(body_parts=["head", "brain"])) == ("body part CHEST is not HEAD/BRAIN",)
    assert reasons(Envelope(pixel_spacing_mm=(0.75, 1.0))) == (
        "pixel spacing 0.7 mm is outside 0.75-1 mm",
    )
    assert reasons(Envelope(slice_thickness_mm=(0.5, 1.5))) == (
        "slice thickness 2.5 mm is outside 0.5-1.5 mm",
    )
    assert reasons(Envelope(rows=(128, 1024), columns=(16, 32), frames=(21, 99))) == (
        "rows 64 is outside 128-1024",
        "columns 48 is outside 16-32",
        "frames 20 is outside 21-99",
    )
    assert reasons(Envelope(photometric=["RGB"])) == (
        "photometric interpretation MONOCHROME2 is not RGB",
    )
    assert reasons(Envelope(contrast="required")) == (
        "no contrast agent (Contrast/Bolus Agent empty); contrast is required",
    )
    given = ct(ContrastBolusAgent="Iohexol")
    assert reasons(Envelope(contrast="forbidden"), given) == (
        "a contrast agent was given; the model was validated without contrast",
    )
    assert reasons(Envelope(contrast="required"), given) == ()
    no_scout = Envelope(series={"ImageType": "^(?!.*LOCALIZER)"})
    assert reasons(no_scout) == ()
    scout = ct(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert reasons(no_scout, scout) == (
        "ImageType 'ORIGINAL\\\\PRIMARY\\\\LOCALIZER' does not match '^(?!.*LOCALIZER)'",
    )


def test_thickness_falls_back_to_the_slice_distance_and_series_are_each_checked() -> None:
    without = ct(slices=20)
    del without[0].SliceThickness
    assert reasons(Envelope(slice_thickness_mm=(0.5, 2.0)), without) == (
        "slice thickness 2.5 mm is outside 0.5-2 mm",
    )
    # a study-level input: every series in, one reason each, said once
    short = ct(slices=8)
    assert reasons(Envelope(frames=(16, 99)), ct(), short, short) == ("frames 8 is outside 16-99",)


def test_bad_envelopes_are_refused_when_the_model_is_loaded() -> None:
    with pytest.raises(ValidationError, match=r"must be \[min, max\]"):
        Envelope(rows=(512, 64))
    with pytest.raises(ValidationError, match="is not a regular expression"):
        Envelope(series={"SeriesDescription": "("})
    with pytest.raises(ValidationError):
        Envelope(contrast="maybe")


def test_headers_alone_give_the_same_verdict_as_the_loaded_series() -> None:
    """``route explain`` has only headers: their sizes, spacing and frames."""
    header, volume = ct(slices=3, rows=64, columns=48)
    header.Rows, header.Columns, header.PixelSpacing = 64, 48, [0.7, 0.8]
    envelope = Envelope(frames=(16, 99), pixel_spacing_mm=(0.75, 1.0), slice_thickness_mm=(1, 3))
    from_headers = check_envelope(envelope, [Acquisition.of_headers([header] * 3)])
    from_volume = check_envelope(envelope, [Acquisition.of_volume(header, volume)])
    assert from_headers == from_volume
    assert from_headers.reasons == (
        "pixel spacing 0.7 mm is outside 0.75-1 mm",
        "frames 3 is outside 16-99",
    )
    del header.PixelSpacing
    assert check_envelope(envelope, [Acquisition.of_headers([header])]).reasons[0] == (
        "pixel spacing unknown (not in the header); expected 0.75-1 mm"
    )
