"""The acquisition envelope: every key's check, its parsing in model.toml and the config, the
header values read from single- and multi-frame datasets, and the demo models' envelopes."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicomnode.config import BundleSettings, CommandModelSettings, RouteSettings
from dicomnode.envelope import Envelope, EnvelopeVerdict, InputHeader, input_header, series_header
from dicomnode.errors import EnvelopeRefused, InputsRejected, ModelPackageInvalid
from dicomnode.inference.protocol import read_model_toml

CHEST_CT = InputHeader(
    series_instance_uid="1.2.3",
    modality="CT",
    body_part="CHEST",
    pixel_spacing=(0.7, 0.7),
    slice_thickness=1.0,
    rows=512,
    columns=512,
    frames=300,
    photometric="MONOCHROME2",
    contrast_agent=None,
    attributes={"ImageType": "ORIGINAL\\PRIMARY\\AXIAL", "SeriesDescription": "Chest 1mm"},
)


@pytest.mark.parametrize(
    ("envelope", "header", "reason"),
    [
        (Envelope(modalities=("CT",)), {"modality": "MR"}, "modality MR is not CT"),
        (
            Envelope(body_parts=("chest", "lung")),
            {"body_part": "abdomen"},
            "body part abdomen is not CHEST or LUNG",
        ),
        (
            Envelope(pixel_spacing_mm=(0.4, 1.0)),
            {"pixel_spacing": (0.7, 1.5)},
            "pixel spacing 0.7 x 1.5 mm is outside 0.4-1.0 mm",
        ),
        (
            Envelope(slice_thickness_mm=(0.5, 3.0)),
            {"slice_thickness": 10.0},
            "slice thickness 10.0 mm is outside 0.5-3.0 mm",
        ),
        (Envelope(rows=(256, 1024)), {"rows": 128}, "rows 128 is outside 256-1024"),
        (Envelope(columns=(256, 1024)), {"columns": 2048}, "columns 2048 is outside 256-1024"),
        (Envelope(frames=(16, 2000)), {"frames": 1}, "frames 1 is outside 16-2000"),
        (
            Envelope(photometric=("MONOCHROME2",)),
            {"photometric": "RGB"},
            "photometric interpretation RGB is not MONOCHROME2",
        ),
        (
            Envelope(contrast="forbidden"),
            {"contrast_agent": "Iohexol"},
            "contrast agent Iohexol recorded; the model is validated without contrast",
        ),
        (
            Envelope(contrast="required"),
            {"contrast_agent": ""},
            "no contrast agent recorded; the model is validated with contrast",
        ),
        (
            Envelope(series={"ImageType": "^(?!.*LOCALIZER)"}),
            {"attributes": {"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}},
            "ImageType 'ORIGINAL\\\\PRIMARY\\\\LOCALIZER' does not match '^(?!.*LOCALIZER)'",
        ),
        (
            Envelope(series={"SeriesDescription": "(?i)chest"}),
            {"attributes": {}},
            "SeriesDescription is not recorded; expected to match '(?i)chest'",
        ),
    ],
)
def test_each_key_names_the_attribute_the_value_and_the_range(
    envelope: Envelope, header: dict[str, object], reason: str
) -> None:
    from dataclasses import replace

    # the chest CT (with contrast, for the envelope that needs it) is inside each of them
    base = (
        replace(CHEST_CT, contrast_agent="Iohexol") if envelope.contrast == "required" else CHEST_CT
    )
    assert envelope.check(base).inside
    verdict = envelope.check(replace(base, **header))  # type: ignore[arg-type]
    assert verdict == EnvelopeVerdict(False, (reason,))


def test_an_input_inside_every_key_is_inside_and_bounds_are_inclusive() -> None:
    envelope = Envelope(
        modalities=("CT",), body_parts=("CHEST",), pixel_spacing_mm=(0.7, 0.7),
        slice_thickness_mm=(1.0, 1.0), rows=(512, 512), columns=(512, 512), frames=(300, 300),
        photometric=("MONOCHROME2",), contrast="forbidden",
        series={"ImageType": "AXIAL", "SeriesDescription": "(?i)chest"},
    )  # fmt: skip
    assert envelope.check(CHEST_CT) == EnvelopeVerdict(True)
    assert Envelope().empty and Envelope().check(InputHeader()).inside
    assert not envelope.empty


def test_attributes_the_input_does_not_record_are_listed_not_judged() -> None:
    envelope = Envelope(
        body_parts=("CHEST",), pixel_spacing_mm=(0.4, 1.0), slice_thickness_mm=(0.5, 3.0)
    )
    verdict = envelope.check(InputHeader(modality="CT"))
    assert verdict.inside
    assert verdict.unchecked == ("body part", "pixel spacing", "slice thickness")
    assert verdict.as_json("flag") == {
        "inside": True,
        "unchecked": ["body part", "pixel spacing", "slice thickness"],
        "policy": "flag",
    }


def test_several_reasons_and_several_inputs_combine() -> None:
    envelope = Envelope(modalities=("MR",), slice_thickness_mm=(0.5, 3.0))
    thick = envelope.check(InputHeader(modality="MR", slice_thickness=5.0))
    both = envelope.check(InputHeader(modality="CT", slice_thickness=5.0))
    assert both.reasons == ("modality CT is not MR", "slice thickness 5.0 mm is outside 0.5-3.0 mm")
    combined = EnvelopeVerdict.combine({"T1": EnvelopeVerdict(True), "FLAIR": thick})
    assert not combined.inside
    assert combined.reasons == ("FLAIR: slice thickness 5.0 mm is outside 0.5-3.0 mm",)
    assert EnvelopeVerdict.combine({"only": thick}).reasons == thick.reasons
    assert combined.as_json("refuse") == {
        "inside": False,
        "reasons": ["FLAIR: slice thickness 5.0 mm is outside 0.5-3.0 mm"],
        "policy": "refuse",
    }


def test_header_values_of_single_and_multi_frame_datasets() -> None:
    ds = Dataset()
    ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = "1.2", "CT", "CHEST"
    ds.PixelSpacing, ds.SliceThickness = ["0.5", "0.6"], "2.5"
    ds.Rows, ds.Columns, ds.PhotometricInterpretation = 256, 240, "MONOCHROME2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    header = input_header(ds, frames=40, series=["ImageType", "SeriesDescription"])
    assert header.pixel_spacing == (0.5, 0.6) and header.slice_thickness == 2.5
    assert (header.rows, header.columns, header.frames) == (256, 240, 40)
    assert header.attributes == {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}
    assert header.contrast_agent is None
    assert series_header([ds, ds, ds]).frames == 3

    enhanced = Dataset()
    enhanced.Modality, enhanced.NumberOfFrames = "OPT", 25
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = ["0.015625", "0.046875"], "0.24"
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    enhanced.SharedFunctionalGroupsSequence = [shared]
    header = series_header([enhanced])
    assert header.pixel_spacing == (0.015625, 0.046875) and header.slice_thickness == 0.24
    assert header.frames == 25 and header.rows is None


def test_model_toml_and_config_parse_the_envelope(tmp_path: Path) -> None:
    toml = tmp_path / "model.toml"
    base = 'name = "m"\nversion = "1"\nentry = "model:M"\n'
    toml.write_text(
        base + '[envelope]\nmodalities = ["ct"]\nslice_thickness_mm = [0.5, 3]\n'
        'series = { ImageType = "AXIAL" }\n'
    )
    envelope = read_model_toml(toml).envelope
    assert envelope == Envelope(
        modalities=("CT",), slice_thickness_mm=(0.5, 3.0), series={"ImageType": "AXIAL"}
    )
    toml.write_text(base + "[envelope]\nslice_thickness = [0.5, 3]\n")
    with pytest.raises(ModelPackageInvalid, match=r"envelope\.slice_thickness: Unexpected"):
        read_model_toml(toml)
    toml.write_text(base + "[envelope]\nrows = [512, 256]\n")
    with pytest.raises(ModelPackageInvalid, match=r"rows = \[512.0, 256.0\] must be \[min, max\]"):
        read_model_toml(toml)
    toml.write_text(base)
    assert read_model_toml(toml).envelope is None

    assert RouteSettings(name="r", model="m").envelope == "refuse"
    assert RouteSettings(name="r", model="m", envelope="flag").envelope == "flag"
    with pytest.raises(ValidationError, match="'refuse' or 'flag'"):
        RouteSettings(name="r", model="m", envelope="warn")  # type: ignore[arg-type]
    bundle = BundleSettings(envelope={"modalities": ["MR"], "contrast": "required"})  # type: ignore[arg-type]
    assert bundle.envelope == Envelope(modalities=("MR",), contrast="required")
    command = CommandModelSettings(command=("run",), envelope={"frames": [16, 1000]})  # type: ignore[arg-type]
    assert command.envelope == Envelope(frames=(16.0, 1000.0))
    with pytest.raises(ValidationError, match="not a regular expression"):
        CommandModelSettings(command=("run",), envelope={"series": {"ImageType": "("}})  # type: ignore[arg-type]


def test_input_errors_are_permanent_and_a_refusal_carries_its_result() -> None:
    assert InputsRejected.permanent and not ModelPackageInvalid.permanent
    refused = EnvelopeRefused("outside", {"envelope": {"inside": False}})
    assert refused.permanent and refused.http_status == 422
    assert refused.result == {"envelope": {"inside": False}} and refused.message == "outside"


@pytest.mark.slow
def test_the_demo_phantoms_are_inside_the_demo_models_envelopes(tmp_path: Path) -> None:
    from collections import defaultdict

    from pydicom import dcmread

    from dicomnode.config import Settings
    from dicomnode.inference.registry import ModelRegistry
    from dicomnode.phantoms.demo import demo_studies

    registry = ModelRegistry.from_settings(Settings())
    for study in demo_studies(tmp_path):
        envelope = registry.spec(study.model).info.envelope
        assert envelope is not None and envelope.modalities, study.model
        series: dict[str, list[Dataset]] = defaultdict(list)
        for path in study.files:
            ds = dcmread(path, stop_before_pixels=True)
            series[str(ds.SeriesInstanceUID)].append(ds)
        for datasets in series.values():
            verdict = envelope.check(series_header(datasets, envelope.series))
            assert verdict.inside and not verdict.unchecked, (study.name, verdict)
