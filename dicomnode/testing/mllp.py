"""A RIS's HL7 listener for tests and benchmarks: a real MLLP server on a free loopback port.

Each message it receives (a block framed VT ... FS CR) is parsed with hl7apy and validated
strictly against its HL7 v2.5 structure, kept with its arrival time, and answered as the
listener is told, message by message (``script``), then by ``behaviour``:

- ``"ack"``: ACK with MSA-1 ``AA`` (a message that is not valid HL7 gets ``AR``);
- ``"nak"``: ACK with MSA-1 ``AE`` and a reason, as a RIS that cannot file the result;
- ``"hang"``: no answer; the connection is held open until the listener stops.

A message whose control id (MSH-10) was accepted before is acknowledged again but counted as a
duplicate, as a RIS that drops repeats does: :attr:`MllpListener.accepted` holds one message
per control id.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dicomnode.testing.peers import LOOPBACK

START, END = b"\x0b", b"\x1c\x0d"


@dataclass(frozen=True)
class Received:
    """One message as the listener got it."""

    text: str  # ER7, segments ended by CR
    message: Any  # the hl7apy Message (None when it did not parse)
    control_id: str
    answer: str  # "AA", "AE", "AR", or "" (no answer: hang)
    duplicate: bool
    at: float  # time.time() when its last byte arrived
    error: str = ""  # why it did not parse or validate

    def segments(self, name: str) -> list[str]:
        """The ER7 text of each segment called ``name``."""
        return [s for s in self.text.split("\r") if s.startswith(name + "|")]


def parse(text: str) -> Any:
    """An ORU (or any v2.5 message) parsed and validated strictly by hl7apy."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    message.validate()
    return message


def ack(text: str, code: str, reason: str = "") -> bytes:
    """The ACK of the message ``text`` with MSA-1 ``code`` (and MSA-3 ``reason``)."""
    fields = (text.split("\r")[0] + "|" * 12).split("|")
    control_id = fields[9]
    msh = "|".join(["MSH", "^~\\&", fields[4], fields[5], fields[2], fields[3],
                    time.strftime("%Y%m%d%H%M%S"), "", "ACK^R01^ACK", f"A{control_id}"[:20],
                    "P", "2.5"])  # fmt: skip
    msa = "|".join(["MSA", code, control_id, reason])
    return (msh + "\r" + msa + "\r").encode()


class MllpListener:
    """Start with ``with MllpListener() as ris:``; ``ris.port``, ``ris.received``."""

    def __init__(
        self, behaviour: str = "ack", *, script: Sequence[str] = (), reason: str = "not filed"
    ) -> None:
        if behaviour not in ("ack", "nak", "hang") or set(script) - {"ack", "nak", "hang"}:
            raise ValueError(f"behaviours are ack, nak, hang; got {behaviour!r}, {script!r}")
        self.behaviour = behaviour
        self.script = list(script)
        self.reason = reason
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server((LOOPBACK, 0))
        self.port = int(self._server.getsockname()[1])
        self._threads: list[threading.Thread] = []

    # -- what arrived ------------------------------------------------------------------------

    @property
    def accepted(self) -> dict[str, Received]:
        """One message per control id, the first acknowledged with AA."""
        with self._lock:
            first: dict[str, Received] = {}
            for r in self.received:
                if r.answer == "AA" and not r.duplicate:
                    first.setdefault(r.control_id, r)
            return first

    def duplicates(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.duplicate]

    # -- serving -----------------------------------------------------------------------------

    def __enter__(self) -> MllpListener:
        thread = threading.Thread(target=self._accept, name="mllp-accept", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _next_behaviour(self) -> str:
        with self._lock:
            return self.script.pop(0) if self.script else self.behaviour

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            for block in self._blocks(conn):
                arrived = time.time()
                text = block.decode("utf-8", errors="replace")
                behaviour = self._next_behaviour()
                message, error = None, ""
                try:
                    message = parse(text)
                except Exception as exc:  # the listener reports what a RIS would refuse
                    error = f"{type(exc).__name__}: {exc}"
                control_id = (text.split("\r")[0].split("|") + [""] * 10)[9]
                if behaviour == "hang":
                    answer = ""
                elif error:
                    answer = "AR"
                else:
                    answer = "AE" if behaviour == "nak" else "AA"
                with self._lock:
                    seen = any(r.control_id == control_id and r.answer == "AA"
                               for r in self.received)  # fmt: skip
                    self.received.append(
                        Received(
                            text,
                            message,
                            control_id,
                            answer,
                            seen and answer == "AA",
                            arrived,
                            error,
                        )
                    )
                if not answer:
                    self._stop.wait()  # hold the connection, silent, until the listener stops
                    return
                reason = error[:200] if answer == "AR" else self.reason if answer == "AE" else ""
                try:
                    conn.sendall(START + ack(text, answer, reason.replace("|", " ")) + END)
                except OSError:
                    return

    def _blocks(self, conn: socket.socket) -> Iterator[bytes]:
        buffer = b""
        conn.settimeout(0.5)
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while END in buffer:
                block, buffer = buffer.split(END, 1)
                yield block[block.find(START) + 1 :]
