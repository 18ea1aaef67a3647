"""``dicomnode route explain`` on generated series and pydicom's real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from dicomnode.cli import main
from dicomnode.phantoms.simple import SeriesSpec, ct_slices, multiframe
from dicomnode.phantoms.writer import ENHANCED_MR_IMAGE_STORAGE, write_series
from dicomnode.testing.process import cli

CONFIG = """
[routing]
mode = "first"
fallback = "other"

[[destinations]]
name = "PACS"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[routes]]
name = "er-ct"
model = "triage_ct"
priority = "stat"
match = { Modality = "CT", calling_aet = "ER_CT" }

[[routes]]
name = "chest-ct"
model = "lung_nodule_ct"
destinations = ["PACS"]
priority = "urgent"
[routes.match]
Modality = "CT"
BodyPartExamined = "chest"
SeriesDescription = "re:(?i)thorax|chest|lung"
slices = { min = 5, max = 2000 }
rows = { min = 64 }

[[routes]]
name = "brain-mr"
model = "brats_mri_segmentation"
destinations = ["PACS"]
[routes.match]
Modality = "MR"
SOPClassUID = ["MR Image Storage", "Enhanced MR Image Storage"]
ImageType = ["ORIGINAL", "OTHER"]

[[routes]]
name = "other"
model = "triage"
"""


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Any]:
    """A chest CT, an abdomen CT, MR_small, an enhanced MR, and two files that are no DICOM."""

    def chest(ds: Any) -> Any:
        ds.BodyPartExamined, ds.SeriesDescription = "CHEST", "Thorax 1.0 B70f"
        return ds

    chest_files = write_series(
        [chest(ds) for ds in ct_slices(SeriesSpec(slices=6, seed=41))], tmp_path / "chest"
    )
    abdomen = list(ct_slices(SeriesSpec(slices=4, seed=42)))
    write_series(abdomen, tmp_path / "abdomen")
    mr = tmp_path / "mr" / "MR_small.dcm"
    mr.parent.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), mr)
    enhanced_mr = multiframe(ENHANCED_MR_IMAGE_STORAGE, frames=5)
    enhanced_mr.ImageType = ["ORIGINAL", "PRIMARY", "T1", "NONE"]
    enhanced = write_series([enhanced_mr], tmp_path / "emr")
    (tmp_path / "notes.txt").write_text("not DICOM")
    truncated = tmp_path / "truncated.dcm"  # cut inside the header: no Series Instance UID
    truncated.write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes()[:600])
    config = tmp_path / "node.toml"
    config.write_text(CONFIG)
    return {
        "config": config,
        "chest": str(chest_files[0].parent),
        "chest_uid": str(next(ct_slices(SeriesSpec(slices=1, seed=41))).SeriesInstanceUID),
        "abdomen": str(tmp_path / "abdomen"),
        "abdomen_uid": str(abdomen[0].SeriesInstanceUID),
        "mr": str(mr),
        "enhanced": str(enhanced[0]),
        "bad": [str(tmp_path / "notes.txt"), str(truncated), str(tmp_path / "absent.dcm")],
    }


def explain_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["route", "explain", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_explain_json_routes_each_series(
    study: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    files = [study["chest"], study["abdomen"], study["mr"], study["enhanced"], *study["bad"]]
    result = explain_json(capsys, *files, "--config", str(study["config"]))
    by_uid = {s["series_instance_uid"]: s for s in result["series"]}
    assert len(by_uid) == 4

    chest = by_uid[study["chest_uid"]]
    assert chest["slices"] == 6 and chest["modality"] == "CT"
    assert chest["decision"] == {
        "basis": "first",
        "routes": [
            {
                "name": "chest-ct",
                "model": "lung_nodule_ct",
                "destinations": ["PACS"],
                "priority": "urgent",
                "level": "series",
            }
        ],
    }
    rules = {r["route"]: r for r in chest["rules"]}
    assert list(rules) == ["er-ct", "chest-ct", "brain-mr", "other"]
    assert rules["er-ct"]["outcome"] == "no_match"
    assert rules["er-ct"]["reason"] == "does not match: calling_aet is unknown (expected 'ER_CT')"
    assert rules["chest-ct"]["chosen"] and rules["chest-ct"]["outcome"] == "match"
    assert [c["text"] for c in rules["chest-ct"]["conditions"]] == [
        "Modality 'CT' matches 'CT'",
        "BodyPartExamined 'CHEST' matches 'chest'",
        "SeriesDescription 'Thorax 1.0 B70f' matches re:(?i)thorax|chest|lung",
        "slices 6 is in 5..2000",
        "rows 64 is >= 64",
    ]
    assert rules["brain-mr"]["conditions"][0] == {
        "key": "Modality",
        "expected": "'MR'",
        "actual": "CT",
        "outcome": "no_match",
        "text": "Modality 'CT' does not match 'MR'",
    }
    assert rules["other"]["reason"] == "the fallback, not needed: 'chest-ct' matched"

    abdomen = by_uid[study["abdomen_uid"]]
    assert [r["name"] for r in abdomen["decision"]["routes"]] == ["other"]
    assert abdomen["decision"]["basis"] == "fallback"
    why_not = {r["route"]: r["reason"] for r in abdomen["rules"]}["chest-ct"]
    assert why_not == (
        "does not match: BodyPartExamined is absent (expected 'chest'); "
        "SeriesDescription 'Generated CT' does not match re:(?i)thorax|chest|lung; "
        "slices 4 is not in 5..2000"
    )

    mr_routes = [
        [r["name"] for r in s["decision"]["routes"]]
        for s in result["series"]
        if s["modality"] == "MR"
    ]
    assert mr_routes == [["brain-mr"], ["brain-mr"]]  # MR_small and the enhanced MR

    errors = {Path(e["path"]).name: e["error"] for e in result["errors"]}
    assert sorted(errors) == ["absent.dcm", "notes.txt", "truncated.dcm"]
    assert "No such file" in errors["absent.dcm"]
    assert "DICM" in errors["notes.txt"]
    assert errors["truncated.dcm"] == "has no Series Instance UID"


def test_calling_aet_takes_part_in_routing(
    study: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    args = [study["chest"], "--config", str(study["config"]), "--calling-aet", "er_ct"]
    (series,) = explain_json(capsys, *args)["series"]
    assert series["calling_aet"] == "er_ct"
    assert [r["name"] for r in series["decision"]["routes"]] == ["er-ct"]
    rules = {r["route"]: r for r in series["rules"]}
    assert rules["er-ct"]["conditions"][1]["text"] == "calling_aet 'er_ct' matches 'ER_CT'"
    assert rules["chest-ct"]["reason"] == (
        "matches, but 'er-ct' comes first (routing.mode = first)"
    )


def test_explain_table(study: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    files = [study["chest"], study["abdomen"], study["mr"], *study["bad"]]
    assert main(["route", "explain", *files, "--config", str(study["config"])]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert f"series {study['chest_uid']}: CT 'Thorax 1.0 B70f', 6 instance(s)" in out
    assert "-> chest-ct: model lung_nodule_ct, priority urgent, to PACS [first]" in out
    assert "-> other: model triage, priority routine, to (no destinations) [fallback]" in out
    assert "-> brain-mr: model brats_mri_segmentation" in out
    assert "chosen: the first route that matches (routing.mode = first)" in out
    assert "SeriesDescription 'Generated CT' does not match re:(?i)thorax|chest|lung" in out
    assert "chosen: the fallback (routing.fallback), as no other route matches" in out
    notes, truncated, absent = study["bad"]
    assert f"dicomnode: {notes}: not readable" in captured.err
    assert f"dicomnode: {truncated}: has no Series Instance UID" in captured.err
    assert f"dicomnode: {absent}: not readable" in captured.err
    assert "3 series, 3 file(s) not read" in captured.err


def test_series_with_no_route_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[[routes]]\nname = "mr"\nmodel = "m"\nmatch = { Modality = "MR" }\n')
    files = write_series(ct_slices(SeriesSpec(slices=2, seed=43)), tmp_path / "ct")
    assert main(["route", "explain", str(files[0].parent), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "-> no route matches: the series is skipped" in out
    (series,) = explain_json(capsys, str(files[0]), "--config", str(config))["series"]
    assert series["decision"] == {"basis": "none", "routes": []}
    assert series["slices"] == 1  # only the files given count


def test_bad_rule_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[[routes]]\nname = "brain-mr"\nmodel = "m"\nmatch = { SeriesDescription = "re:(t1" }\n'
    )
    mr = get_testdata_file("MR_small.dcm")
    assert main(["route", "explain", mr, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "route 'brain-mr': match.SeriesDescription" in err
    assert "not a valid regular expression" in err


def test_console_command_in_a_child_process(study: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    done = cli("route", "explain", study["mr"], "--config", str(study["config"]), "--json", env=env)
    assert done.returncode == 0, done.stderr
    (series,) = json.loads(done.stdout)["series"]
    assert [r["name"] for r in series["decision"]["routes"]] == ["brain-mr"]


def test_explain_says_whether_a_series_is_inside_its_models_envelope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A six-slice CT and a model validated on 16 slices or more: explain says so, from the
    headers, with the route's policy."""
    from dicomnode.testing.bundles import write_model_package

    write_model_package(tmp_path / "models", "thin", envelope="frames = [16, 2000]\n")
    config = tmp_path / "node.toml"
    config.write_text(
        f'[models]\ndirs = ["{tmp_path / "models"}"]\n\n'
        '[[routes]]\nname = "ct"\nmodel = "thin"\nenvelope = "flag"\nmatch = { Modality = "CT" }\n'
    )
    files = write_series(list(ct_slices(SeriesSpec(slices=6, seed=43))), tmp_path / "ct")
    report = explain_json(capsys, "--config", str(config), str(files[0].parent))
    (route,) = report["series"][0]["decision"]["routes"]
    assert route["envelope"] == {
        "inside": False,
        "reasons": ["frames 6 is outside 16-2000"],
        "policy": "flag",
    }
    assert main(["route", "explain", "--config", str(config), str(files[0].parent)]) == 0
    out = capsys.readouterr().out
    assert "outside the model's acquisition envelope (run and flagged):" in out
    assert "frames 6 is outside 16-2000" in out


def test_explain_gives_a_command_models_envelope_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``[models.commands.NAME.envelope]`` is judged as a package's is, with the route's policy
    (the default: refuse)."""
    config = tmp_path / "node.toml"
    config.write_text(
        '[models.commands.seg]\ncommand = ["/bin/true"]\n'
        'envelope = { modalities = ["MR"], frames = [16, 2000] }\n\n'
        '[[routes]]\nname = "ct"\nmodel = "seg"\nmatch = { Modality = "CT" }\n'
    )
    files = write_series(list(ct_slices(SeriesSpec(slices=6, seed=44))), tmp_path / "ct")
    report = explain_json(capsys, "--config", str(config), str(files[0].parent))
    (route,) = report["series"][0]["decision"]["routes"]
    assert route["envelope"] == {
        "inside": False,
        "reasons": ["modality CT is not MR", "frames 6 is outside 16-2000"],
        "policy": "refuse",
    }
