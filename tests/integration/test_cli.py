"""The command line: send (to dcmtk's storescp and to the node), studies list, db upgrade."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnode.app import Node
from dicomnode.cli import main
from dicomnode.db.migrate import head_revision
from dicomnode.phantoms.simple import SeriesSpec, ct_slices
from dicomnode.phantoms.writer import write_series
from dicomnode.testing import peers
from dicomnode.testing.process import cli, node_env
from tests.helpers import assert_same_dataset, instance_count, port_of


def test_send_to_storescp_as_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_series(ct_slices(SeriesSpec(slices=5, seed=31)), tmp_path / "ct")
    sources = [
        *files,
        Path(get_testdata_file("JPEG2000.dcm")),
        Path(get_testdata_file("MR_small_bigendian.dcm")),
    ]
    with peers.storescp(tmp_path / "pacs") as port:
        code = main(["send", *map(str, sources), "--to", f"STORESCP@127.0.0.1:{port}", "--json"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["status"] for line in lines] == ["0x0000"] * len(sources)
    received = {dcmread(p).SOPInstanceUID: p for p in (tmp_path / "pacs").iterdir()}
    for source in sources:
        assert_same_dataset(source, received[dcmread(source).SOPInstanceUID])


def test_send_folder_to_node_and_list_studies(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_series(ct_slices(SeriesSpec(slices=4, seed=32)), tmp_path / "ct")
    assert main(["send", str(tmp_path / "ct"), "--to", f"DICOMNODE@127.0.0.1:{port_of(node)}"]) == 0
    assert instance_count(node) == 4
    capsys.readouterr()

    env = node_env(node.settings.node.storage_dir, port_of(node))
    listing = json.loads(cli("studies", "list", "--json", env=env).stdout)
    assert [(s["instance_count"], s["modalities"]) for s in listing] == [(4, ["CT"])]
    table = cli("studies", "list", env=env).stdout
    assert listing[0]["study_instance_uid"] in table and "CT" in table


def test_send_reports_refusals_and_unreachable_peers(
    node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes())
    assert main(["send", str(truncated), "--to", f"DICOMNODE@127.0.0.1:{port_of(node)}"]) == 1
    assert "0xC001" in capsys.readouterr().out
    port = peers.free_port()
    assert main(["send", str(truncated), "--to", f"NOBODY@127.0.0.1:{port}"]) == 2
    assert "refused or did not answer" in capsys.readouterr().err


def test_bad_destination_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "x.dcm", "--to", "no-port-here"]) == 2
    assert "'no-port-here' is not of the form AET@HOST:PORT" in capsys.readouterr().err


def test_db_upgrade_then_serve_needs_no_migration(tmp_path: Path) -> None:
    env = node_env(tmp_path / "var", peers.free_port(), auto_migrate="false")
    listing = cli("studies", "list", env=env)
    assert listing.returncode == 2 and "dicomnode db upgrade" in listing.stderr
    upgraded = cli("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"revision {head_revision()}" in upgraded.stdout
    assert cli("studies", "list", "--json", env=env).stdout.strip() == "[]"


def test_config_file_errors_name_the_value(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nduplicate_policy = "merge"\n')
    result = cli("studies", "list", "--config", str(config), env=node_env(tmp_path, 1))
    assert result.returncode == 2
    assert "node.duplicate_policy" in result.stderr and "'merge'" in result.stderr
