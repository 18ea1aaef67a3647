"""HL7 v2.5 ORU^R01 to a RIS over MLLP, built with hl7apy and validated against the v2.5 message
structure before it goes; the RIS's ACK read back (MSA-1 ``AA``/``CA``: taken; ``AE``, ``AR``,
``CE``, ``CR``: refused, with its text).

The message: MSH (MSH-10, the message control id, is the notification's delivery id, the same
on every retry, so a RIS can drop a repeat), PID (patient id with its issuer, name, birth date,
sex, from the index), ORC and OBR (placer and filler order number: the accession; OBR-4 the
model; OBR-7 the study's date and time; OBR-22 when the outcome was decided; OBR-25 ``P``
preliminary or ``F`` final, ``X`` when the job failed), then OBX segments: the Study Instance
UID, the outcome in a line, and one per finding (OBX-3 its finding type's code, OBX-4 its
number, OBX-5 its measurements, probability and grade in words, OBX-8 ``AA`` critical, ``A``
positive, ``N`` not).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dicomnode.errors import NotificationRefused, NotifyError
from dicomnode.notify.message import describe_finding, summary

if TYPE_CHECKING:
    import ssl

    from dicomnode.config import NotificationSettings

#: MLLP framing: a block starts with VT and ends with FS CR
START, END = b"\x0b", b"\x1c\x0d"
#: the longest ACK read (a real one is a few hundred bytes)
MAX_ACK_BYTES = 1 << 20
#: an ST value's longest (HL7 v2.5, 2.A.74)
ST_CHARS = 199
#: the codes OBX-3 and OBR-4 use for what is not a finding's own code
STUDY_UID = ("110180", "Study Instance UID", "DCM")
LOCAL_SCHEME = "99DICOMNODE"
ACCEPTED = ("AA", "CA")


def escape(value: Any) -> str:
    """``value`` as HL7 text: the separators and the escape character escaped (\\F\\ \\S\\
    \\T\\ \\R\\ \\E\\), line breaks as spaces."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\E\\")
    for char, sequence in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, sequence)
    return " ".join(text.split("\r")).replace("\n", " ")


def components(*values: Any) -> str:
    """Components of one field, each escaped: ``components("1", "Nodule", "SCT")``."""
    return "^".join(escape(v) for v in values).rstrip("^")


def _clip(text: str, chars: int = ST_CHARS) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def hl7_time(iso: str | None) -> str:
    """An ISO time (UTC) as HL7 DTM, ``20261207101530+0000``."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%Y%m%d%H%M%S%z")


def study_time(study: Mapping[str, Any]) -> str:
    """The study's DICOM date and time (DA, TM) as HL7 DTM: ``20261207101530``."""
    date = "".join(c for c in str(study.get("study_date") or "") if c.isdigit())[:8]
    clock = "".join(c for c in str(study.get("study_time") or "").split(".")[0] if c.isdigit())
    return date + clock[:6] if len(date) == 8 else ""


def person_name(dicom_name: str) -> str:
    """A DICOM PN (``DOE^JOHN^^DR``, its alphabetic group) as an HL7 XPN: the same component
    order (family, given, middle, prefix, suffix), each escaped."""
    return components(*str(dicom_name or "").split("=")[0].split("^"))


def _flag(finding: Mapping[str, Any]) -> str:
    if finding.get("critical"):
        return "AA"
    return "A" if finding.get("positive") else "N"


def build_oru(settings: NotificationSettings, context: Mapping[str, Any], control_id: str) -> str:
    """The ORU^R01 of ``context`` as ER7 text (segments ended by CR), validated strictly
    against HL7 v2.5's ORU_R01 structure (NotifyError naming what is wrong)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.core import Message
    from hl7apy.exceptions import HL7apyException

    job = context.get("job") or {}
    study = context.get("study") or {}
    result = context.get("result") or {}
    failed = context.get("event") == "failed"
    status = "X" if failed else settings.result_status
    accession = escape(study.get("accession_number") or "")
    try:
        message = Message("ORU_R01", version="2.5", validation_level=VALIDATION_LEVEL.STRICT)
        msh = message.msh
        msh.msh_3 = escape(settings.sending_application)
        msh.msh_4 = escape(settings.sending_facility)
        msh.msh_5 = escape(settings.receiving_application)
        msh.msh_6 = escape(settings.receiving_facility)
        msh.msh_7 = hl7_time(context.get("at"))
        msh.msh_9 = "ORU^R01^ORU_R01"
        msh.msh_10 = escape(control_id)
        msh.msh_11 = "P"
        msh.msh_12 = "2.5"
        msh.msh_18 = "UNICODE UTF-8"
        patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
        pid = patient_result.add_group("ORU_R01_PATIENT").pid
        pid.pid_1 = "1"
        pid.pid_3 = components(study.get("patient_id") or "", "", "",
                               study.get("issuer_of_patient_id") or "")  # fmt: skip
        pid.pid_5 = person_name(study.get("patient_name") or "")
        pid.pid_7 = "".join(c for c in str(study.get("patient_birth_date") or "") if c.isdigit())
        pid.pid_8 = escape(study.get("patient_sex") or "")
        order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
        order.orc.orc_1 = "RE"
        order.orc.orc_2 = accession
        order.orc.orc_3 = accession
        obr = order.obr
        obr.obr_1 = "1"
        obr.obr_2 = accession
        obr.obr_3 = accession
        model = str(result.get("model") or job.get("model") or "")
        obr.obr_4 = components(model, f"{model} AI analysis", LOCAL_SCHEME)
        obr.obr_7 = study_time(study)
        obr.obr_22 = hl7_time(context.get("at"))
        obr.obr_25 = status
        lines: list[tuple[Sequence[str], str, str, str]] = [
            (STUDY_UID, "", str(job.get("study_instance_uid") or ""), ""),
            ((model, "AI result", LOCAL_SCHEME), "", summary(context), ""),
        ]
        for number, finding in enumerate(() if failed else context.get("findings") or (), 1):
            code = finding.get("finding_type") or {}
            concept: Sequence[str] = (
                code.get("value", ""),
                code.get("meaning", ""),
                code.get("scheme", ""),
            )
            lines.append((concept, str(number), describe_finding(finding), _flag(finding)))
        for index, (codes, sub_id, text, flag) in enumerate(lines, 1):
            obx = order.add_group("ORU_R01_OBSERVATION").obx
            obx.obx_1 = str(index)
            obx.obx_2 = "ST"
            obx.obx_3 = components(*codes)
            if sub_id:
                obx.obx_4 = sub_id
            obx.obx_5 = escape(_clip(text))
            if flag:
                obx.obx_8 = flag
            obx.obx_11 = status
        message.validate()
        return str(message.to_er7())
    except HL7apyException as exc:
        raise NotifyError(
            f"the ORU^R01 of job {job.get('id')} is not valid HL7 v2.5: {exc}"
        ) from exc


def read_ack(answer: bytes, control_id: str) -> str:
    """The ACK's verdict: its MSA-1 (AA or CA) when it accepted the message ``control_id``;
    NotificationRefused with its code and text (MSA-3, the ERR segment) when it did not."""
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    text = answer.decode("utf-8", errors="replace").strip()
    try:
        ack = parse_message(text.replace("\n", "\r"), find_groups=False)
        code = str(ack.msa.msa_1.value).strip()
        acked = str(ack.msa.msa_2.value).strip()
        reason = str(ack.msa.msa_3.value).strip() if ack.msa.msa_3.value else ""
        errors = [segment.to_er7() for segment in ack.children if segment.name == "ERR"]
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise NotificationRefused(f"the answer is not an HL7 ACK ({exc}): {text[:200]!r}") from exc
    if code not in ACCEPTED:
        detail = "; ".join(p for p in (reason, *errors) if p)
        raise NotificationRefused(f"NAK {code}" + (f": {detail[:300]}" if detail else ""))
    if acked and acked != control_id:
        raise NotificationRefused(f"ACK {code} for message {acked!r}, not {control_id!r}")
    return code


def exchange(
    host: str,
    port: int,
    message: bytes,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> bytes:
    """Send one MLLP block and return the block that answers it, all within ``timeout``
    seconds (NotifyError when the peer is not reached, closes or stays silent)."""
    deadline = time.monotonic() + timeout
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context else raw
            sock.sendall(START + message + END)
            buffer = b""
            while END not in buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    raise NotifyError(f"{where} closed the connection without an ACK")
                buffer += chunk
                if len(buffer) > MAX_ACK_BYTES:
                    raise NotifyError(f"{where} answered more than {MAX_ACK_BYTES} bytes")
    except TimeoutError as exc:
        raise NotifyError(f"{where} sent no ACK within {timeout:g} s") from exc
    except OSError as exc:
        raise NotifyError(f"{where} not reached: {type(exc).__name__}: {exc}") from exc
    start = buffer.find(START)
    return buffer[start + 1 if start >= 0 else 0 : buffer.index(END)]


def deliver(
    settings: NotificationSettings,
    context: Mapping[str, Any],
    delivery_id: str,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """Send the ORU^R01 of ``context`` to the RIS and read its ACK; ``ACK AA`` when taken."""
    assert settings.host is not None and settings.port is not None
    message = build_oru(settings, context, delivery_id).encode("utf-8")
    answer = exchange(
        settings.host, settings.port, message, timeout=settings.timeout_s, ssl_context=ssl_context
    )
    return f"ACK {read_ack(answer, delivery_id)}"
