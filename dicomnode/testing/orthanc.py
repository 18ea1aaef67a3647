"""Orthanc as a real PACS peer for tests and benchmarks, on free loopback ports.

``with orthanc(folder) as pacs:`` starts Orthanc (Debian ``orthanc``) with its storage and index
in ``folder``, optionally with the DICOMweb plugin (STOW-RS at :attr:`Orthanc.dicomweb_url`), and
waits until both its DICOM port answers C-ECHO and its REST API answers. :meth:`Orthanc.stop` and
:meth:`Orthanc.start` take it away and bring it back on the same ports and storage (an outage).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from dicomnode.testing.peers import LOOPBACK, dcmtk_env, echoscu, free_port
from dicomnode.testing.waiting import WaitTimeout, wait_until

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
STARTUP_TIMEOUT_S = 60.0


class OrthancError(RuntimeError):
    """Orthanc is not installed, did not start, or its REST API failed."""


class Orthanc:
    """One Orthanc server; its ports and storage stay the same across stop and start."""

    def __init__(
        self,
        root: Path,
        *,
        ae_title: str = "ORTHANC",
        dicomweb: bool = False,
        dicom_port: int | None = None,
        http_port: int | None = None,
        sync_storage: bool = True,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        lua_scripts: Sequence[Path] = (),
    ) -> None:
        if shutil.which(ORTHANC) is None:
            raise OrthancError(f"{ORTHANC} is not installed (Debian package orthanc)")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            raise OrthancError(f"{DICOMWEB_PLUGIN} is missing (Debian package orthanc-dicomweb)")
        self.root = root
        self.ae_title = ae_title
        self.dicomweb = dicomweb
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.sync_storage = sync_storage
        #: peers Orthanc may send to: name -> (AE title, host, port), as its DicomModalities
        self.modalities = dict(modalities or {})
        #: Lua scripts it runs (e.g. deploy/orthanc/autoroute.lua, forwarding to a modality)
        self.lua_scripts = tuple(lua_scripts)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS: POST ``{dicomweb_url}/studies``)."""
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self) -> dict[str, Any]:
        """Orthanc's configuration: loopback only, no authentication, files fsynced."""
        config: dict[str, Any] = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "LuaScripts": [str(Path(path).resolve()) for path in self.lua_scripts],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # HTTP from localhost only (1.10 has no bind address)
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "UnknownSopClassAccepted": False,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "OrthancPeers": {},
            "SyncStorageArea": self.sync_storage,
            "OverwriteInstances": False,  # a second copy of a SOP Instance UID is ignored
            "SaveJobs": False,
            "TcpNoDelay": True,
        }
        if self.dicomweb:
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                # OHIF reads the whole series metadata (WADO-RS /metadata): all of it, from the
                # files, rather than the tags kept in the index
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
                "EnableMetadataCache": True,
            }
        return config

    def start(self) -> Orthanc:
        """Start (again) and wait until DICOM and REST answer."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [ORTHANC, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
                cwd=self.root,
                start_new_session=True,  # its own process group, stopped as one
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self.process.returncode} while starting: {self._tail()}"
                )
            self.rest("/system", timeout=2)
            return echoscu(self.dicom_port, called_aet=self.ae_title, timeout=10).returncode == 0

        try:
            wait_until(
                answers,
                timeout=STARTUP_TIMEOUT_S,
                interval=0.1,
                ignore=(OSError, ValueError),
                what="Orthanc's REST API and C-ECHO",
            )
        except WaitTimeout as timeout:
            raise OrthancError(f"{timeout}\n{self._tail()}") from timeout

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM, then SIGKILL after 10 s (at once unless ``graceful``: a crash, or a server
        whose storage is thrown away). Storage and ports are kept for :meth:`start`."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def _tail(self, lines: int = 15) -> str:
        with suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    # -- REST --------------------------------------------------------------------------------

    def rest(self, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        """GET ``path`` (POST ``body`` as JSON when given) and return the decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data)
        with urllib.request.urlopen(request, timeout=timeout) as response:  # loopback only
            return json.loads(response.read())

    def source(self, name: str, retrieve: str = "move", **values: Any) -> dict[str, Any]:
        """A ``[[sources]]`` entry for this server: ``retrieve`` "move" or "get" (DIMSE) or
        "dicomweb" (QIDO-RS/WADO-RS; the server needs ``dicomweb``)."""
        if retrieve == "dicomweb":
            return {"name": name, "url": self.dicomweb_url, **values}
        return {"name": name, "ae_title": self.ae_title, "host": LOOPBACK,
                "port": self.dicom_port, "retrieve": retrieve, **values}  # fmt: skip

    def version(self) -> str:
        return str(self.rest("/system")["Version"])

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through the REST API (``POST /instances``); Orthanc's answer
        (its ``ID``, ``ParentStudy``, ``ParentSeries``, ``Status``)."""
        request = urllib.request.Request(
            self.url + "/instances",
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # loopback only
            answer = json.loads(response.read())
        if not isinstance(answer, dict) or "ID" not in answer:
            raise OrthancError(f"Orthanc did not store {path}: {answer}")
        return answer

    def instance_count(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.rest("/statistics")["CountInstances"])

    def instance_file(self, sop_instance_uid: str) -> bytes:
        """The DICOM file Orthanc stores for a SOP Instance UID (OrthancError when it has none)."""
        request = urllib.request.Request(
            self.url + "/tools/lookup", data=sop_instance_uid.encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # loopback only
            found = [item for item in json.loads(response.read()) if item["Type"] == "Instance"]
        if not found:
            raise OrthancError(f"Orthanc holds no instance {sop_instance_uid}")
        with urllib.request.urlopen(f"{self.url}/instances/{found[0]['ID']}/file", timeout=60) as r:
            return bytes(r.read())

    def study_instances(self, study_instance_uid: str) -> list[dict[str, str]]:
        """The instances Orthanc files under one study: each one's SOP Class UID, SOP Instance
        UID, Series Instance UID and Modality."""
        found = self.rest(
            "/tools/find",
            {"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}},
        )
        instances = []
        for study in found:
            for instance in self.rest(f"/studies/{study}/instances?expand"):
                tags = self.rest(f"/instances/{instance['ID']}/simplified-tags")
                instances.append(
                    {
                        "SOPClassUID": tags.get("SOPClassUID", ""),
                        "SOPInstanceUID": tags.get("SOPInstanceUID", ""),
                        "SeriesInstanceUID": tags.get("SeriesInstanceUID", ""),
                        "Modality": tags.get("Modality", ""),
                    }
                )
        return instances


@contextmanager
def orthanc(
    root: Path,
    *,
    ae_title: str = "ORTHANC",
    dicomweb: bool = False,
    sync_storage: bool = True,
    graceful_stop: bool = True,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    lua_scripts: Sequence[Path] = (),
) -> Iterator[Orthanc]:
    """A started Orthanc with its files under ``root``; stopped at the end (killed, when not
    ``graceful_stop``: faster, for storage that is thrown away)."""
    server = Orthanc(
        root,
        ae_title=ae_title,
        dicomweb=dicomweb,
        sync_storage=sync_storage,
        modalities=modalities,
        lua_scripts=lua_scripts,
    )
    try:
        yield server.start()
    finally:
        server.stop(graceful=graceful_stop)
