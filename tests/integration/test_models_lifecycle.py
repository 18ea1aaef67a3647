"""``dicomnode models list|run|check`` for the people who add models: every model with its kind,
version and digest (command models too); one run of a model on files, outside the queue and
the database, writing what it would send; a check of those objects that fails loudly."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.phantoms.chest import chest_ct
from dicomnode.testing.process import cli
from dicomnode.testing.validators import dciodvfy, require_tool

ROOT = Path(__file__).resolve().parents[2]
LUNG_TOML = ROOT / "models" / "lung_nodule" / "model.toml"

#: a command model: argv[1] in/, argv[2] out/, argv[3] what to do
PROGRAM = r"""
import json, sys
from pathlib import Path

inp, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
assert sorted(inp.glob("*.dcm")), "no inputs"
if mode == "findings":
    nodule = {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
    findings = [{"label": "nodule", "finding_type": nodule, "probability": 0.875,
                 "diameter_mm": 6.5}]
    (out / "findings.json").write_text(json.dumps(findings))
elif mode == "crash":
    print("segmentation fault in the tool (simulated)", file=sys.stderr)
    sys.exit(3)
elif mode == "garbage":
    (out / "result.dcm").write_bytes(b"not DICOM" * 20)
"""


def _config(tmp_path: Path) -> Path:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    lines = []
    for mode in ("findings", "crash", "garbage"):
        argv = json.dumps([sys.executable, str(script), "{input}", "{output}", mode])
        lines += [f"[models.commands.cmd_{mode}]", f"command = {argv}", 'version = "2.1"', ""]
    config = tmp_path / "node.toml"
    config.write_text("\n".join(lines))
    return config


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DICOMNODE_CONFIG"}
    return {**env, "DICOMNODE_NODE__STORAGE_DIR": str(tmp_path / "node")}


def _chest(tmp_path: Path) -> list[Path]:
    phantom = chest_ct((40, 128, 128), (2.0, 2.0, 2.5), nodules=1, seed=5101, sizes=(10.0, 14.0))
    return list(phantom.write(tmp_path / "chest"))


def test_models_list_shows_kinds_versions_and_digests(tmp_path: Path) -> None:
    config = _config(tmp_path)
    result = cli("models", "list", "--json", "--config", str(config), env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert {"echo", "lung_nodule", "cmd_findings", "cmd_crash"} <= set(models)
    lung = models["lung_nodule"]
    declared = LUNG_TOML.read_text().split("[weights]", 1)[1].split('sha256 = "', 1)[1][:64]
    weights = ROOT / "models" / "lung_nodule" / "weights" / "demo.pt"
    assert lung["kind"] == "package" and lung["version"] == "0.1.0"
    assert lung["digest"] == declared == hashlib.sha256(weights.read_bytes()).hexdigest()
    command = models["cmd_findings"]
    assert command["kind"] == "command" and command["version"] == "2.1"
    assert len(command["digest"]) == 64 and command["digest"] != models["cmd_crash"]["digest"]
    assert models["echo"]["kind"] == "builtin" and models["echo"]["digest"] is None
    table = cli("models", "list", "--config", str(config), env=_env(tmp_path))
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["cmd_findings"][1:4] == ["command", "2.1", command["digest"][:12]]
    assert rows["lung_nodule"][1:4] == ["package", "0.1.0", declared[:12]]


@pytest.mark.slow
def test_models_run_writes_the_seg_and_sr_of_lung_nodule(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    files = _chest(tmp_path)
    out = tmp_path / "out"
    result = cli("models", "run", "lung_nodule", *map(str, files), "--out", str(out),
                 env=_env(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "model lung_nodule: 1 series in" in result.stdout and "finding: nodule" in result.stdout
    written = sorted(out.glob("*.dcm"))
    kinds = {str(dcmread(p, stop_before_pixels=True).Modality): p for p in written}
    assert set(kinds) == {"SEG", "SR", "OT", "KO"}, written  # OT: the key images (SC)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    for path in written:
        assert str(dcmread(path, stop_before_pixels=True).StudyInstanceUID) == study
        report = dciodvfy(path)
        assert not report.errors, report.output
    assert not (tmp_path / "node").exists()  # no node database, no spool


def test_models_run_fails_with_the_reason(tmp_path: Path) -> None:
    config = _config(tmp_path)
    files = _chest(tmp_path)[:3]
    env = _env(tmp_path)
    crash = cli("models", "run", "cmd_crash", *map(str, files), "--out", str(tmp_path / "o"),
                "--config", str(config), env=env)  # fmt: skip
    assert crash.returncode != 0
    assert "exited with status 3" in crash.stderr and "segmentation fault" in crash.stderr
    # lung_nodule takes CT of at least 16 slices: the worker's own check refuses 3
    few = cli("models", "run", "lung_nodule", *map(str, files), "--out", str(tmp_path / "o"),
              env=env)  # fmt: skip
    assert few.returncode != 0 and "needs at least 16 slices" in few.stderr
    missing = cli("models", "run", "nope", str(files[0]), "--out", str(tmp_path / "o"), env=env)
    assert missing.returncode != 0 and "unknown model(s) 'nope'" in missing.stderr
    not_dicom = tmp_path / "notes.txt"
    not_dicom.write_text("hello")
    bad = cli("models", "run", "lung_nodule", str(not_dicom), "--out", str(tmp_path / "o"),
              env=env)  # fmt: skip
    assert bad.returncode != 0 and "is not a DICOM file" in bad.stderr


def test_models_check_of_command_models(tmp_path: Path) -> None:
    config = _config(tmp_path)
    env = _env(tmp_path)
    files = _chest(tmp_path)[:4]
    good = cli("models", "check", "cmd_findings", *map(str, files), "--config", str(config),
               env=env)  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok   SR" in good.stdout and "ok cmd_findings: 3 of 3 object(s) valid" in good.stdout
    # without files: a phantom (a chest CT: a command model names no modality)
    phantom = cli("models", "check", "cmd_findings", "--config", str(config), env=env)
    assert phantom.returncode == 0, phantom.stdout + phantom.stderr
    assert "input: a phantom" in phantom.stdout
    garbage = cli("models", "check", "cmd_garbage", *map(str, files), "--config", str(config),
                  env=env)  # fmt: skip
    assert garbage.returncode != 0 and "out/result.dcm is not a DICOM file" in garbage.stderr
    crash = cli("models", "check", "cmd_crash", *map(str, files), "--config", str(config),
                env=env)  # fmt: skip
    assert crash.returncode != 0 and "exited with status 3" in crash.stderr


def test_check_objects_names_what_is_wrong(tmp_path: Path) -> None:
    from dicomnode.pipeline.trial import TrialRun, check_objects

    files = _chest(tmp_path)[:2]
    ds = dcmread(files[0], stop_before_pixels=True)
    study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    entry = {"kind": "SEG", "path": str(files[0])}  # a CT slice posing as a SEG
    run = TrialRun("x", study, (series,), (entry,), {})
    (check,) = check_objects(run)
    assert any("SOP class 1.2.840.10008.5.1.4.1.1.2," in p for p in check.problems)
    assert "reuses an input's Series Instance UID" in check.problems
    other = TrialRun("x", "1.2.3", ("1.2.3.4",), ({"kind": "SR", "path": str(files[1])},), {})
    (check,) = check_objects(other)
    assert any("is not the input's" in p for p in check.problems)
    assert any("no SR storage class" in p for p in check.problems)


@pytest.mark.slow
def test_models_check_of_a_bundle_warns_of_labels_without_a_code(tmp_path: Path) -> None:
    """A Model Zoo-style bundle of its own, checked on the phantom of its modality: its objects
    pass, and a label neither the site nor SNOMED CT codes is named in a warning."""
    from dicomnode.testing.bundles import write_zoo_bundle
    from tests.unit.test_bundle_model import zoo_inference

    bundle = write_zoo_bundle(
        tmp_path / "bundle", zoo_inference(None), channels={"0": "background", "1": "widget"}
    )
    config = tmp_path / "node.toml"
    config.write_text(f'[models.bundles]\nzoo_widget = "{bundle}"\n')
    result = cli("models", "check", "zoo_widget", "--config", str(config), env=_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: label 'widget' has no code" in result.stdout
    assert "ok zoo_widget: 4 of 4 object(s) valid" in result.stdout
