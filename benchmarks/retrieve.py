#!/usr/bin/env python3
"""Retrieve benchmark: a request for a study the PACS holds, to its results in the PACS, by
C-MOVE and by WADO-RS; beside the peers' own retrieve of the same study in the same run.

    .venv/bin/python -P benchmarks/retrieve.py [--runs 3] [--device cpu]

Orthanc (with its DICOMweb plugin) holds the demo chest CT (300 slices of 512x512, five
nodules). The node has Orthanc as its sources ``pacs`` (C-MOVE to the node's receiver) and
``pacs-web`` (QIDO-RS/WADO-RS) and as its destination; its chest route runs lung_nodule on the
CPU (loaded before timing) and sends SEG, SR, key images and KOS to Orthanc. Each run asks for
the study by accession number (``RequestRepository.submit``, as ``POST /api/requests`` does)
with the study purged from the node first, and measures from the ask:

- retrieved: the request's ``retrieved_at`` (accession resolved, series and instances listed,
  every instance in the spool and the index, fsynced);
- job started, finished (model and result objects), sent (every object acknowledged by
  Orthanc's C-STORE: the results are in the PACS).

The peers, same study, same Orthanc, same run: dcmtk's ``movescu`` asking Orthanc to C-MOVE
the study to dcmtk's ``storescp`` (start to exit; storescp writes the files, fsyncs nothing)
and to a second Orthanc (fresh, fsyncing each file and indexing it, as the node does); ``curl``
fetching the study by WADO-RS (one multipart body into a file) and the second Orthanc pulling
it by its DICOMweb client (``POST /dicom-web/servers/pacs/retrieve``, stored and indexed). The
like-for-like peer is the second Orthanc: it makes each instance durable before the next.
Prints a markdown report.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

from dicomnode.app import Node, build_node  # noqa: E402
from dicomnode.config import Settings  # noqa: E402
from dicomnode.domain import JobState, RequestState  # noqa: E402
from dicomnode.fetch.requests import RequestRepository, RequestSpec  # noqa: E402
from dicomnode.phantoms.demo import demo_studies  # noqa: E402
from dicomnode.retention import purge_studies  # noqa: E402
from dicomnode.testing.orthanc import Orthanc  # noqa: E402
from dicomnode.testing.peers import LOOPBACK, dcmtk_env, free_port, storescu  # noqa: E402
from dicomnode.testing.waiting import wait_until  # noqa: E402

PATHS = {"C-MOVE": "pacs", "WADO-RS": "pacs-web"}
#: each peer's retrieve, and the path of ours it stands beside
PEERS = {
    "movescu -> storescp (no fsync)": "C-MOVE",
    "movescu -> Orthanc (durable)": "C-MOVE",
    "curl, one multipart body": "WADO-RS",
    "Orthanc's DICOMweb client (durable)": "WADO-RS",
}
STAGES = ("retrieved", "started", "finished", "in PACS")
#: our retrieve at most this many times the peers'
TARGET = 2.0


def build(root: Path, pacs: Orthanc, device: str) -> Node:
    settings = Settings(
        node={"host": LOOPBACK, "port": 0, "storage_dir": root / "node", "min_free_disk_mb": 1,
              "retention_days": 0},
        api={"enabled": False},
        sources=[pacs.source("pacs", "move"), pacs.source("pacs-web", "dicomweb")],
        destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": LOOPBACK,
                       "port": pacs.dicom_port}],
        routes=[{"name": "chest-ct", "model": "lung_nodule", "destinations": ["pacs"],
                 "match": {"Modality": "CT", "slices": {"min": 50}}}],
        workers=[{"device": device, "models": ["lung_nodule"], "isolation": "thread"}],
    )  # fmt: skip
    node = build_node(settings)
    for worker in node.workers:
        worker.load_models()  # not timed
    return node


def ask(node: Node, source: str, accession: str, run: int) -> dict[str, float]:
    """One request, purged study first; seconds from the ask to each stage."""
    purge_studies(node.database.sessions, node.spool, datetime.now(UTC) + timedelta(seconds=1))
    requests = RequestRepository(node.database.sessions)
    t0 = time.time()
    record, _ = requests.submit(
        RequestSpec(source, accession_number=accession, route="chest-ct",
                    transaction_id=f"bench-{source}-{run}"),
        client="benchmark", max_attempts=1,
    )  # fmt: skip
    node.wake_requests()

    def ended() -> Any:
        current = requests.get(record.id)
        if current.state is RequestState.FAILED:
            raise RuntimeError(f"request failed: {current.error}")
        if current.state is not RequestState.DONE:
            return None
        return current

    done = wait_until(ended, timeout=600, interval=0.02, what="the request's jobs to end")
    [job] = [node.jobs.get(job_id) for job_id in done.job_ids]
    if job is None or job.state is not JobState.DONE or job.sent_at is None:
        raise RuntimeError(f"the job did not send its results: {job}")
    return {
        "retrieved": done.retrieved_at.timestamp() - t0,
        "started": job.started_at.timestamp() - t0,  # type: ignore[union-attr]
        "finished": job.finished_at.timestamp() - t0,  # type: ignore[union-attr]
        "in PACS": job.sent_at.timestamp() - t0,
        "predict": float((job.result or {}).get("timing_s", {}).get("predict", float("nan"))),
    }


class Puller(Orthanc):
    """The second Orthanc: a C-MOVE destination, and a DICOMweb client of the first."""

    def __init__(self, root: Path, source: Orthanc) -> None:
        super().__init__(root, ae_title="ORTHANCB", dicomweb=True, sync_storage=True)
        self.source_url = source.dicomweb_url

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["DicomWeb"]["Servers"] = {"pacs": [self.source_url]}
        return config

    def fresh(self) -> None:
        """Started again with empty storage (a stored instance would be skipped)."""
        self.stop(graceful=False)
        shutil.rmtree(self.root / "storage", ignore_errors=True)
        shutil.rmtree(self.root / "index", ignore_errors=True)
        self.start()


def movescu(pacs: Orthanc, study_uid: str, destination: str) -> float:
    """movescu: Orthanc C-MOVEs the study to ``destination``; start to exit 0, seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        ["movescu", "-S", "-aet", "MOVESCU", "-aec", pacs.ae_title, "-aem", destination,
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
         LOOPBACK, str(pacs.dicom_port)],
        env=dcmtk_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    took = time.perf_counter() - started
    if result.returncode != 0 or "Failed" in result.stderr:
        raise RuntimeError(
            f"movescu to {destination}: exit {result.returncode}: {result.stderr[-300:]}"
        )
    return took


def to_storescp(pacs: Orthanc, study_uid: str, port: int, folder: Path) -> float:
    """movescu, the study C-MOVEd to dcmtk's storescp (which fsyncs nothing); seconds."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    scp = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(folder), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _listening(port), timeout=10, what="storescp")
        took = movescu(pacs, study_uid, "STORESCP")
    finally:
        scp.terminate()
        scp.wait()
    if len(list(folder.iterdir())) != 300:
        raise RuntimeError(f"storescp got {len(list(folder.iterdir()))} files, not 300")
    return took


def to_orthanc(pacs: Orthanc, puller: Puller, study_uid: str, how: str) -> float:
    """The second Orthanc gets the study by C-MOVE or by its DICOMweb client; seconds."""
    puller.fresh()
    if how == "move":
        took = movescu(pacs, study_uid, puller.ae_title)
    else:
        started = time.perf_counter()
        puller.rest(
            "/dicom-web/servers/pacs/retrieve",
            {"Resources": [{"Study": study_uid}], "Synchronous": True},
            timeout=600,
        )
        took = time.perf_counter() - started
    if puller.instance_count() != 300:
        raise RuntimeError(f"the second Orthanc holds {puller.instance_count()} instances")
    return took


def curl_wado(pacs: Orthanc, study_uid: str, out: Path) -> float:
    """curl: the study by WADO-RS, every instance as stored, into one file; seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        ["curl", "-sS", "-f", "-o", str(out), "-H",
         'Accept: multipart/related; type="application/dicom"; transfer-syntax=*',
         f"{pacs.dicomweb_url}/studies/{study_uid}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    took = time.perf_counter() - started
    if result.returncode != 0 or out.stat().st_size < 150e6:
        raise RuntimeError(f"curl: exit {result.returncode}: {result.stderr[-300:]}")
    out.unlink()
    return took


def drop_results(pacs: Orthanc, study_uid: str) -> None:
    """Delete the result series a run sent to the PACS, so each retrieve is of the CT alone."""
    import urllib.request

    [study] = pacs.rest("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    for series in pacs.rest(f"/studies/{study}/series"):
        if series["MainDicomTags"].get("Modality") != "CT":
            request = urllib.request.Request(f"{pacs.url}/series/{series['ID']}", method="DELETE")
            urllib.request.urlopen(request, timeout=30).close()  # loopback only


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex((LOOPBACK, port)) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    began = time.monotonic()
    ours: dict[str, list[dict[str, float]]] = {name: [] for name in PATHS}
    peers: dict[str, list[float]] = {name: [] for name in PEERS}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        [study] = demo_studies(root / "study", ["chest"])
        accession = _accession(study.files[0])
        scp_port = free_port()
        pacs = Orthanc(root / "orthanc", dicomweb=True, sync_storage=False)
        puller = Puller(root / "orthanc-b", pacs)
        node = build(root, pacs, args.device)
        node.start()
        pacs.modalities = {
            "node": ("DICOMNODE", LOOPBACK, node.receiver.address[1]),
            "storescp": ("STORESCP", LOOPBACK, scp_port),
            "orthancb": (puller.ae_title, LOOPBACK, puller.dicom_port),
            "movescu": ("MOVESCU", LOOPBACK, 104),  # may ask for moves
        }
        pacs.start()
        try:
            if storescu(pacs.dicom_port, study.files, called_aet=pacs.ae_title).returncode:
                raise RuntimeError("storescu could not put the study in Orthanc")
            for run in range(args.runs):
                for name, source in PATHS.items():
                    timed = ask(node, source, accession, run)
                    drop_results(pacs, study.study_instance_uid)
                    ours[name].append(timed)
                    print(f"  run {run} {name}: retrieved {timed['retrieved']:.2f} s, "
                          f"in PACS {timed['in PACS']:.2f} s", file=sys.stderr)  # fmt: skip
                uid = study.study_instance_uid
                timed = {
                    "movescu -> storescp (no fsync)": to_storescp(pacs, uid, scp_port,
                                                                  root / "scp"),
                    "movescu -> Orthanc (durable)": to_orthanc(pacs, puller, uid, "move"),
                    "curl, one multipart body": curl_wado(pacs, uid, root / "w"),
                    "Orthanc's DICOMweb client (durable)": to_orthanc(pacs, puller, uid, "web"),
                }  # fmt: skip
                for name, seconds in timed.items():
                    peers[name].append(seconds)
                said = ", ".join(f"{k} {v:.2f} s" for k, v in timed.items())
                print(f"  run {run} peers: {said}", file=sys.stderr)
        finally:
            node.stop()
            pacs.stop(graceful=False)
            puller.stop(graceful=False)
    print(report(ours, peers, args, time.monotonic() - began))
    return 0


def report(
    ours: dict[str, list[dict[str, float]]],
    peers: dict[str, list[float]],
    args: argparse.Namespace,
    took: float,
) -> str:
    from importlib.metadata import version

    cpu = "?"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh
                    if line.startswith("model name")), "?")  # fmt: skip
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    lines = [
        "# Retrieve: request -> results in the PACS, 300-slice 512x512 chest CT in Orthanc", "",
        f"- code: dicomnode at {git or '?'}",
        f"- date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: nproc {len(os.sched_getaffinity(0))}, {cpu}, {platform.system()} "
        f"{platform.release()}; device {args.device}",
        f"- pynetdicom {version('pynetdicom')}, dicomweb-client {version('dicomweb-client')}, "
        "Orthanc 1.10.1 (its DICOMweb plugin), dcmtk movescu/storescp, curl",
        f"- command: `benchmarks/retrieve.py --runs {args.runs} --device {args.device}` "
        f"(took {took:.0f} s)", "",
        f"Seconds from the request, median of {args.runs} (min in brackets); each column is when "
        "that stage ended:", "",
        "| path | retrieved | job started | job finished | in PACS | of which model |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, runs in ours.items():
        cells = [f"{statistics.median(r[s] for r in runs):.2f} ({min(r[s] for r in runs):.2f})"
                 for s in STAGES]  # fmt: skip
        model = statistics.median(r["predict"] for r in runs)
        lines.append(f"| {name} | {' | '.join(cells)} | {model:.2f} |")
    lines += ["", "The retrieve against the peers' (same study, same Orthanc, same run):", "",
              "| path | ours: request -> all in the index | peer | peer s | ours / peer |",
              "|---|---:|---|---:|---:|"]  # fmt: skip
    for peer, name in PEERS.items():
        mine = statistics.median(r["retrieved"] for r in ours[name])
        theirs = statistics.median(peers[peer])
        ratio = mine / theirs
        target = ""
        if "durable" in peer:
            target = f" (target <= {TARGET:g}: {'met' if ratio <= TARGET else 'MISSED'})"
        lines.append(f"| {name} | {mine:.2f} | {peer} | {theirs:.2f} | {ratio:.2f}{target} |")
    return "\n".join(lines)


def _accession(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).AccessionNumber)


if __name__ == "__main__":
    raise SystemExit(main())
