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
import socket
import tomllib
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dicomnode.envelope import Envelope
from dicomnode.errors import ConfigError

ENV_PREFIX = "DICOMNODE_"
CONFIG_ENV = "DICOMNODE_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
#: a receiver id names a folder of the shared spool (``incoming/<id>/``): no separators, no dots
#: to start, room for the ``-<k>`` of ``serve --processes``
_RECEIVER_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
RECEIVER_ID_MAX = 64
_COMMAND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


def default_receiver_id() -> str:
    """The host name, made a safe folder name: each container or host is a receiver of its own."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).lstrip(".-") or "receiver"
    return name[: RECEIVER_ID_MAX - 8]  # leaves room for "-<k>" of serve --processes


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
    #: names this receiver in the shared spool (``incoming/<id>/``) and on its associations;
    #: unique per running receiver (default: the host name). Receivers sharing a database and
    #: a spool must not share an id: each cleans its own folder and closes its own
    #: associations at start.
    receiver_id: str = Field(default_factory=default_receiver_id)
    #: receiver processes on the DICOM port (SO_REUSEPORT); the extra ones only receive
    processes: int = Field(1, ge=1, le=64)
    #: a deflated dataset is inflated on receipt (and stored as explicit VR little endian);
    #: one that inflates past this is refused (0xC007): a few hundred kB can hold gigabytes
    max_inflated_mb: int = Field(512, ge=1)
    #: the most an instance's pixel data may decode to (compressed data declares its size)
    max_pixel_data_mb: int = Field(2048, ge=1)
    #: accept UIDs with leading zeros in a component (``1.02.3``), which PS3.5 forbids
    lenient_uids: bool = False
    # -- limits that hold under abuse (each per receiver process) ---------------------------
    #: associations open at once from one host (an IPv6 host: its /64); unset: half of
    #: max_associations, so one host (a flood, a stuck router) never takes every slot
    max_associations_per_host: int | None = Field(None, ge=1)
    #: associations open at once with one calling AE title; unset: half of max_associations
    max_associations_per_aet: int | None = Field(None, ge=1)
    #: an association is aborted this long after it opened, busy or not (4 h: 5 GB at 3
    #: Mbit/s); a sender that opens one association per study or series never meets it; 0: never
    max_association_s: float = Field(14400.0, ge=0)
    #: an association is aborted this long after its last C-STORE data (or its start): C-ECHO
    #: and other commands do not count, so keep-alives cannot hold a slot; 0: never
    idle_timeout_s: float = Field(300.0, ge=0)
    #: connections that have not yet sent their whole A-ASSOCIATE-RQ (TLS handshake included):
    #: at most this many at once (unset: twice max_associations), at most
    #: max_pending_per_host from one host (unset: max_associations_per_host); a connection over
    #: either is closed at once, without a thread
    max_pending_connections: int | None = Field(None, ge=1)
    max_pending_per_host: int | None = Field(None, ge=1)
    #: a connection must have sent its whole A-ASSOCIATE-RQ (after any TLS handshake) within
    #: this many seconds of being accepted, however it trickles the bytes
    associate_timeout_s: float = Field(10.0, gt=0)

    _check_ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("receiver_id")
    @classmethod
    def _check_receiver_id(cls, value: str) -> str:
        if not _RECEIVER_ID.match(value) or len(value) > RECEIVER_ID_MAX:
            raise ValueError(
                f"receiver_id {value!r} must be 1 to {RECEIVER_ID_MAX} letters, digits, '_', "
                "'.' or '-', not starting with '.' or '-' (it names a folder)"
            )
        return value

    @model_validator(mode="after")
    def _room_for_processes(self) -> NodeSettings:
        longest = len(self.process_receiver_id(self.processes - 1))
        if longest > RECEIVER_ID_MAX:
            raise ValueError(
                f"receiver_id {self.receiver_id!r} is too long for {self.processes} processes: "
                f"{self.process_receiver_id(self.processes - 1)!r} has {longest} characters, "
                f"at most {RECEIVER_ID_MAX}"
            )
        return self

    @property
    def host_association_limit(self) -> int:
        """Associations one host may hold at once (``max_associations_per_host`` resolved)."""
        return self.max_associations_per_host or max(1, self.max_associations // 2)

    @property
    def aet_association_limit(self) -> int:
        """Associations one calling AE title may hold at once."""
        return self.max_associations_per_aet or max(1, self.max_associations // 2)

    @property
    def pending_limit(self) -> int:
        """Connections not yet associated, from all hosts together."""
        return self.max_pending_connections or 2 * self.max_associations

    @property
    def host_pending_limit(self) -> int:
        """Connections not yet associated, from one host."""
        return self.max_pending_per_host or self.host_association_limit

    def process_receiver_id(self, k: int) -> str:
        """The receiver id of ``serve``'s extra receiver process ``k`` (0: the serve itself)."""
        return self.receiver_id if k == 0 else f"{self.receiver_id}-{k}"

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
    #: a series completed by a rule a split transfer can fool (a released association, a quiet
    #: spell) is analysed at once, but its results are sent only when nothing new arrived for
    #: this long after its last instance; an instance inside the window supersedes the run
    confirm_s: float = Field(10.0, ge=0)
    #: calling AE titles declared to send each series whole in one association: a series they
    #: send is complete, and confirmed, when that association is released
    whole_series_senders: tuple[str, ...] = ()
    #: study-level routes: series name -> regular expression on Series Description (or on
    #: the sequence attributes), e.g. {T1 = "(?i)t1(?!.*(post|gd|\\+c))", FLAIR = "(?i)flair"}
    required_series: dict[str, str] = {}
    study_timeout_s: float = Field(900.0, gt=0)
    on_missing: Literal["run", "fail"] = "run"


class CriticalRule(_Section):
    """When a route's finding is critical (``critical = { label = "nodule", min_diameter_mm =
    8 }``): every condition given must hold, and the finding must be positive (not
    indeterminate, not grade 0). A critical finding raises the ``critical`` event and makes the
    study's other waiting and queued jobs ``stat``."""

    #: the finding's label (model.toml [[labels]] name) or its finding type's meaning, in any
    #: case ("nodule", "Nodule", "enhancing_tumor", "dr_grade"); unset: any finding
    label: str | None = Field(None, min_length=1, max_length=64)
    min_probability: float | None = Field(None, ge=0, le=1)
    min_diameter_mm: float | None = Field(None, ge=0)
    min_volume_mm3: float | None = Field(None, ge=0)
    #: a graded finding's ``grade`` attribute (the OCT model's ICDR grade, 0 to 4)
    min_grade: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _some_condition(self) -> CriticalRule:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError(
                "a critical rule needs at least one of label, min_probability, "
                "min_diameter_mm, min_volume_mm3, min_grade"
            )
        return self


#: a route's ``send_if``: "always" (the default), "positive" (only a job with a positive
#: finding sends), or finding labels (only a job with a positive finding of one of them sends)
SendIf = Literal["always", "positive"] | tuple[str, ...]


#: the series-level attributes a prior's ``match`` may name (the rest are the study's)
SERIES_QUERY_KEYS = frozenset(
    {"Modality", "BodyPartExamined", "SeriesDescription", "ProtocolName", "SeriesNumber"}
)


def check_query_keys(keys: Sequence[str], what: str) -> None:
    """ValueError naming a key that is not a DICOM keyword (``Modality``, ``StudyDate``...)."""
    from pydicom.datadict import tag_for_keyword

    unknown = [key for key in keys if tag_for_keyword(key) is None]
    if unknown:
        raise ValueError(
            f"{what}: {', '.join(map(repr, unknown))} is not a DICOM keyword (e.g. Modality, "
            "BodyPartExamined, StudyDescription)"
        )


class PriorsSettings(_Section):
    """A route's priors (``priors = { count = 1, match = {...} }``): before its job runs, the
    node asks the source for the same patient's earlier studies with a series that matches,
    retrieves the most recent ``count`` and gives them to the model beside its input."""

    count: int = Field(1, ge=1, le=10)
    #: DICOM keyword -> value, or a list of values any of which may match (case-insensitive;
    #: ``*`` and ``?`` as in C-FIND); series attributes (Modality, BodyPartExamined,
    #: SeriesDescription, ProtocolName, SeriesNumber) pick the prior's series, the others are
    #: the study's
    match: dict[str, str | list[str]] = {}
    #: the source asked (default: the one the study came from: its request's, else the
    #: source whose AE title sent it)
    source: str | None = None

    @field_validator("match")
    @classmethod
    def _keywords(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        check_query_keys(list(value), "priors.match")
        return value


class RouteSettings(_Section):
    """One routing rule: which series go to which model, sent where, how urgently."""

    name: str
    match: dict[str, MatchValue] = {}
    model: str
    destinations: tuple[str, ...] = ()
    priority: Literal["routine", "urgent", "stat"] = "routine"
    level: Literal["series", "study"] = "series"
    completion: CompletionSettings = CompletionSettings()
    #: an input outside the model's validated acquisitions (its model.toml [envelope]):
    #: "refuse" ends the job at once, with the reasons; "flag" runs the model and marks the job
    #: and every result object
    envelope: Literal["refuse", "flag"] = "refuse"
    #: "shadow": the route's model runs and its results are kept (results/<job id>/) but never
    #: sent, whatever ``destinations`` says; a shadow route matches beside the live routes
    #: (``routing.mode = "first"`` does not stop at it), so ``models compare`` can set a new
    #: model or version against the live one on the site's own traffic
    mode: Literal["live", "shadow"] = "live"
    #: whether the route's destinations get a job's results, decided on its findings (a job
    #: that does not send is ``done``, its outcome in its result)
    send_if: SendIf = "always"
    #: what makes one of its findings critical: one rule or a list (any may match)
    critical: tuple[CriticalRule, ...] = ()
    #: hold each job's results in ``review`` (nothing sent, no one notified) until a person
    #: approves them (POST /api/jobs/{id}/approve, ``jobs approve``) or rejects them with a
    #: reason; a shadow route never sends, so never holds
    review: bool = False

    @field_validator("critical", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, Mapping) else value

    @field_validator("send_if")
    @classmethod
    def _labels_given(cls, value: SendIf) -> SendIf:
        if isinstance(value, tuple) and (not value or not all(v.strip() for v in value)):
            raise ValueError(
                'send_if is "always", "positive" or a non-empty list of finding labels'
            )
        return value

    #: the patient's earlier studies the job gets beside its input (series-level routes)
    priors: PriorsSettings | None = None

    @model_validator(mode="after")
    def _priors_on_series(self) -> RouteSettings:
        if self.priors is not None and self.level != "series":
            raise ValueError(
                f"route {self.name!r}: priors are given to series-level routes only "
                f"(this one is {self.level!r})"
            )
        return self


class RoutingSettings(_Section):
    """How the routes combine: the first that matches, or every one; and the fallback."""

    mode: Literal["first", "all"] = "first"
    fallback: str | None = None  # a route name used when no other route matches


class WorkerSettings(_Section):
    """A worker embedded in ``serve``: its device and the models it keeps loaded."""

    device: str = "cpu"
    models: tuple[str, ...] = ()  # empty: every model
    #: "process": a child process of ``serve`` (restarted when it dies: a model run that eats
    #: the memory takes down this worker, never the receiver or the API); "thread": inside
    #: the serve's own process (no such protection)
    isolation: Literal["process", "thread"] = "process"
    #: a worker process's data (heap and private memory: the runtime, the model's weights, a
    #: run's arrays) may not grow past this many MB: a run that needs more fails with a
    #: MemoryError, the process lives on (RLIMIT_DATA; CPU workers only); 0: no such limit
    max_memory_mb: int = Field(0, ge=0)


#: the folder contracts a command model may declare (the adapters are in
#: :mod:`dicomnode.pipeline.commands`)
COMMAND_CONTRACTS = ("dicomnode", "mercure", "monai-deploy")
_NOT_YET_CONTRACTS = ("nifti", "totalsegmentator")


class AcceptsSettings(_Section):
    """What a model the site configures (a bundle of its own, a command) runs on, as a
    package's ``[accepts]``: a series that is not refuses the job with the reason."""

    modalities: tuple[str, ...] = ()  # empty: any
    sop_classes: tuple[str, ...] = ()  # empty: any
    min_slices: int = Field(1, ge=1)
    body_parts: tuple[str, ...] = ()  # Body Part Examined (e.g. "ABDOMEN"); empty: any


class CommandModelSettings(_Section):
    """A model that is a program or a container image (``[models.commands.NAME]``): the worker
    writes the job's input DICOM files to ``in/`` in a fresh folder, runs ``command`` (or the
    ``image``) there and takes what it wrote to ``out/`` under the ``contract``: ``dicomnode``
    (DICOM SEG/SR files of the input's study and patient, sent as they are, or
    ``findings.json``, which the node writes as its own SR, or a NIfTI label map on an input
    series' grid, which it writes as its own SEG and SR), ``mercure`` (a mercure module's
    ``MERCURE_IN_DIR``/``MERCURE_OUT_DIR`` and ``task.json``; SEG, SR, Secondary Capture and
    derived images) or ``monai-deploy`` (a MONAI Deploy application's or MAP's
    ``HOLOSCAN_INPUT_PATH``/``HOLOSCAN_OUTPUT_PATH``; SEG and SR)."""

    #: the program and its arguments; ``{input}`` and ``{output}`` are replaced by the folders'
    #: paths, else the two paths are appended (not with an ``image``: there the command, if
    #: any, replaces the image's own and is passed as it is)
    command: tuple[str, ...] = ()
    #: a container image run with docker or podman instead of a program on this machine
    image: str | None = Field(None, min_length=1)
    #: the container runtime; unset: docker, else podman, whichever is installed
    runtime: Literal["docker", "podman"] | None = None
    timeout_s: float = Field(3600.0, gt=0)
    #: the software version the node's own SR names (``findings.json`` outputs)
    version: str = Field("1.0", min_length=1, max_length=64)
    #: variables added to the worker's environment (``CUDA_VISIBLE_DEVICES`` is set from the
    #: worker's device: empty on the CPU)
    environment: dict[str, str] = {}
    #: label value -> name of a NIfTI label map's values (``dicomnode`` contract), for the
    #: values its ``labels.json`` does not name
    labels: dict[int, str] = {}
    contract: str = "dicomnode"
    #: the model's files (a folder or file): ``HOLOSCAN_MODEL_PATH``/``MONAI_MODELPATH`` under
    #: ``monai-deploy``, ``DICOMNODE_MODEL`` otherwise; mounted read-only in a container
    model_path: Path | None = None
    #: the module's settings: ``task.json``'s ``process.settings`` under ``mercure``
    settings: dict[str, Any] = {}
    #: what it runs on (modalities, SOP classes, body parts, instances at least); unset: any
    accepts: AcceptsSettings | None = None
    #: the acquisitions it was validated on, checked from the inputs' headers before it runs
    #: (the route's ``envelope`` policy decides what happens outside); unset: not checked
    envelope: Envelope | None = None

    @model_validator(mode="after")
    def _check_command_or_image(self) -> CommandModelSettings:
        if not self.command and self.image is None:
            raise ValueError("a command model needs a command (the program to run) or an image")
        if self.command and self.image is None and not self.command[0].strip():
            raise ValueError(f"command {list(self.command)!r} must start with the program to run")
        if self.runtime is not None and self.image is None:
            raise ValueError(f"runtime {self.runtime!r} is set without an image to run")
        return self

    @field_validator("contract")
    @classmethod
    def _check_contract(cls, value: str) -> str:
        if value not in COMMAND_CONTRACTS:
            known = ", ".join(map(repr, COMMAND_CONTRACTS))
            raise ValueError(
                f"contract {value!r} is not supported: use {known} (the "
                f"{', '.join(_NOT_YET_CONTRACTS)} contracts are not supported yet)"
            )
        return value


class BundleLabelSettings(_Section):
    """The code the site gives one label of a bundle (``[models.bundle_settings.NAME.labels]``,
    keyed by the label's name in ``channel_def`` or its channel number)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field("SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)
    #: the SEG's segmented property category; unset: from the label's name (see README)
    category: Literal["anatomy", "lesion"] | None = None


class BundleSettings(_Section):
    """What the site says of a MONAI bundle that is a model of its own
    (``[models.bundle_settings.NAME]``): it wins over what metadata.json says."""

    #: label name or channel number -> its code (wins over the SNOMED CT name match)
    labels: dict[str, BundleLabelSettings] = {}
    #: a probability output's cut: a one-channel segmentation's voxels, or the classes of a
    #: classification reported (unset: the argmax class)
    threshold: float | None = Field(None, gt=0, lt=1)
    #: unset: the modality of metadata.json's input
    accepts: AcceptsSettings | None = None
    level: Literal["series", "study"] = "series"  # "study" is refused at start, for now
    #: the acquisitions it was validated on (a package's ``[envelope]``); unset: not checked
    envelope: Envelope | None = None
    description: str = ""  # unset: metadata.json's task


class ModelsSettings(_Section):
    """Where the model packages are, MONAI bundles that replace a package's network, and how
    models run (``[models]``)."""

    #: folders holding one model package per subfolder (``<dir>/<name>/model.toml``); a
    #: relative path is looked up in the current directory, then in the source checkout
    dirs: tuple[Path, ...] = (Path("models"),)
    #: model name -> MONAI bundle directory in the Model Zoo layout (configs/metadata.json,
    #: configs/inference.json, models/model.pt), e.g. ``lung_nodule = "/opt/bundles/lung"``
    bundles: dict[str, Path] = {}
    #: bundle model name -> what the site says of it (``[models.bundle_settings.NAME]``)
    bundle_settings: dict[str, BundleSettings] = {}
    #: model name -> a program run for each job (``[models.commands.NAME]``)
    commands: dict[str, CommandModelSettings] = {}
    seed: int = 0  # every run starts from this seed: the same input gives the same findings
    deterministic: bool = True  # deterministic algorithms (warn-only where none exists)
    threads: int = Field(0, ge=0)  # CPU threads for torch; 0: torch's default

    @field_validator("commands")
    @classmethod
    def _check_command_names(
        cls, value: dict[str, CommandModelSettings]
    ) -> dict[str, CommandModelSettings]:
        for name in value:  # as a package's name (dicomnode.inference.protocol.MODEL_NAME)
            if not _COMMAND_NAME.match(name):
                raise ValueError(
                    f"command model name {name!r} must be 1 to 64 letters, digits, '_', '.' "
                    "or '-', starting with a letter or digit"
                )
        return value


class QueueSettings(_Section):
    """Retries, leases and retention of the job queue."""

    max_attempts: int = Field(3, ge=1)
    backoff_s: float = Field(30.0, ge=0)  # the first retry waits this long, then doubles
    lease_s: float = Field(60.0, gt=0)  # a job whose worker stops heartbeating is claimed again
    heartbeat_s: float = Field(10.0, gt=0)
    retention_days: float = Field(30.0, gt=0)


class ResultsSettings(_Section):
    """The DICOM objects written from a job's findings (``[results]``): a SEG, a TID 1500 SR,
    for a classification's attention map Secondary Capture images, and key images (each
    finding outlined with its numbers burned in, Secondary Captures) flagged by a Key Object
    Selection document; each a new series in the source study."""

    enabled: bool = True
    seg: bool = True
    sr: bool = True
    sc: bool = True
    #: key images and their Key Object Selection document
    summary: bool = True
    seg_series_number: int = Field(9901, ge=1, le=2**31 - 1)
    sr_series_number: int = Field(9902, ge=1, le=2**31 - 1)
    sc_series_number: int = Field(9903, ge=1, le=2**31 - 1)
    summary_series_number: int = Field(9904, ge=1, le=2**31 - 1)
    kos_series_number: int = Field(9905, ge=1, le=2**31 - 1)
    #: Series Description templates: {model}, {version}; " (demo)" is added for demo weights
    seg_description: str = "{model} segmentation"
    sr_description: str = "{model} findings"
    sc_description: str = "{model} attention map"
    summary_description: str = "{model} key images"
    kos_description: str = "{model} key objects"
    manufacturer: str = Field("dicomnode", min_length=1, max_length=64)
    institution_name: str = Field("", max_length=64)
    device_serial_number: str = Field("1", min_length=1, max_length=64)
    #: "" derives 2.25.<UUID> UIDs; else an organisation's root, e.g. "1.2.826.0.1.3680043.10.9"
    uid_root: str = ""
    #: Secondary Capture: at most this many frames (the most attended), heat map opacity
    sc_max_frames: int = Field(3, ge=1, le=100)
    sc_opacity: float = Field(0.5, gt=0, le=1)
    #: key images: at most this many (the most probable findings' first)
    summary_max_images: int = Field(8, ge=1, le=100)

    @field_validator(
        "seg_description", "sr_description", "sc_description", "summary_description",
        "kos_description",
    )  # fmt: skip
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            value.format(model="m", version="v")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"description template {value!r} may use only {{model}} and {{version}}: {exc}"
            ) from exc
        return value

    @field_validator("uid_root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        root = value.strip().removesuffix(".")
        if not root:
            return ""
        if not all(p.isdigit() and (p == "0" or p[0] != "0") for p in root.split(".")):
            raise ValueError(f"UID root {value!r} must be numbers without leading zeros, dotted")
        if len(root) > 40:  # the rest of a 64-character UID is the derived part
            raise ValueError(f"UID root {value!r} is {len(root)} characters; at most 40")
        return root + "."


class ClientTLSSettings(_Section):
    """DICOM TLS towards a peer (a destination, a source): ``ca`` verifies its certificate
    (none: not verified); ``cert`` and ``key`` are ours, for peers that verify callers."""

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _key_with_cert(self) -> ClientTLSSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together")
        return self


class RemoteSettings(_Section):
    """What a destination and a source share: a DIMSE peer (``ae_title``, ``host``, ``port``,
    optionally over ``tls``) or a DICOMweb service (``url``, with ``token`` and ``headers``)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None  # DICOMweb base: {url}/studies
    #: our AE title on associations to this peer (default: node.ae_title)
    calling_aet: str | None = None
    tls: ClientTLSSettings = ClientTLSSettings()
    token: str = ""  # DICOMweb: sent as "Authorization: Bearer <token>"
    headers: dict[str, str] = {}  # DICOMweb: more HTTP headers
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("ae_title", "calling_aet")
    @classmethod
    def _check_aets(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    def _check_peer(self, what: str, others: Sequence[tuple[str, bool]] = ()) -> None:
        """Exactly one kind of peer, complete: ValueError naming what is wrong."""
        dimse = self.ae_title is not None or self.host is not None
        kinds = [k for k, on in (("ae_title/host/port", dimse), ("url", self.url is not None),
                                 *others) if on]  # fmt: skip
        if len(kinds) != 1:
            names = ", ".join(["ae_title/host/port", "url", *(k for k, _ in others)])
            raise ValueError(
                f"{what} {self.name!r} needs exactly one of {names} "
                f"(got {', '.join(kinds) or 'none'})"
            )
        if dimse and (self.ae_title is None or self.host is None or self.port is None):
            raise ValueError(f"{what} {self.name!r} needs ae_title, host and port together")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{what} {self.name!r}: url {self.url!r} is not http(s)://")


class DestinationSettings(RemoteSettings):
    """Where results go (``[[destinations]]``): a C-STORE SCP (``ae_title``, ``host``,
    ``port``), a STOW-RS service (``url``), or the AE that sent the job's input
    (``return_to_sender``, at its host on ``port``). Sends retry with exponential backoff
    (``backoff_s``, doubling up to ``max_backoff_s``) and are given up after ``max_attempts``."""

    return_to_sender: bool = False
    max_attempts: int = Field(10, ge=1)
    backoff_s: float = Field(30.0, ge=0)
    max_backoff_s: float = Field(3600.0, ge=0)
    batch: int = Field(100, ge=1)  # objects per association or STOW-RS request

    @model_validator(mode="after")
    def _one_kind(self) -> DestinationSettings:
        if self.return_to_sender and self.ae_title is None and self.host is None:
            # the sender's AE title and host, on this port: no other part of a peer
            if self.url is not None:
                raise ValueError(
                    f"destination {self.name!r} needs exactly one of ae_title/host/port, url "
                    "or return_to_sender = true (got url, return_to_sender)"
                )
            if self.port is None:
                raise ValueError(
                    f"destination {self.name!r}: return_to_sender needs the port the sender's "
                    "C-STORE SCP listens on"
                )
            return self
        self._check_peer("destination", (("return_to_sender = true", self.return_to_sender),))
        return self

    @property
    def kind(self) -> Literal["dimse", "stow", "return_to_sender"]:
        if self.url is not None:
            return "stow"
        return "return_to_sender" if self.return_to_sender else "dimse"


#: What a notification is sent on: a job's results released (``done``), with a positive finding
#: (``finding``), with a critical one (``critical``, by its route's ``critical`` rules), or
#: the job failed (``failed``).
NotifyEvent = Literal["done", "failed", "finding", "critical"]
#: the most specific first: a notification sends one message per job outcome, for the first of
#: its events that happened (a critical finding is also a finding, and the job is done)
EVENT_ORDER: tuple[NotifyEvent, ...] = ("critical", "finding", "done", "failed")
#: the variables a webhook's ``body`` template may name (``${accession_number}``); a string that
#: is one variable alone (``"${findings}"``) becomes its JSON value (a list, a number)
TEMPLATE_VARIABLES = frozenset({
    "event", "at", "delivery_id", "job_id", "route", "model", "model_version", "demo", "state",
    "error", "study_instance_uid", "accession_number", "patient_id", "patient_name",
    "study_description", "study_date", "modalities", "findings", "findings_count", "positive",
    "critical", "critical_count", "summary", "sent",
})  # fmt: skip
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def template_variables(body: Any) -> set[str]:
    """Every ``${name}`` in the strings of a webhook body template (keys and values, nested);
    ValueError for a malformed placeholder (``$`` alone is written ``$$``)."""
    from string import Template

    if isinstance(body, str):
        template = Template(body)
        if not template.is_valid():
            raise ValueError(f"template text {body!r} has a malformed placeholder (write $$ for $)")
        return set(template.get_identifiers())
    if isinstance(body, Mapping):
        return {n for k, v in body.items() for n in (*template_variables(k),
                                                       *template_variables(v))}  # fmt: skip
    if isinstance(body, list | tuple):
        return {n for v in body for n in template_variables(v)}
    return set()


class NotificationSettings(_Section):
    """Who is told of a job's outcome (``[[notifications]]``), on which ``events`` (``done``,
    ``failed``, ``finding``, ``critical``), for which ``routes`` (empty: every live route):
    a ``webhook`` (a JSON POST to ``url``, its body from the ``body`` template), an ``hl7`` RIS
    (HL7 v2.5 ORU^R01 over MLLP to ``host``:``port``) or a ``fhir`` server (an R4 transaction
    Bundle of a DiagnosticReport and its Observations, POSTed to the base ``url``).

    Like sends: written with the job's outcome in one transaction, retried with exponential
    backoff (``backoff_s``, doubling up to ``max_backoff_s``), given up after
    ``max_attempts``; each message carries a delivery id that a retry repeats (the HL7 message
    control id, the FHIR identifier, the webhook's ``Idempotency-Key`` header)."""

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["webhook", "hl7", "fhir"]
    events: tuple[NotifyEvent, ...] = Field(min_length=1)
    routes: tuple[str, ...] = ()
    #: webhook: the URL POSTed to; fhir: the server's base URL (the Bundle is POSTed to it)
    url: str | None = None
    #: hl7: the RIS's MLLP listener
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    #: webhook, fhir: sent as "Authorization: Bearer <token>"
    token: str = ""
    headers: dict[str, str] = {}  # webhook, fhir: more HTTP headers
    #: webhook: the JSON body, a table whose strings may name TEMPLATE_VARIABLES (unset: the
    #: whole outcome, see README)
    body: dict[str, Any] | None = None
    #: hl7: TLS around MLLP; webhook, fhir: ``ca`` verifies an https server, ``cert``/``key``
    #: are ours for servers that verify clients
    tls: ClientTLSSettings = ClientTLSSettings()
    #: hl7: MSH-3/4 (ours) and MSH-5/6 (the RIS's)
    sending_application: str = Field("DICOMNODE", min_length=1, max_length=180)
    sending_facility: str = Field("", max_length=180)
    receiving_application: str = Field("", max_length=180)
    receiving_facility: str = Field("", max_length=180)
    #: hl7 OBR-25 / OBX-11 and the FHIR DiagnosticReport status: "P" preliminary (AI results
    #: no person has reviewed), or "F" final
    result_status: Literal["P", "F"] = "P"
    max_attempts: int = Field(10, ge=1)
    backoff_s: float = Field(30.0, ge=0)
    max_backoff_s: float = Field(3600.0, ge=0)
    #: connecting, sending and waiting for the answer (the HL7 ACK, the HTTP response)
    timeout_s: float = Field(10.0, gt=0)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _TEMPLATE_NAME.match(value):
            raise ValueError(f"notification name {value!r}: letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _kind_fields(self) -> NotificationSettings:
        where = f"notification {self.name!r} ({self.kind})"
        if self.kind == "hl7":
            if self.host is None or self.port is None or self.url is not None:
                raise ValueError(f"{where} needs host and port (its MLLP listener), no url")
        elif self.url is None or self.host is not None or self.port is not None:
            raise ValueError(f"{where} needs url, and no host or port")
        elif not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{where}: url {self.url!r} is not http(s)://")
        if self.body is not None:
            if self.kind != "webhook":
                raise ValueError(f"{where}: body is a webhook's template")
            unknown = sorted(template_variables(self.body) - TEMPLATE_VARIABLES)
            if unknown:
                raise ValueError(
                    f"{where}: body names {unknown}, which are no template variables "
                    f"(known: {sorted(TEMPLATE_VARIABLES)})"
                )
        return self


class SourceSettings(RemoteSettings):
    """A PACS the node may query and retrieve from (``[[sources]]``): a DIMSE peer
    (``ae_title``, ``host``, ``port``: C-FIND, then C-MOVE to our AE or C-GET, per
    ``retrieve``) or a DICOMweb service (``url``: QIDO-RS, then WADO-RS). A retrieve that
    fails part-way is tried again after ``backoff_s`` (doubling up to ``max_backoff_s``) for
    what is still missing, at most ``max_attempts`` times."""

    #: DIMSE: "move" (C-MOVE: the source sends to ``move_destination``, which it must know
    #: as this node's AE title, host and DICOM port) or "get" (C-GET: on our association)
    retrieve: Literal["move", "get"] = "move"
    #: the AE title C-MOVE names as the destination (default: node.ae_title)
    move_destination: str | None = None
    max_attempts: int = Field(5, ge=1)
    backoff_s: float = Field(30.0, ge=0)
    max_backoff_s: float = Field(3600.0, ge=0)

    @field_validator("move_destination")
    @classmethod
    def _check_destination(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSettings:
        self._check_peer("source")
        return self

    @property
    def kind(self) -> Literal["dimse", "dicomweb"]:
        return "dicomweb" if self.url is not None else "dimse"


#: What an API token may do; each route names the one it needs (see dicomnode.api.auth).
#: ``read``: jobs, models, summary, audit, metrics, health details, the OpenAPI document, all
#: without patient or study attributes; ``phi``: those attributes too, /api/studies, and the
#: study, accession and patient filters; ``operate``: retry, cancel, resend; ``review``:
#: approve or reject the results a ``review = true`` route holds; ``store``: send studies in
#: by STOW-RS (nothing else: a modality's or a PACS's token); ``admin``: all.
ApiScope = Literal["read", "phi", "operate", "review", "store", "admin"]
#: the scopes of a named token that names none (``tokens = {ris = "..."}``, the older form):
#: reading without patient data; acting on jobs and seeing patients are opted into
DEFAULT_TOKEN_SCOPES: tuple[ApiScope, ...] = ("read",)


class ApiToken(_Section):
    """One named API token: ``[api.tokens.<name>] secret = "...", scopes = ["read", "phi"]``."""

    secret: str = ""
    scopes: tuple[ApiScope, ...] = DEFAULT_TOKEN_SCOPES


class ApiSettings(_Section):
    """The HTTP API, dashboard and /metrics that ``serve`` runs (port 0: any free port).

    A bearer token guards everything but the up/down answer of /api/health: ``token`` (every
    scope, audited as ``token:admin``) or named ``tokens`` (audited as ``token:<name>``), each
    a secret (scope read only) or a table with ``secret`` and ``scopes``. With none the
    API is open, which the node allows only on a loopback host, and only to loopback Host names.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""
    tokens: dict[str, ApiToken] = {}
    #: HTTPS: the certificate (chain) and its key, PEM files; both or neither
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_key_password: str = ""
    #: the Host header names the API answers to (besides the loopback names); unset: any when
    #: tokens are configured, else the loopback names only (DNS rebinding)
    allowed_hosts: tuple[str, ...] | None = None
    #: health: C-ECHO each DIMSE destination with this timeout, at most once per cache period
    echo_timeout_s: float = Field(2.0, gt=0)
    health_cache_s: float = Field(30.0, ge=0)
    #: the largest STOW-RS request body (POST /dicomweb/studies) taken, in MB; the receiver's
    #: per-instance limits ([node] max_inflated_mb, max_pixel_data_mb) apply to each part
    stow_max_mb: int = Field(4096, ge=1)

    @field_validator("tls_cert", "tls_key", mode="before")
    @classmethod
    def _no_path(cls, value: Any) -> Any:
        return None if value == "" else value  # tls_cert = "": plain HTTP

    @field_validator("tokens", mode="before")
    @classmethod
    def _plain_secrets(cls, value: Any) -> Any:
        """``tokens = {ris = "secret"}`` (the older form) is ``[api.tokens.ris] secret = ...``."""
        if isinstance(value, dict):
            return {k: {"secret": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("tokens")
    @classmethod
    def _token_names(cls, value: dict[str, ApiToken]) -> dict[str, ApiToken]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"token name {name!r}: 1 to 64 letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("[api] tls_cert and tls_key go together: set both or neither")
        secrets: dict[str, str] = {}
        named = [(name, t.secret) for name, t in self.tokens.items()] + [("admin", self.token)]
        for name, secret in named:
            if secret and secret in secrets and secrets[secret] != name:
                raise ValueError(f"tokens {secrets[secret]!r} and {name!r} have the same secret")
            secrets.setdefault(secret, name)
        return self

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    def client_token(self, scope: ApiScope = "read") -> str:
        """A secret for this node's own clients (demo): ``token``, else a named one that has
        ``scope``, else any (whose 403 then names the scope it lacks)."""
        named = [t for t in self.tokens.values() if t.secret]
        fit = [t for t in named if scope in t.scopes or "admin" in t.scopes]
        return self.token or next((t.secret for t in (*fit, *named)), "")


#: The four MR sequences of a brain tumor study, as the brain-mri route of the embedded defaults
#: recognises them (the same patterns as models/brain_tumor/model.toml and the example config).
BRAIN_SEQUENCES = {
    "T1c": r"(?i)(t1|mprage|spgr|bravo|tfe).*(\+c|c\+|post|gd|gad|contrast)"
    r"|(\+c|post|gd|gad).*(t1|mprage|spgr|bravo|tfe)",
    "T1": r"(?i)t1|mprage|spgr|bravo|tfe",
    "T2": r"(?i)t2(?!\s*\*)(?!.*(flair|dark.?fluid|tirm|swi|gre|star))",
    "FLAIR": r"(?i)flair|dark.?fluid|tirm",
}
#: With no config, each demo model gets its studies, and the results stay in the node (no
#: destination is known until one is configured); ``routes = []`` routes nothing.
DEFAULT_ROUTES = (
    RouteSettings(
        name="chest-ct",
        model="lung_nodule",
        match={
            "Modality": "CT",
            "BodyPartExamined": ["CHEST", "LUNG", "THORAX"],
            "slices": {"min": 50},
        },
    ),
    RouteSettings(
        name="brain-mri",
        model="brain_tumor",
        level="study",
        match={"Modality": "MR", "StudyDescription": "re:(?i)brain|head|neuro"},
        completion=CompletionSettings(required_series=BRAIN_SEQUENCES),
    ),
    RouteSettings(name="retina", model="oct_grading", match={"Modality": ["OPT", "OP"]}),
)


def _unique(kind: str, names: list[str]) -> list[str]:
    """``names``, or ValueError naming those given more than once."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{kind} names must be unique; repeated: {repeated}")
    return names


class Settings(BaseSettings):
    """All of dicomnode's settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    node: NodeSettings = Field(default_factory=NodeSettings)  # the host name read at load
    security: SecuritySettings = SecuritySettings()
    api: ApiSettings = ApiSettings()
    routing: RoutingSettings = RoutingSettings()
    routes: tuple[RouteSettings, ...] = DEFAULT_ROUTES
    workers: tuple[WorkerSettings, ...] = (WorkerSettings(),)
    queue: QueueSettings = QueueSettings()
    models: ModelsSettings = ModelsSettings()
    destinations: tuple[DestinationSettings, ...] = ()
    sources: tuple[SourceSettings, ...] = ()
    results: ResultsSettings = ResultsSettings()
    notifications: tuple[NotificationSettings, ...] = ()

    @model_validator(mode="after")
    def _routes_consistent(self) -> Settings:
        names = _unique("route", [route.name for route in self.routes])
        if self.routing.fallback is not None and self.routing.fallback not in names:
            raise ValueError(
                f"routing.fallback {self.routing.fallback!r} names no route (routes: {names})"
            )
        targets = _unique("destination", [destination.name for destination in self.destinations])
        for route in self.routes:
            unknown = [name for name in route.destinations if name not in targets]
            if unknown:
                raise ValueError(
                    f"route {route.name!r} sends to {unknown}, which no [[destinations]] "
                    f"names (destinations: {targets})"
                )
        _unique("notification", [notification.name for notification in self.notifications])
        for notification in self.notifications:
            unknown = [name for name in notification.routes if name not in names]
            if unknown:
                raise ValueError(
                    f"notification {notification.name!r} names routes {unknown}, which are "
                    f"not configured (routes: {names})"
                )
        sources = _unique("source", [source.name for source in self.sources])
        for route in self.routes:
            if route.priors and route.priors.source and route.priors.source not in sources:
                raise ValueError(
                    f"route {route.name!r} takes priors from {route.priors.source!r}, which no "
                    f"[[sources]] names (sources: {sources})"
                )
        return self

    def destination(self, name: str) -> DestinationSettings:
        """The destination called ``name``; ConfigError naming the known ones if none is."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        known = [d.name for d in self.destinations]
        raise ConfigError(f"no destination {name!r} is configured (destinations: {known})")

    def source(self, name: str) -> SourceSettings:
        """The source called ``name``; ConfigError naming the known ones if none is."""
        for source in self.sources:
            if source.name == name:
                return source
        known = [s.name for s in self.sources]
        raise ConfigError(f"no source {name!r} is configured (sources: {known})")

    def route(self, name: str) -> RouteSettings:
        """The route called ``name``; ConfigError naming the known ones if none is."""
        for route in self.routes:
            if route.name == name:
                return route
        known = [r.name for r in self.routes]
        raise ConfigError(f"no route {name!r} is configured (routes: {known})")

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
