"""HTTP peers of the notifications for tests and benchmarks, real servers on free loopback ports:

- :class:`WebhookReceiver` takes JSON POSTs, answering with the statuses it is given in turn
  (``statuses=[500, 200]``: the first request fails, the next succeeds), then 200;
- :class:`FhirServer` takes FHIR transaction Bundles at its base URL, validates each with
  fhir.resources (a Bundle that is not valid R4 gets 400 with an OperationOutcome), checks the
  bearer token, files each entry under a new id unless its ``ifNoneExist`` identifier is
  filed already (then it answers 200 with the existing one), and answers a
  transaction-response Bundle.

Both keep every request with its arrival time, and count the deliveries they took once per
``Idempotency-Key`` (a repeat is a duplicate, as a receiver that deduplicates sees it).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dicomnode.testing.peers import LOOPBACK


@dataclass(frozen=True)
class Request:
    """One POST as the peer got it."""

    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON (None when it was not JSON)
    status: int  # what the peer answered
    at: float  # time.time() when it arrived whole

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")


@dataclass
class _Peer:
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def taken(self) -> dict[str, Request]:
        """One request per Idempotency-Key, the first answered 2xx."""
        with self.lock:
            first: dict[str, Request] = {}
            for r in self.requests:
                if 200 <= r.status < 300:
                    first.setdefault(r.key, r)
            return first

    def duplicates(self) -> list[Request]:
        """Requests answered 2xx whose key an earlier 2xx answer had taken."""
        with self.lock:
            seen: set[str] = set()
            repeats = []
            for r in self.requests:
                if 200 <= r.status < 300:
                    if r.key in seen:
                        repeats.append(r)
                    seen.add(r.key)
            return repeats


class _Server:
    """A ThreadingHTTPServer in a daemon thread; subclasses answer POSTs."""

    def __init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, answer = owner.answer(self.path, headers, body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.content_type = "application/json"
        self._http = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._http.daemon_threads = True
        self.port = int(self._http.server_address[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def __enter__(self) -> _Server:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


class WebhookReceiver(_Server):
    """``with WebhookReceiver(statuses=[500]) as hook:``; ``hook.url``, ``hook.peer``."""

    def __init__(self, statuses: list[int] | None = None, *, delay_s: float = 0.0) -> None:
        super().__init__()
        self.statuses = list(statuses or [])
        self.delay_s = delay_s
        self.peer = _Peer()

    def __enter__(self) -> WebhookReceiver:
        super().__enter__()
        return self

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        arrived = time.time()
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow receiver, as a test of timeouts needs one
        with self.peer.lock:
            status = self.statuses.pop(0) if self.statuses else 200
            self.peer.requests.append(Request(path, headers, body, status, arrived))
        return status, {"ok": status < 300}


class FhirServer(_Server):
    """``with FhirServer(token="t") as fhir:``; ``fhir.url`` (the base), ``fhir.resources``."""

    def __init__(self, *, token: str = "", statuses: list[int] | None = None) -> None:
        super().__init__()
        self.content_type = "application/fhir+json"
        self.token = token
        self.statuses = list(statuses or [])
        self.peer = _Peer()
        #: resource type -> id -> the resource as filed
        self.resources: dict[str, dict[str, dict[str, Any]]] = {}
        self._identifiers: dict[str, str] = {}  # "system|value" -> "Type/id"
        self._next_id = 1

    def __enter__(self) -> FhirServer:
        super().__enter__()
        return self

    def answer(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        arrived = time.time()
        status, answer = self._file(headers, body)
        with self.peer.lock:
            self.peer.requests.append(Request(path, headers, body, status, arrived))
        return status, answer

    def _file(self, headers: dict[str, str], body: Any) -> tuple[int, Any]:
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            return 401, outcome("security", "bearer token missing or wrong")
        with self.peer.lock:
            if self.statuses:
                status = self.statuses.pop(0)
                return status, outcome("transient", f"told to answer {status}")
        from fhir.resources.R4B.bundle import Bundle
        from pydantic import ValidationError

        try:
            Bundle.model_validate(body)
        except (ValidationError, TypeError) as exc:
            return 400, outcome("structure", f"not a valid R4 Bundle: {exc}")
        if body.get("type") != "transaction":
            return 400, outcome("structure", "only transaction Bundles are taken")
        answers = []
        with self.peer.lock:
            for entry in body.get("entry") or ():
                resource, request = entry["resource"], entry["request"]
                condition = str(request.get("ifNoneExist", "")).removeprefix("identifier=")
                if condition and condition in self._identifiers:
                    answers.append(
                        {"response": {"status": "200 OK", "location": self._identifiers[condition]}}
                    )
                    continue  # fmt: skip
                kind = resource["resourceType"]
                filed = {**resource, "id": str(self._next_id)}
                self._next_id += 1
                self.resources.setdefault(kind, {})[filed["id"]] = filed
                location = f"{kind}/{filed['id']}"
                if condition:
                    self._identifiers[condition] = location
                answers.append({"response": {"status": "201 Created", "location": location}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}

    def reports(self) -> list[dict[str, Any]]:
        with self.peer.lock:
            return list(self.resources.get("DiagnosticReport", {}).values())

    def observations(self) -> list[dict[str, Any]]:
        with self.peer.lock:
            return list(self.resources.get("Observation", {}).values())


def outcome(code: str, text: str) -> dict[str, Any]:
    """A FHIR OperationOutcome with one error."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text[:500]}]}  # fmt: skip
