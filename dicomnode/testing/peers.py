"""Real DICOM peers for tests and benchmarks: dcmtk tools on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from dicomnode.testing.waiting import wait_until

LOOPBACK = "127.0.0.1"

#: storescu proposes only uncompressed syntaxes unless told which one to add.
STORESCU_SYNTAX_OPTION = {
    "1.2.840.10008.1.2": "-xi",  # implicit VR little endian
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
}


#: Set to 1 (as .ci/run does) to make a test whose real peer is missing fail instead of skip.
REQUIRE_PEERS_ENV = "DICOMNODE_REQUIRE_PEERS"


def peers_required() -> bool:
    """Whether every real peer a test needs must be there (CI), rather than skipped without."""
    return os.environ.get(REQUIRE_PEERS_ENV) == "1"


def missing_peer(reason: str) -> NoReturn:
    """End a test whose real peer (a tool, a server, a browser) is missing: a skip with
    ``reason``, or a failure where $DICOMNODE_REQUIRE_PEERS=1, so that CI cannot pass without
    having run it."""
    import pytest

    if peers_required():
        pytest.fail(f"{reason}, and {REQUIRE_PEERS_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """dcmtk waits on delayed ACKs unless told to set TCP_NODELAY."""
    return {**os.environ, "TCP_NODELAY": "1"}


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"{tool} is not installed (Debian package dcmtk); run scripts/setup.sh")
    return path


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    called_aet: str = "DICOMNODE",
    calling_aet: str = "STORESCU",
    transfer_syntax: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Send files in one association with dcmtk's storescu.

    ``transfer_syntax`` (the files' own) makes storescu propose it, so they travel as stored.
    """
    syntax = [STORESCU_SYNTAX_OPTION[transfer_syntax]] if transfer_syntax else []
    command = [
        require("storescu"), "-aet", calling_aet, "-aec", called_aet, "--required",
        *syntax, *extra, LOOPBACK, str(port), *map(str, files),
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False
    )


def echoscu(
    port: int,
    *,
    called_aet: str = "DICOMNODE",
    calling_aet: str = "ECHOSCU",
    extra: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    command = [
        require("echoscu"),
        "-aet",
        calling_aet,
        "-aec",
        called_aet,
        *extra,
        LOOPBACK,
        str(port),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False
    )


def wait_for_port(port: int, timeout: float = 30.0, host: str = LOOPBACK) -> None:
    """Until something accepts connections on ``host:port`` (WaitTimeout after ``timeout`` s)."""

    def accepts() -> bool:
        with socket.create_connection((host, port), timeout=1):
            return True

    wait_until(accepts, timeout=timeout, ignore=OSError, what=f"a listener on {host}:{port}")


@contextmanager
def storescp(folder: Path, *, ae_title: str = "STORESCP", fork: bool = False) -> Iterator[int]:
    """dcmtk's storescp writing into ``folder``; yields its port. ``fork``: a child process per
    association, so several senders are served at once."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            require("storescp"),
            "--aetitle",
            ae_title,
            "--output-directory",
            str(folder),
            "+xa",
            *(["--fork"] if fork else []),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
        start_new_session=True,  # its own process group: the forked children end with it
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
