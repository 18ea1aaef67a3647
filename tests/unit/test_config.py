from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicomnode.config import DuplicatePolicy, load_settings
from dicomnode.errors import ConfigError


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    settings = load_settings()
    assert (settings.node.ae_title, settings.node.port) == ("DICOMNODE", 11112)
    assert settings.node.storage_dir == Path("var")
    assert settings.node.resolved_database_url.startswith("sqlite:///")
    assert settings.node.duplicate_policy is DuplicatePolicy.KEEP_FIRST
    assert settings.api.port == 8080


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nae_title = "FROMFILE"\nport = 104\n[security]\nallowed_hosts = ["10.0.0.0/8"]\n'
    )
    monkeypatch.setenv("DICOMNODE_NODE__PORT", "11113")
    monkeypatch.setenv("DICOMNODE_SECURITY__ALLOWED_CALLING_AETS", '["CT1", "PACS"]')
    settings = load_settings(config)
    assert settings.node.ae_title == "FROMFILE"  # from the file
    assert settings.node.port == 11113  # the environment wins
    assert settings.security.allowed_calling_aets == ("CT1", "PACS")
    assert settings.security.allowed_hosts == ("10.0.0.0/8",)


def test_config_env_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nae_title = "VIAENV"\n')
    monkeypatch.setenv("DICOMNODE_CONFIG", str(config))
    assert load_settings().node.ae_title == "VIAENV"


@pytest.mark.parametrize(
    "text,named",
    [
        ("[node]\nport = 70000\n", "node.port"),
        ('[node]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "MUCH_TOO_LONG_AE_TITLE"),
        ('[node]\nduplicate_policy = "merge"\n', "'merge'"),
        ('[security]\nallowed_hosts = ["pacs.example"]\n', "pacs.example"),
        ("[security.tls]\nenabled = true\n", "tls.cert"),
        ("[unknown]\nx = 1\n", "unknown"),
        ("[node\n", "not valid TOML"),
        ('[node]\nreceiver_id = "../spool"\n', "'../spool'"),
        ('[node]\nreceiver_id = ""\n', "receiver_id ''"),
        (f'[node]\nreceiver_id = "{"r" * 65}"\n', "r" * 65),
        (f'[node]\nreceiver_id = "{"r" * 63}"\nprocesses = 2\n', "r" * 63 + "-1"),
        ("[node]\nprocesses = 0\n", "node.processes"),
        ('[[sources]]\nname = "pacs"\n', "needs exactly one of ae_title/host/port, url"),
        ('[[sources]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\n', "together"),
        ('[[sources]]\nname = "p"\nurl = "ftp://x"\n', "'ftp://x' is not http(s)://"),
        ('[[sources]]\nname = "p"\nurl = "http://x"\nretrieve = "push"\n', "'move' or 'get'"),
        (
            '[[sources]]\nname = "p"\nurl = "http://x"\n[[sources]]\nname = "p"\nurl = "http://y"'
            "\n",
            "source names must be unique; repeated: ['p']",
        ),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\npriors = { source = "old" }\n',
            "takes priors from 'old', which no [[sources]] names",
        ),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\npriors = { match = { Modaliti = "CT" } }\n',
            "'Modaliti' is not a DICOM keyword",
        ),
        (
            '[[routes]]\nname = "r"\nmodel = "m"\nlevel = "study"\npriors = { count = 1 }\n',
            "priors are given to series-level routes only",
        ),
        ('[[routes]]\nname = "r"\nmodel = "m"\npriors = { count = 0 }\n', "priors.count"),
    ],
)
def test_bad_config_is_refused_naming_the_value(tmp_path: Path, text: str, named: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert named in str(raised.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")


def test_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "deploy" / "dicomnode.example.toml"
    settings = load_settings(example)
    assert [route.name for route in settings.routes] == ["chest-ct", "brain-mri", "retina"]
    brain = settings.routes[1]
    assert brain.level == "study" and list(brain.completion.required_series) == [
        "T1c", "T1", "T2", "FLAIR"]  # fmt: skip
    assert [n.name for n in settings.notifications] == ["ris", "fhir", "on-call"]
    assert [bool(route.critical) for route in settings.routes] == [True, True, True]


def test_fallback_must_name_a_route(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[routing]\nfallback = "nowhere"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert "'nowhere' names no route" in str(raised.value) and "{" not in str(raised.value)


def test_embedded_defaults_route_each_demo_model() -> None:
    import tomllib

    from dicomnode.config import BRAIN_SEQUENCES, Settings

    settings = Settings()
    assert {route.name: route.model for route in settings.routes} == {
        "chest-ct": "lung_nodule",
        "brain-mri": "brain_tumor",
        "retina": "oct_grading",
    }
    assert all(not route.destinations for route in settings.routes)  # no PACS known yet
    # the brain route's sequences are the model's and the example config's, word for word
    repo = Path(__file__).resolve().parents[2]
    model = tomllib.loads((repo / "models/brain_tumor/model.toml").read_text())
    assert model["accepts"]["inputs"] == BRAIN_SEQUENCES
    example = tomllib.loads((repo / "deploy/dicomnode.example.toml").read_text())
    (brain,) = [route for route in example["routes"] if route["name"] == "brain-mri"]
    assert brain["completion"]["required_series"] == BRAIN_SEQUENCES


def test_receiver_id_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "ct-gw.radiology.example")
    node = load_settings().node
    assert (node.receiver_id, node.processes) == ("ct-gw.radiology.example", 1)
    assert node.process_receiver_id(0) == "ct-gw.radiology.example"
    assert node.process_receiver_id(2) == "ct-gw.radiology.example-2"


def test_receiver_id_from_a_host_name_is_made_a_safe_folder_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "-odd/host name" + "x" * 80)
    node = load_settings().node
    assert node.receiver_id.startswith("odd-host-namex") and len(node.receiver_id) <= 56


def test_receiver_id_and_processes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    monkeypatch.setenv("DICOMNODE_NODE__RECEIVER_ID", "recv-a")
    monkeypatch.setenv("DICOMNODE_NODE__PROCESSES", "3")
    node = load_settings().node
    assert (node.receiver_id, node.processes) == ("recv-a", 3)
