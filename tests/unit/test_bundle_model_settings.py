"""What the site says of a bundle of its own ([models.bundle_settings.NAME]) wins over its
metadata.json; each label carries its SEG category; a classification bundle gives its class."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from dicomnode.config import BundleSettings, load_settings  # noqa: E402
from dicomnode.domain import Code  # noqa: E402
from dicomnode.errors import BundleInvalid, ConfigError, InputsRejected  # noqa: E402
from dicomnode.inference import ModelRegistry  # noqa: E402
from dicomnode.inference.bundle_model import (  # noqa: E402
    LOCAL_SCHEME,
    bundle_spec,
    label_category,
    label_code,
)
from dicomnode.results.seg import ANATOMY, LESION, Segment, _category  # noqa: E402
from tests.unit.test_bundle_model import TINY_UNET, write_zoo_bundle  # noqa: E402

CHANNELS = {"0": "background", "1": "spleen", "2": "liver_tumor", "3": "widget", "4": "gizmo"}


def abdomen(tmp_path: Path) -> Path:
    return write_zoo_bundle(
        tmp_path / "abdomen", channels=CHANNELS, network_def={**TINY_UNET, "out_channels": 5}
    )


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "dicomnode.toml"
    path.write_text(body)
    return path


def test_site_settings_parse_and_win_over_metadata(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = abdomen(tmp_path)
    settings = load_settings(
        write_config(
            tmp_path,
            f"""
[models.bundles]
abdomen = "{root}"

[models.bundle_settings.abdomen]
description = "Spleen and liver tumours, site-validated"
threshold = 0.7
accepts = {{ modalities = ["ct"], min_slices = 10 }}

[models.bundle_settings.abdomen.labels]
spleen = {{ value = "S-1", scheme = "99SITE", meaning = "Site spleen" }}
3 = {{ value = "W-3", scheme = "99SITE", meaning = "Widget", category = "lesion" }}
""",
        )
    )
    given = settings.models.bundle_settings["abdomen"]
    assert given.level == "series" and given.threshold == 0.7
    with caplog.at_level(logging.WARNING):
        spec = ModelRegistry.from_settings(settings).spec("abdomen")
    info = spec.info
    by_name = {label.name: label for label in info.labels}
    # the site's code wins over SNOMED CT's Spleen; by name and by channel number
    assert by_name["spleen"].finding_type.code == Code("S-1", "99SITE", "Site spleen")
    assert by_name["widget"].finding_type.code == Code("W-3", "99SITE", "Widget")
    # categories: the site's, else by the label's words
    assert by_name["widget"].category == "lesion"  # the site says so
    assert by_name["spleen"].category == "anatomy"
    assert by_name["liver_tumor"].category == "lesion"
    assert by_name["gizmo"].category == "anatomy"  # neither: a bundle's labels are organs mostly
    # neither coded by the site nor named by SNOMED CT: the local code, warned, and listed
    assert by_name["gizmo"].finding_type.scheme == LOCAL_SCHEME
    assert spec.uncoded_labels == tuple(
        label for label in ("liver_tumor", "gizmo") if not label_code(label)[1]
    )
    assert "gizmo" in spec.uncoded_labels
    assert "'gizmo' is no SNOMED CT concept" in caplog.text
    assert "'widget'" not in caplog.text and "'spleen'" not in caplog.text
    assert info.description == "Spleen and liver tumours, site-validated"
    assert info.accepts.modalities == ("CT",) and info.accepts.min_slices == 10
    assert info.thresholds == {"probability": 0.7}


def test_uncoded_labels_are_those_neither_the_site_nor_snomed_code(tmp_path: Path) -> None:
    root = abdomen(tmp_path)
    spec = bundle_spec("abdomen", root)
    expected = [label for label in list(CHANNELS.values())[1:] if not label_code(label)[1]]
    assert "widget" in expected and "spleen" not in expected
    assert list(spec.uncoded_labels) == expected
    coded = bundle_spec(
        "abdomen",
        root,
        BundleSettings.model_validate(
            {"labels": {label: {"value": "x", "meaning": label} for label in expected}}
        ),
    )
    assert coded.uncoded_labels == ()
    assert bundle_spec("abdomen", root).info.description == "Spleen segmentation (tiny, for tests)"


def test_bad_site_settings_are_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    root = abdomen(tmp_path)
    with pytest.raises(BundleInvalid, match=r"names 'kidney', which is no label of the bundle"):
        bundle_spec("abdomen", root, BundleSettings.model_validate({"labels": {"kidney": _code()}}))
    with pytest.raises(BundleInvalid, match="names '9', which is no label"):
        bundle_spec("abdomen", root, BundleSettings.model_validate({"labels": {"9": _code()}}))
    with pytest.raises(BundleInvalid, match=r"codes channel 0 .* the background"):
        bundle_spec("abdomen", root, BundleSettings.model_validate({"labels": {"0": _code()}}))
    with pytest.raises(BundleInvalid, match="level 'study' is not supported yet"):
        bundle_spec("abdomen", root, BundleSettings(level="study"))
    with pytest.raises(BundleInvalid, match=r"\[models.bundle_settings\] names 'other'"):
        ModelRegistry([], {"abdomen": root}, bundle_settings={"other": BundleSettings()})
    bad = write_config(
        tmp_path,
        '[models.bundle_settings.a.labels]\nspleen = { value = "1", meaning = "S", '
        'category = "organ" }\n',
    )
    with pytest.raises(ConfigError, match="category"):
        load_settings(bad)


def _code() -> dict[str, str]:
    return {"value": "1", "meaning": "Thing"}


@pytest.mark.parametrize(
    ("label", "category"),
    [
        ("spleen", "anatomy"),
        ("left_kidney", "anatomy"),
        ("liver_tumor", "lesion"),
        ("lung_nodule", "lesion"),
        ("Metastasis", "lesion"),
        ("renal_cyst", "lesion"),
        ("mass", "lesion"),
        ("widget", "anatomy"),
    ],
)
def test_label_category_from_its_words(label: str, category: str) -> None:
    assert label_category(label, label_code(label)[0]) == category


def test_seg_category_is_the_findings_else_from_the_type() -> None:
    spleen = Code("78961009", "SCT", "Spleen")
    nodule = Code("27925004", "SCT", "Nodule")
    lung = Code("39607008", "SCT", "Lung structure")
    # the packages' findings name no category: as before, by the type
    assert _category(Segment(1, "nodule", nodule, None)) == LESION
    assert _category(Segment(1, "lung", lung, None)) == ANATOMY
    assert _category(Segment(1, "spleen", spleen, None)) == LESION  # why bundles name theirs
    assert _category(Segment(1, "spleen", spleen, None, "anatomy")) == ANATOMY
    assert _category(Segment(1, "lung", lung, None, "lesion")) == LESION


def test_a_classification_bundle_gives_its_class_and_probability(tmp_path: Path) -> None:
    from dicomnode.imaging import load_series
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series

    files = write_series(
        list(ct_slices(SeriesSpec(slices=20, rows=40, columns=44, pixel_mm=0.75, seed=8))),
        tmp_path / "ct",
    )
    volume = load_series(files)
    classes = {"0": "normal", "1": "nodule", "2": "widget"}
    root = write_zoo_bundle(tmp_path / "cls", classes=classes, name="tiny_classifier", seed=5)
    spec = bundle_spec("grader", root)
    assert spec.info.params["output"] == "classification"
    assert [label.value for label in spec.info.labels] == [1, 2, 3]
    model = ModelRegistry([], {"grader": root}).load("grader")
    findings = model.predict(volume)
    theirs = monai_probabilities(root, tmp_path / "ct")
    summary = findings.summary
    ours = np.array([summary["class_probabilities"][name] for name in classes.values()])
    assert ours == pytest.approx(theirs, abs=2e-4)
    assert float(ours.sum()) == pytest.approx(1.0, abs=1e-3)
    top = int(np.argmax(theirs))
    assert float(np.sort(theirs)[-1] - np.sort(theirs)[-2]) > 1e-3  # a clear winner
    (finding,) = findings.findings
    assert finding.label == classes[str(top)] == summary["class"]
    assert finding.probability == pytest.approx(float(theirs[top]), abs=2e-4)
    assert finding.mask is None and finding.centre_mm is None and not findings.masks
    assert finding.finding_type == spec.info.labels[top].finding_type.code

    # with a threshold: every class that reaches it
    low = float(np.sort(theirs)[-2]) - 1e-3
    registry = ModelRegistry([], {"grader": root}, bundle_settings={"grader": spec_settings(low)})
    several = registry.load("grader").predict(volume)
    assert sorted(f.label for f in several.findings) == sorted(
        classes[str(n)] for n in np.argsort(theirs)[-2:]
    )


def spec_settings(threshold: float) -> BundleSettings:
    return BundleSettings(threshold=threshold)


def monai_probabilities(bundle: Path, dicom_dir: Path) -> np.ndarray:
    """What MONAI itself makes of the series with the classification bundle's config: its own
    loader (the pydicom reader), preprocessing, the network and the postprocessing."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    parser["preprocessing#transforms#0#reader"] = "PydicomReader"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("preprocessing")({"image": str(dicom_dir)})
    batch = list_data_collate([data])
    with torch.no_grad():
        pred = parser.get_parsed_content("inferer")(batch["image"], network)
    item = decollate_batch({**batch, "pred": pred})[0]
    out = parser.get_parsed_content("postprocessing")(item)["pred"]
    return np.asarray(out.numpy(), dtype=np.float64).ravel()


def test_the_example_configs_bundle_settings_parse() -> None:
    """The commented [models.bundle_settings] example of deploy/dicomnode.example.toml, taken
    in, is valid."""
    import tomllib

    from dicomnode.config import ModelsSettings

    example = Path(__file__).parents[2] / "deploy" / "dicomnode.example.toml"
    lines = example.read_text().splitlines()
    start = lines.index("# [models.bundle_settings.spleen]")
    taken = []
    for line in lines[start:]:
        if not line.startswith("# ") or line.startswith("# #"):
            break
        taken.append(line[2:])
    values = tomllib.loads("\n".join(taken))["models"]
    settings = ModelsSettings.model_validate(values).bundle_settings["spleen"]
    assert settings.labels["spleen"].category == "anatomy" and settings.threshold == 0.5
    assert settings.accepts is not None and settings.accepts.modalities == ("CT",)
    assert settings.accepts.body_parts == ("ABDOMEN",)


def test_a_one_label_probability_segmentation_is_cut_at_the_sites_threshold(
    tmp_path: Path,
) -> None:
    import json

    from dicomnode.imaging import load_series
    from dicomnode.inference.bundle_model import LABEL_MAP
    from dicomnode.phantoms.simple import SeriesSpec, ct_slices
    from dicomnode.phantoms.writer import write_series
    from tests.unit.test_bundle_model import zoo_inference

    files = write_series(
        list(ct_slices(SeriesSpec(slices=20, rows=40, columns=44, pixel_mm=0.75, seed=8))),
        tmp_path / "ct",
    )
    volume = load_series(files)
    # one sigmoid channel, inverted onto the source grid, not discretised
    root = write_zoo_bundle(
        tmp_path / "sig",
        channels={"0": "background", "1": "spleen"},
        network_def={**TINY_UNET, "out_channels": 1},
    )
    config = json.loads((root / "configs" / "inference.json").read_text())
    invert = zoo_inference()["postprocessing"]["transforms"][1]
    config["postprocessing"]["transforms"] = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        invert,
    ]
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    counts = {}
    for threshold in (0.3, 0.5, 0.7):
        registry = ModelRegistry(
            [], {"s": root}, bundle_settings={"s": BundleSettings(threshold=threshold)}
        )
        labels = registry.load("s").predict(volume).masks.get(LABEL_MAP)
        counts[threshold] = 0 if labels is None else int((labels == 1).sum())
    unset = ModelRegistry([], {"s": root}).load("s").predict(volume).masks.get(LABEL_MAP)
    assert counts[0.5] == (0 if unset is None else int((unset == 1).sum()))  # rint: 0.5 too
    assert counts[0.3] >= counts[0.5] >= counts[0.7]
    assert counts[0.3] > counts[0.7], counts  # the cut moves the voxels in: a real threshold


def test_the_sites_accepts_refuse_other_series(tmp_path: Path) -> None:
    from dicomnode.pipeline.inputs import SeriesFiles, check_accepted

    root = abdomen(tmp_path)
    given = BundleSettings.model_validate(
        {"accepts": {"modalities": ["CT"], "body_parts": ["abdomen", "Chest"]}}
    )
    spec = bundle_spec("abdomen", root, given)
    assert spec.info.accepts.body_parts == ("ABDOMEN", "CHEST")

    def series(modality: str, part: str) -> SeriesFiles:
        return SeriesFiles("1.2.3", modality, (), frozenset(), None, part)

    check_accepted(spec, series("CT", "abdomen"))
    with pytest.raises(InputsRejected, match=r"body part ABDOMEN, CHEST; series 1\.2\.3 is"):
        check_accepted(spec, series("CT", "HEAD"))
    with pytest.raises(InputsRejected, match="without a Body Part Examined"):
        check_accepted(spec, series("CT", ""))
    with pytest.raises(InputsRejected, match="accepts modality CT"):
        check_accepted(spec, series("MR", "ABDOMEN"))
    # metadata.json's modality, when the site says nothing
    assert bundle_spec("abdomen", root).info.accepts.modalities == ("CT",)


def test_the_sites_envelope_is_the_bundles(tmp_path: Path) -> None:
    """``[models.bundle_settings.NAME.envelope]``: what the bundle was validated on, checked
    as a package's; a bad range names itself."""
    from dicomnode.envelope import Envelope

    root = abdomen(tmp_path)
    given = BundleSettings.model_validate(
        {"envelope": {"body_parts": ["abdomen"], "slice_thickness_mm": [1.0, 5.0]}}
    )
    envelope = bundle_spec("abdomen", root, given).info.envelope
    assert envelope.body_parts == ("ABDOMEN",) and envelope.slice_thickness_mm == (1.0, 5.0)
    assert bundle_spec("abdomen", root).info.envelope == Envelope()  # nothing declared
    with pytest.raises(ValueError, match=r"range \[5\.0, 1\.0\] must be \[min, max\]"):
        BundleSettings.model_validate({"envelope": {"slice_thickness_mm": [5.0, 1.0]}})
