"""What the API's routes read from: the settings, the database, the queue, the workers."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import ConfigError

if TYPE_CHECKING:
    from dicomnode.config import ApiSettings, Settings
    from dicomnode.queue.repository import JobRepository
    from dicomnode.queue.worker import Worker

#: The name ``[api] token`` is audited under (``token:admin``).
DEFAULT_TOKEN_NAME = "admin"


@dataclass(frozen=True)
class ApiContext:
    """The node's parts the API serves; one per application."""

    settings: Settings
    sessions: sessionmaker[Session]
    jobs: JobRepository
    #: the workers embedded in this process (``serve``), for /api/health
    workers: tuple[Worker, ...] = ()
    #: the job models without a package this node runs (the tests' echo), for /api/models
    builtin_models: tuple[str, ...] = ()
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def tokens(self) -> dict[str, str]:
        return api_tokens(self.settings.api)


def api_tokens(api: ApiSettings) -> dict[str, str]:
    """Bearer secrets by name: ``[api] tokens`` plus ``[api] token`` as ``admin``."""
    tokens = {name: secret for name, secret in api.tokens.items() if secret}
    if api.token:
        tokens.setdefault(DEFAULT_TOKEN_NAME, api.token)
    return tokens


def check_exposure(api: ApiSettings) -> None:
    """An API without a token may listen on loopback only: ConfigError otherwise, at start."""
    if api_tokens(api) or is_loopback(api.host):
        return
    raise ConfigError(
        f"[api] host {api.host!r} is not a loopback address and no token is configured: "
        "set [api] token (or DICOMNODE_API__TOKEN) or [api] tokens, or listen on 127.0.0.1"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Memo:
    """The last value of an expensive read, reused for ``ttl_s`` seconds (per process).

    For the reads that scan the jobs table (throughput, the stage-duration histograms): a
    dashboard polling every few seconds, or several Prometheus servers, then cost one scan per
    period, whatever their number.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, Any]] = {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self._lock:  # one computation at a time; the others wait for its value
            found = self._values.get(key)
            if found is not None and time.monotonic() - found[0] < self.ttl_s:
                return found[1]
            value = compute()
            self._values[key] = (time.monotonic(), value)
            return value
