"""Typed settings from one TOML file plus ``DICOMNODE_*`` environment variables.

Precedence, highest first: environment variables, the TOML file, the embedded defaults. Nested
keys use a double underscore: ``DICOMNODE_NODE__PORT=11113``; lists are JSON:
``DICOMNODE_SECURITY__ALLOWED_CALLING_AETS='["CT1","PACS"]'``. ``DICOMNODE_CONFIG`` names the file
when ``--config`` is not given. Settings are built once at start and never change.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicomnode.errors import ConfigError

ENV_PREFIX = "DICOMNODE_"
CONFIG_ENV = "DICOMNODE_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class DuplicatePolicy(StrEnum):
    """What a second instance with a SOP Instance UID the node already holds does."""

    KEEP_FIRST = "keep_first"
    REPLACE = "replace"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1 to 16 printable characters, no backslash")
    return value.strip()


class NodeSettings(_Section):
    """The DICOM listener and where it keeps what it receives."""

    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    storage_dir: Path = Path("./var")
    database_url: str = ""  # empty: SQLite in storage_dir
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    min_free_disk_mb: int = Field(1024, ge=0)
    max_associations: int = Field(16, ge=1)
    max_pdu_size: int = Field(0, ge=0)  # 0: no limit, the sender's PDUs are taken whole
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(120.0, gt=0)
    auto_migrate: bool = True
    #: studies last received longer ago than this lose their files and index rows, unless a
    #: job of theirs is unfinished; 0 keeps everything
    retention_days: float = Field(30.0, ge=0)

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite beside the spool."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.storage_dir / 'dicomnode.db').resolve()}"


class TLSSettings(_Section):
    """DICOM TLS; with ``ca`` set and ``verify_peer`` true, senders need a certificate it signed."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    verify_peer: bool = True

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("tls.enabled needs tls.cert and tls.key")
        if self.enabled and self.verify_peer and self.ca is None:
            raise ValueError(
                "tls.verify_peer needs tls.ca (the CA that signs senders' certificates)"
            )
        return self


class SecuritySettings(_Section):
    """Who may open an association. Empty lists allow everyone."""

    allowed_calling_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # addresses or networks: "10.1.2.3", "10.1.0.0/16"
    tls: TLSSettings = TLSSettings()

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_aets(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in values)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed host {value!r} is not an IP address or network") from exc
        return values


MatchValue = str | float | list[str | float] | dict[str, float]


class CompletionSettings(_Section):
    """When a route's series (or study) counts as complete."""

    quiet_s: float = Field(10.0, ge=0)  # no new instance for this long
    release_grace_s: float = Field(2.0, ge=0)  # after the sending association is released
    expected_counts: bool = True  # Images in Acquisition, frames, contiguous slice positions
    #: study-level routes: series name -> regular expression on Series Description (or on
    #: the sequence attributes), e.g. {T1 = "(?i)t1(?!.*(post|gd|\\+c))", FLAIR = "(?i)flair"}
    required_series: dict[str, str] = {}
    study_timeout_s: float = Field(900.0, gt=0)
    on_missing: Literal["run", "fail"] = "run"


class RouteSettings(_Section):
    """One routing rule: which series go to which model, sent where, how urgently."""

    name: str
    match: dict[str, MatchValue] = {}
    model: str
    destinations: tuple[str, ...] = ()
    priority: Literal["routine", "urgent", "stat"] = "routine"
    level: Literal["series", "study"] = "series"
    completion: CompletionSettings = CompletionSettings()


class RoutingSettings(_Section):
    """How the routes combine: the first that matches, or every one; and the fallback."""

    mode: Literal["first", "all"] = "first"
    fallback: str | None = None  # a route name used when no other route matches


class WorkerSettings(_Section):
    """A worker embedded in ``serve``: its device and the models it keeps loaded."""

    device: str = "cpu"
    models: tuple[str, ...] = ()  # empty: every model


class ModelsSettings(_Section):
    """Where the model packages are, MONAI bundles that replace a package's network, and how
    models run (``[models]``)."""

    #: folders holding one model package per subfolder (``<dir>/<name>/model.toml``); a
    #: relative path is looked up in the current directory, then in the source checkout
    dirs: tuple[Path, ...] = (Path("models"),)
    #: model name -> MONAI bundle directory in the Model Zoo layout (configs/metadata.json,
    #: configs/inference.json, models/model.pt), e.g. ``lung_nodule = "/opt/bundles/lung"``
    bundles: dict[str, Path] = {}
    seed: int = 0  # every run starts from this seed: the same input gives the same findings
    deterministic: bool = True  # deterministic algorithms (warn-only where none exists)
    threads: int = Field(0, ge=0)  # CPU threads for torch; 0: torch's default


class QueueSettings(_Section):
    """Retries, leases and retention of the job queue."""

    max_attempts: int = Field(3, ge=1)
    backoff_s: float = Field(30.0, ge=0)  # the first retry waits this long, then doubles
    lease_s: float = Field(60.0, gt=0)  # a job whose worker stops heartbeating is claimed again
    heartbeat_s: float = Field(10.0, gt=0)
    retention_days: float = Field(30.0, gt=0)


class ApiSettings(_Section):
    """The HTTP API (served by a later component; read here so one file configures the node)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""


class Settings(BaseSettings):
    """All of dicomnode's settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    node: NodeSettings = NodeSettings()
    security: SecuritySettings = SecuritySettings()
    api: ApiSettings = ApiSettings()
    routing: RoutingSettings = RoutingSettings()
    routes: tuple[RouteSettings, ...] = ()
    workers: tuple[WorkerSettings, ...] = (WorkerSettings(),)
    queue: QueueSettings = QueueSettings()
    models: ModelsSettings = ModelsSettings()

    @model_validator(mode="after")
    def _routes_consistent(self) -> Settings:
        names = [route.name for route in self.routes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"route names must be unique; repeated: {duplicates}")
        if self.routing.fallback is not None and self.routing.fallback not in names:
            raise ValueError(
                f"routing.fallback {self.routing.fallback!r} names no route (routes: {names})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, which arrives as init values.
        return (env_settings, init_settings)


def load_settings(path: Path | str | None = None) -> Settings:
    """Build the settings from ``path`` (or ``$DICOMNODE_CONFIG``) and the environment."""
    path = path or os.environ.get(CONFIG_ENV) or None
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {str(path)!r} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from exc


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"config file {str(path)!r}" if path else "configuration"
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"  # a whole table is noise
        problems.append(f"{key}: {error['msg']}{shown}")
    return f"{where} is not valid: " + "; ".join(problems)
