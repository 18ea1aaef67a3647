"""deploy/: the compose file passes ``docker compose config``, the systemd units pass
``systemd-analyze verify``, the Kubernetes manifests are whole, and every command they run is
one the ``dicomnode`` CLI accepts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: the compose file's receivers: two `serve`s on one database and one spool
RECEIVERS = ("receiver-a", "receiver-b")


def _compose_command() -> list[str]:
    """Docker's compose plugin, else docker-compose 1.29 from scripts/setup.sh's venv."""
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return [docker, "compose"]
    legacy = REPO / ".venv-compose" / "bin" / "docker-compose"
    if legacy.exists():
        return [str(legacy)]
    pytest.fail("neither `docker compose` nor .venv-compose/bin/docker-compose (scripts/setup.sh)")


def _accepted_by_cli(args: list[str]) -> None:
    """The arguments parse with the real CLI (argparse exits 2 on anything unknown)."""
    probe = (
        "import sys; from dicomnode import cli; parser = cli.build_parser(); "
        "parser.parse_args(sys.argv[1:])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"dicomnode {' '.join(args)}: {result.stderr}"


def _mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a volume as `compose config` writes it: "src:dst[:mode]" (compose
    1.29) or a mapping (the compose plugin)."""
    if isinstance(volume, str):
        source, target = volume.split(":")[:2]
        return source, target
    return str(volume["source"]), str(volume["target"])


def test_compose_file_is_accepted_by_docker_compose_config() -> None:
    result = subprocess.run(
        [*_compose_command(), "-f", str(DEPLOY / "compose.yaml"), "--env-file",
         str(DEPLOY / "env.example"), "config"],
        capture_output=True, text=True, check=False, cwd=DEPLOY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert set(RECEIVERS) | {"worker-gpu0", "postgres", "orthanc"} <= set(services)
    gpu = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["device_ids"] == ["0"]
    for name in (*RECEIVERS, "worker-gpu0"):
        _accepted_by_cli(services[name]["command"])
        env = services[name]["environment"]
        assert env["DICOMNODE_NODE__DATABASE_URL"].startswith("postgresql+psycopg://")
        # one spool for all: every receiver and worker mounts the same volume at the same path
        mounts = [_mount(volume) for volume in services[name]["volumes"]]
        assert ("spool", env["DICOMNODE_NODE__STORAGE_DIR"]) in mounts
    # each receiver its own id (its in-transit files, its associations) and its own host port
    ids = [services[name]["environment"]["DICOMNODE_NODE__RECEIVER_ID"] for name in RECEIVERS]
    assert ids == list(RECEIVERS)
    published = [
        _port(port)
        for name in RECEIVERS
        for port in services[name]["ports"]
        if int(_port(port)[2]) == 11112
    ]
    assert len({host for _, host, _ in published}) == len(RECEIVERS) == len(published)
    # the HTTP ports (API, dashboard, Orthanc's explorer) on loopback only, unless told
    http = [_port(p) for name in (*RECEIVERS, "orthanc") for p in services[name]["ports"]]
    http = [p for p in http if int(p[2]) in (8080, 8042)]
    assert len(http) == len(RECEIVERS) + 1 and {ip for ip, _, _ in http} == {"127.0.0.1"}


def _port(port: Any) -> tuple[str, str, str]:
    """(host ip, published, target) of a port as `compose config` writes it: a mapping (the
    compose plugin, compose 1.29 without an ip) or "ip:published:target/tcp" (compose 1.29)."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port["published"]), str(port["target"])
    ip, published, target = str(port).split("/")[0].rsplit(":", 2)
    return ip, published, target


@pytest.mark.parametrize("receiver", RECEIVERS)
def test_compose_environment_builds_valid_settings(
    receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each receiver's environment in the compose file, with the example config, loads."""
    config = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = {**config["x-node"]["environment"], **config["services"][receiver]["environment"]}
    for key, value in env.items():
        if key == "DICOMNODE_CONFIG":
            value = str(DEPLOY / "dicomnode.example.toml")
        value = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "secret", str(value))
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.node.database_url.startswith("postgresql+psycopg://dicomnode:secret@")
    assert settings.workers == ()
    assert settings.node.receiver_id == receiver


def _executables(unit: str) -> list[list[str]]:
    return [
        shlex.split(line.split("=", 1)[1])
        for line in unit.splitlines()
        if line.startswith("ExecStart=")
    ]


@pytest.mark.parametrize("name", ["dicomnode.service", "dicomnode-worker@.service"])
def test_systemd_units_verify(name: str, tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / name).read_text()
    for command in _executables(unit):
        assert command[0] == "/opt/dicomnode/bin/dicomnode"
        _accepted_by_cli([arg.replace("%i", "0") for arg in command[1:]])
    # verify with the venv's dicomnode in place of the install path, which this machine lacks
    installed = Path(sys.executable).with_name("dicomnode")
    target = tmp_path / name.replace("@.", "@0.")
    target.write_text(unit.replace("/opt/dicomnode/bin/dicomnode", str(installed)))
    result = subprocess.run([verify, "verify", str(target)], capture_output=True, text=True)
    assert result.returncode == 0 and target.name not in result.stderr, result.stderr


def _manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def test_kubernetes_manifests_are_whole() -> None:
    documents = _manifests()
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    assert ("StatefulSet", "dicomnode") in kinds and ("Deployment", "dicomnode-worker") in kinds
    claims = {name for kind, name in kinds if kind == "PersistentVolumeClaim"}
    for doc in documents:
        assert doc["apiVersion"] and doc["metadata"]["labels"]["app.kubernetes.io/name"]
        if doc["kind"] not in ("StatefulSet", "Deployment"):
            continue
        template = doc["spec"]["template"]
        assert template["metadata"]["labels"] == doc["spec"]["selector"]["matchLabels"]
        pod = template["spec"]
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in pod["containers"]:
            _accepted_by_cli(container["args"])
            mounts = {m["name"] for m in container["volumeMounts"]}
            assert mounts <= {v["name"] for v in pod["volumes"]}
    worker = next(d for d in documents if d["kind"] == "Deployment")
    limits = worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1  # one GPU reserved per worker
    spool = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    assert spool["spec"]["accessModes"] == ["ReadWriteMany"]  # shared by receivers and workers


def test_kubernetes_receivers_scale_behind_one_service() -> None:
    """The receiver is a StatefulSet of several replicas, each named by its pod (its receiver
    id, stable across restarts), behind one DICOM Service."""
    documents = _manifests()
    receiver = next(d for d in documents if d["kind"] == "StatefulSet")
    assert receiver["spec"]["replicas"] > 1
    (container,) = receiver["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    source = env["DICOMNODE_NODE__RECEIVER_ID"]["valueFrom"]["fieldRef"]
    assert source["fieldPath"] == "metadata.name"
    services = [d for d in documents if d["kind"] == "Service"]
    pods = receiver["spec"]["template"]["metadata"]["labels"]
    # the governing Service the StatefulSet names exists, headless (a DNS name per pod)
    governing = next(
        s for s in services if s["metadata"]["name"] == receiver["spec"]["serviceName"]
    )
    assert governing["spec"]["clusterIP"] == "None"
    # one load-balanced Service sends DICOM to every replica
    dicom = [
        s for s in services
        if s["spec"].get("clusterIP") != "None"
        and any(p["port"] == 11112 for p in s["spec"]["ports"])
    ]  # fmt: skip
    assert len(dicom) == 1
    assert dicom[0]["spec"]["selector"].items() <= pods.items()


def test_every_process_has_a_memory_limit() -> None:
    """Issue 16: compose, systemd and Kubernetes cap each process's memory, and systemd leaves
    the serve running when the kernel kills one of its worker processes for it."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in (*RECEIVERS, "worker-gpu0"):  # YAML's merge keys give each its anchors' keys
        assert re.fullmatch(r"\d+[mg]", str(compose["services"][name].get("mem_limit"))), name
    units = {name: (DEPLOY / "systemd" / name).read_text()
             for name in ("dicomnode.service", "dicomnode-worker@.service")}  # fmt: skip
    for name, unit in units.items():
        assert re.search(r"^MemoryMax=\d+[MG]$", unit, re.MULTILINE), name
    assert "\nOOMPolicy=continue\n" in units["dicomnode.service"]
    for doc in _manifests():
        if doc["kind"] in ("StatefulSet", "Deployment"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["resources"]["limits"]["memory"], doc["metadata"]["name"]


def test_the_alert_rules_name_only_metrics_the_node_exports() -> None:
    """deploy/prometheus/alerts.yml: every dicomnode_model_* series it reads is one of the drift
    collector's, and each rule has an expression (promtool is not installed here)."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from dicomnode.api import drift

    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    listed = [rule for group in rules["groups"] for rule in group["rules"]]
    assert listed and all(rule["expr"].strip() for rule in listed)
    assert {rule["alert"] for rule in listed if "alert" in rule} >= {
        "DicomnodePositiveRateShift",
        "DicomnodeOutOfEnvelope",
    }
    figures = drift.JobFigures(positive=True, confidence=0.5, indeterminate=0,
                               out_of_envelope=False)  # fmt: skip
    seen = [drift._Seen(datetime.now(UTC), "m", "s", figures, 1.0)]
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self) -> Any:
            return drift._families(seen, {})

    registry.register(Fixed())  # type: ignore[arg-type]
    exported = set(re.findall(r"^(dicomnode_model_\w+?)(?:\{| )", generate_latest(registry)
                              .decode(), re.MULTILINE))  # fmt: skip
    used = set(re.findall(r"dicomnode_model_\w+", "\n".join(r["expr"] for r in listed)))
    assert used and used <= exported, used - exported
