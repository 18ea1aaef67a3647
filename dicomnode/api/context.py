"""What the API's routes read from: the settings, the database, the queue, the workers."""

from __future__ import annotations

import ipaddress
import logging
import re
import stat
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.errors import ConfigError

if TYPE_CHECKING:
    from dicomnode.config import ApiSettings, Settings
    from dicomnode.queue.repository import JobRepository
    from dicomnode.receive.stow import StowIngest

logger = logging.getLogger(__name__)

#: The name ``[api] token`` is audited under (``token:admin``).
DEFAULT_TOKEN_NAME = "admin"


#: Every scope a token may be given implies these (admin: all of them).
IMPLIED_SCOPES: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "phi": frozenset({"read", "phi"}),
    "operate": frozenset({"read", "operate"}),
    #: STOW-RS only: a sender's token reads nothing
    "store": frozenset({"store"}),
    "review": frozenset({"read", "review"}),
    "admin": frozenset({"read", "phi", "operate", "review", "store", "admin"}),
}
#: A token on a non-loopback host must be at least this long...
MIN_TOKEN_LENGTH = 24
#: ...have this many different characters, and be none of the examples of the docs and deploy/
MIN_TOKEN_CHARACTERS = 8
EXAMPLE_TOKENS = frozenset(
    {"change-me", "change-me-too", "changeme", "secret", "token", "password", "admin", "..."}
)
#: Host header names a loopback API always answers to (a rebound DNS name is none of them)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Credential:
    """A configured bearer token: its name (audited as ``token:<name>``) and what it may do."""

    name: str
    secret: str
    #: the configured scopes with those they imply
    scopes: frozenset[str]


class EmbeddedWorker(Protocol):
    """A worker ``serve`` runs, as /api/health reports it: a thread (queue.worker.Worker) or a
    child process (queue.processes.WorkerProcess)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def models(self) -> Iterable[str]: ...
    @property
    def alive(self) -> bool: ...
    @property
    def jobs_run(self) -> int: ...


@dataclass(frozen=True)
class ApiContext:
    """The node's parts the API serves; one per application."""

    settings: Settings
    sessions: sessionmaker[Session]
    jobs: JobRepository
    #: the workers embedded in this process (``serve``), for /api/health
    workers: tuple[EmbeddedWorker, ...] = ()
    #: the job models without a package this node runs (the tests' echo), for /api/models
    builtin_models: tuple[str, ...] = ()
    #: stores STOW-RS requests through the node's receiver (None: no receiver, no STOW-RS)
    stow: StowIngest | None = None
    #: called after a new request is recorded: the runner looks at once, not at its next tick
    on_request: Callable[[], None] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def tokens(self) -> dict[str, Credential]:
        return api_tokens(self.settings.api)


def expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    return frozenset().union(*(IMPLIED_SCOPES[s] for s in scopes))


def api_tokens(api: ApiSettings) -> dict[str, Credential]:
    """Tokens by name: ``[api] tokens`` plus ``[api] token`` as ``admin`` (every scope)."""
    tokens = {
        name: Credential(name, token.secret, expand_scopes(token.scopes))
        for name, token in api.tokens.items()
        if token.secret
    }
    if api.token:
        tokens.setdefault(
            DEFAULT_TOKEN_NAME, Credential(DEFAULT_TOKEN_NAME, api.token, IMPLIED_SCOPES["admin"])
        )
    return tokens


def check_exposure(api: ApiSettings) -> None:
    """At start, ConfigError for an API others could reach unguarded: no token on a
    non-loopback host, or a token there that is short, plain or an example's (named by its
    name, never its value)."""
    tokens = api_tokens(api)
    if is_loopback(api.host):
        return
    if not tokens:
        raise ConfigError(
            f"[api] host {api.host!r} is not a loopback address and no token is configured: "
            "set [api] token (or DICOMNODE_API__TOKEN) or [api] tokens, or listen on 127.0.0.1"
        )
    for credential in tokens.values():
        why = weak_token(credential.secret)
        if why:
            where = "[api] token" if credential.name == DEFAULT_TOKEN_NAME else "[api] tokens"
            raise ConfigError(
                f"API token {credential.name!r} ({where}) {why}, and [api] host {api.host!r} "
                "is not a loopback address: use a random secret (openssl rand -hex 32)"
            )


def weak_token(secret: str) -> str | None:
    """Why ``secret`` is too weak to guard a non-loopback API (None: it is not)."""
    if secret.strip().lower() in EXAMPLE_TOKENS:
        return "is an example value from the documentation"
    if len(secret) < MIN_TOKEN_LENGTH:
        return f"is shorter than {MIN_TOKEN_LENGTH} characters"
    if len(set(secret)) < MIN_TOKEN_CHARACTERS:
        return f"has fewer than {MIN_TOKEN_CHARACTERS} different characters"
    return None


def allowed_hosts(api: ApiSettings) -> tuple[str, ...]:
    """The Host header names the API answers to (``*``: any). Without tokens, loopback names
    only (and the bind host): a DNS name an attacker rebinds to 127.0.0.1 must not reach an
    open API from a victim's browser. With tokens any, unless ``[api] allowed_hosts`` says."""
    bind = () if api.host in ("0.0.0.0", "::", "") else (api.host.strip("[]").lower(),)
    if api.allowed_hosts is not None:
        named = tuple(h.strip().strip("[]").lower().rstrip(".") for h in api.allowed_hosts)
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, *bind, *named)))
    if api_tokens(api):
        return ("*",)
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, *bind)))


def host_allowed(header: str, allowed: Sequence[str]) -> bool:
    """Whether a Host header (``name``, ``name:port``, ``[v6]:port``) is in ``allowed``;
    ``*`` allows any, ``*.example.org`` that domain's names."""
    if "*" in allowed:
        return True
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    if not host:
        return False
    return any(
        host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in allowed
    )


#: keys of a config file whose values are secrets (any table), and URLs that may hold one
_SECRET_KEY = re.compile(
    r"(^|_)(token|tokens|secret|password|passphrase|authorization|api_?key)$", re.IGNORECASE
)
_URL_KEY = re.compile(r"(^|_)url$", re.IGNORECASE)


def config_secrets(values: Any, where: str = "") -> list[str]:
    """The keys of a parsed config file that hold a secret (not their values)."""
    found: list[str] = []
    if isinstance(values, dict):
        for key, value in values.items():
            path = f"{where}.{key}" if where else str(key)
            if _SECRET_KEY.search(str(key)) and value not in ("", {}, [], None):
                found.append(path)
            elif _URL_KEY.search(str(key)) and isinstance(value, str):
                try:
                    if urlsplit(value).password:
                        found.append(path)
                except ValueError:
                    pass
            else:
                found += config_secrets(value, path)
    elif isinstance(values, list):
        for index, value in enumerate(values):
            found += config_secrets(value, f"{where}[{index}]")
    return found


def warn_readable_config(path: Path | str | None) -> list[str]:
    """One WARNING (action ``config_permissions``) when the config file holds secrets and
    its group or others may read it; returns the keys that hold them (empty: no warning)."""
    if path is None:
        return []
    path = Path(path)
    try:
        mode = path.stat().st_mode
        secrets = config_secrets(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return []  # load_settings already said what is wrong with it
    if not secrets or not mode & 0o077:
        return []
    logger.warning(
        "config file %s holds secrets (%s) and its group or others may read it (mode %s): "
        "chmod 600 it, or pass the secrets as DICOMNODE_* environment variables",
        path,
        ", ".join(secrets),
        oct(stat.S_IMODE(mode)),
        extra={"action": "config_permissions"},
    )
    return secrets


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
