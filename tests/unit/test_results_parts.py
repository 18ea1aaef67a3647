"""The pieces of dicomnode.results that need no DICOM tool: UIDs, segment planning, the
reference volume, the procedure reported, series descriptions and the [results] settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import ResultsSettings
from dicomnode.domain import Code, Finding, Findings, MaskRef
from dicomnode.errors import ConfigError, ResultsError
from dicomnode.imaging import FrameRef, Geometry, Volume
from dicomnode.results import reference_volume
from dicomnode.results.common import Producer
from dicomnode.results.seg import plan_segments
from dicomnode.results.sr import CT_CHEST, IMAGING_PROCEDURE, MR_BRAIN, procedure_reported
from dicomnode.results.uids import ResultUIDs, derive_uid, job_key

NODULE = Code("27925004", "SCT", "Nodule")
LUNG = Code("39607008", "SCT", "Lung structure")


def test_job_key_is_the_input_whatever_its_order() -> None:
    key = job_key("lung_nodule", "0.1.0", "chest", ["1.2.3", "1.2.4"])
    assert key == job_key("lung_nodule", "0.1.0", "chest", ["1.2.4", "1.2.3", "1.2.3"])
    assert key != job_key("lung_nodule", "0.1.1", "chest", ["1.2.3", "1.2.4"])
    assert key != job_key("lung_nodule", "0.1.0", "other", ["1.2.3", "1.2.4"])
    assert key != job_key("lung_nodule", "0.1.0", "chest", ["1.2.3"])


def test_uids_are_derived_valid_and_distinct() -> None:
    uids = ResultUIDs(job_key("m", "1", "r", ["1.2.3"]))
    again = ResultUIDs(job_key("m", "1", "r", ["1.2.3"]))
    made = [uids.series("seg"), uids.instance("seg"), uids.series("sr"), uids.instance("sc", 2)]
    assert made == [again.series("seg"), again.instance("seg"), again.series("sr"),
                    again.instance("sc", 2)]  # fmt: skip
    assert len(set(made)) == len(made)
    for uid in made:
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert all(part.isdigit() and (part == "0" or part[0] != "0") for part in uid.split("."))
    rooted = ResultUIDs(uids.key, "1.2.826.0.1.3680043.10.9.")
    assert rooted.instance("seg").startswith("1.2.826.0.1.3680043.10.9.")
    assert rooted.instance("seg") == ResultUIDs(uids.key, "1.2.826.0.1.3680043.10.9.").instance(
        "seg"
    )
    # the model as a device: one UID whatever the job
    other_job = ResultUIDs(job_key("m", "1", "r", ["1.2.4"]))
    assert uids.device_uid("m", "1") == other_job.device_uid("m", "1")
    assert uids.device_uid("m", "1") == derive_uid("", "dicomnode device", "m", "1")
    assert uids.device_uid("m", "1") != uids.device_uid("m", "2")


def finding(label: str, value: int | None, mask: str = "nodules") -> Finding:
    return Finding(label, NODULE, 0.9, LUNG, mask=MaskRef(mask, value) if value else None)


def test_each_finding_class_is_one_segment() -> None:
    labels = np.zeros((2, 3, 3), dtype=np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[1, 2, 2] = 1, 2, 3
    findings = Findings("lung_nodule", "1", True,
                        (finding("nodule", 1), finding("nodule", 2), finding("nodule", None)),
                        {"nodules": labels})  # fmt: skip
    segments, per_finding, luts = plan_segments(findings)
    assert [(s.number, s.label) for s in segments] == [(1, "nodule")]
    assert per_finding == (1, 1, None)
    # value 3 is no finding's: not segmented
    assert luts["nodules"].tolist() == [0, 1, 1, 0]


def test_segments_follow_the_model_label_order() -> None:
    tumor = np.arange(4, dtype=np.uint8).reshape(1, 2, 2)
    findings = Findings("brain_tumor", "1", False,
                        (finding("edema", 2, "tumor"), finding("enhancing_tumor", 3, "tumor"),
                         finding("necrotic_core", 1, "tumor")), {"tumor": tumor})  # fmt: skip
    order = {"necrotic_core": 0, "edema": 1, "enhancing_tumor": 2}
    segments, per_finding, luts = plan_segments(findings, order)
    assert [s.label for s in segments] == ["necrotic_core", "edema", "enhancing_tumor"]
    assert per_finding == (2, 3, 1)
    assert luts["tumor"].tolist() == [0, 1, 2, 3]


def test_a_finding_naming_a_missing_mask_fails_naming_it() -> None:
    findings = Findings(
        "m", "1", False, (finding("nodule", 1, "lesions"),), {"nodules": np.zeros(1)}
    )
    with pytest.raises(
        ResultsError, match=r"mask 'lesions'; the model returned masks \['nodules'\]"
    ):
        plan_segments(findings)


def volume(series: str) -> Volume:
    frames = (FrameRef("1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", None, ""),)
    return Volume(np.zeros((1, 2, 2), np.float32), Geometry(np.eye(4), (1, 2, 2)), frames, "MR",
                  series)  # fmt: skip


def test_the_reference_volume_is_the_findings_series() -> None:
    flair, t1 = volume("1.2.9.1"), volume("1.2.9.2")
    assert reference_volume({"T1": t1, "FLAIR": flair}, "1.2.9.1") is flair
    assert reference_volume({"T1": t1, "FLAIR": flair}, None) is flair  # first by name
    assert reference_volume(t1, None) is t1
    with pytest.raises(ResultsError, match=r"refer to series 1\.2\.9\.7, which is no input"):
        reference_volume({"T1": t1}, "1.2.9.7")


def test_procedure_reported_from_the_model_or_modality_and_region() -> None:
    assert procedure_reported("CT", "", [LUNG], None) == CT_CHEST
    assert procedure_reported("CT", "CHEST", [], None) == CT_CHEST
    assert (
        procedure_reported("MR", "", [Code("12738006", "SCT", "Brain structure")], None) == MR_BRAIN
    )
    assert procedure_reported("OPT", "EYE", [], None) == IMAGING_PROCEDURE
    declared = {"value": "1", "scheme": "99LOCAL", "meaning": "Retinal OCT"}
    assert procedure_reported("OPT", "", [], declared) == Code("1", "99LOCAL", "Retinal OCT")
    with pytest.raises(ResultsError, match="needs value, scheme and meaning"):
        procedure_reported("OPT", "", [], {"value": "1"})


def test_series_descriptions_and_the_model_as_a_device() -> None:
    demo = Producer("lung_nodule", "0.1.0", True)
    assert demo.describe("{model} {version} findings") == "lung_nodule 0.1.0 findings (demo)"
    assert demo.model_name == "lung_nodule 0.1.0 (demo weights: not for clinical use)"
    real = Producer("lung_nodule", "0.1.0", False)
    assert real.describe("AI: {model}") == "AI: lung_nodule"
    assert len(Producer("m" * 70, "1", True).describe("{model}")) == 64


def test_results_settings_check_templates_and_uid_roots() -> None:
    assert ResultsSettings(uid_root="1.2.826.0.1.3680043.10.9").uid_root == (
        "1.2.826.0.1.3680043.10.9."
    )
    assert ResultsSettings(uid_root="").uid_root == ""
    for bad in ("1.02.3", "1.2.x", "1." + "2" * 45):
        with pytest.raises(ValueError, match="UID root"):
            ResultsSettings(uid_root=bad)
    with pytest.raises(ValueError, match=r"may use only \{model\} and \{version\}"):
        ResultsSettings(sr_description="{model} for {patient}")


def test_results_section_from_a_config_file(tmp_path: Path) -> None:
    from dicomnode.config import load_settings

    path = tmp_path / "node.toml"
    path.write_text('[results]\nseg_series_number = 300\nsr_description = "AI {model}"\n')
    settings = load_settings(path)
    assert settings.results.seg_series_number == 300
    assert settings.results.sr_description == "AI {model}"
    path.write_text("[results]\nsc_opacity = 2\n")
    with pytest.raises(ConfigError, match=r"results\.sc_opacity"):
        load_settings(path)
