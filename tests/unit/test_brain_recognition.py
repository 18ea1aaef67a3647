"""The brain tumor model's four sequences recognised from real-world Series Descriptions (Siemens,
GE, Philips), by the model's accepts.inputs and the example config's brain-mri route alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicomnode.completion import StudySeries, recognise, recognition_text
from dicomnode.config import load_settings
from dicomnode.inference import read_model_toml

ROOT = Path(__file__).resolve().parents[2]
PATTERNS = dict(read_model_toml(ROOT / "models" / "brain_tumor" / "model.toml").accepts.inputs)
T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


def _series(*texts: str) -> list[StudySeries]:
    """Series in acquisition order (the later, the newer), by their recognition text."""
    return [
        StudySeries(f"1.2.3.{n}", text, True, T0 + timedelta(minutes=n))
        for n, text in enumerate(texts)
    ]


def test_the_example_route_uses_the_models_patterns() -> None:
    settings = load_settings(ROOT / "deploy" / "dicomnode.example.toml")
    (brain,) = [route for route in settings.routes if route.model == "brain_tumor"]
    assert dict(brain.completion.required_series) == PATTERNS
    assert list(PATTERNS) == ["T1c", "T1", "T2", "FLAIR"]  # T1c is tried before T1


@pytest.mark.parametrize(
    ("description", "protocol", "contrast", "expected"),
    [
        # Siemens
        ("t1_mprage_sag_p2_iso", "t1_mprage_sag_p2_iso", False, "T1"),
        ("t1_mprage_tra_p2_iso_POST", "", False, "T1c"),
        ("t1_se_tra", "t1_se_tra", True, "T1c"),  # contrast only in Contrast/Bolus Agent
        ("t2_tse_tra_512", "t2_tse_tra", False, "T2"),
        ("t2_tirm_tra_dark-fluid", "t2_tirm_tra_dark-fluid", False, "FLAIR"),
        ("t2_space_dark-fluid_sag_p2_iso", "", False, "FLAIR"),
        ("t2_swi_tra_p2_2mm", "", False, None),
        ("ep2d_diff_3scan_trace_p2", "", False, None),
        ("AAHead_Scout_64ch-head-coil", "", False, None),
        # GE
        ("Ax T1 FS POST", "BRAIN TUMOR", False, "T1c"),
        ("Sag T1 BRAVO +C", "", False, "T1c"),
        ("AX T1 FLAIR", "", False, "T1"),  # T1-weighted FLAIR is a T1
        ("AX T2 FRFSE", "", False, "T2"),
        ("Sag 3D FLAIR", "", False, "FLAIR"),
        ("AX T2 FLAIR", "", False, "FLAIR"),
        ("AX T2* GRE", "", False, None),
        ("3-pl T2* FGRE S", "", False, None),
        # Philips
        ("T1W_SE_GD", "", False, "T1c"),
        ("T1W_3D_TFE", "", False, "T1"),
        ("T1W_3D_TFE_Gd", "", False, "T1c"),
        ("T2W_TSE", "", False, "T2"),
        ("T2W_FLAIR", "", False, "FLAIR"),
        ("Survey", "", False, None),
        ("DWI_b1000", "", False, None),
    ],
)
def test_one_series_is_recognised(
    description: str, protocol: str, contrast: bool, expected: str | None
) -> None:
    text = recognition_text(description, protocol, contrast=contrast)
    found = recognise(_series(text), PATTERNS)
    assert found == ({expected: "1.2.3.0"} if expected else {}), text


def test_a_siemens_study_gets_each_sequence_once() -> None:
    study = _series(
        "AAHead_Scout_64ch-head-coil",
        "t1_se_sag | t1_se_sag | *se2d1",
        "t2_tse_tra_512 | t2_tse_tra | *tse2d1_15",
        "t2_tirm_tra_dark-fluid | t2_tirm_tra_dark-fluid | *tir2d1_16",
        "ep2d_diff_3scan_trace_p2",
        "t2_swi_tra_p2_2mm",
        recognition_text("t1_mprage_tra_p2_iso", "t1_mprage_tra_p2_iso", contrast=True),
    )
    assert recognise(study, PATTERNS) == {
        "T1c": "1.2.3.6", "T1": "1.2.3.1", "T2": "1.2.3.2", "FLAIR": "1.2.3.3"}  # fmt: skip


def test_a_study_without_flair_lacks_only_flair() -> None:
    study = _series("AX T1 SE", "AX T2 FRFSE", "Ax T1 FS POST", "AX T2* GRE")
    found = recognise(study, PATTERNS)
    assert found == {"T1c": "1.2.3.2", "T1": "1.2.3.0", "T2": "1.2.3.1"}


def test_the_phantom_studys_descriptions_are_recognised() -> None:
    from dicomnode.phantoms.brain import STUDY

    texts = [
        recognition_text(p.description, p.protocol, p.sequence, contrast=p.contrast == "T1c")
        for p in STUDY
    ]
    found = recognise(_series(*texts), PATTERNS)
    assert {name: STUDY[int(uid.rsplit(".", 1)[1])].contrast for name, uid in found.items()} == {
        "T1c": "T1c", "T1": "T1", "T2": "T2", "FLAIR": "FLAIR"}  # fmt: skip
