"""A streaming multipart parser (RFC 2046 5.1, as multipart/related uses it, RFC 2387).

Fed the body a chunk at a time, it returns what each chunk completed: a part's headers, its
data, its end. It holds at most one delimiter's worth of data back (a boundary may straddle two
chunks) and one part's headers (bounded), so a body of any size parses in a small, fixed
memory. A body that breaks the syntax raises :class:`~dicomnode.errors.BodyInvalid` naming the
part and what is wrong; so does one that ends before its closing boundary (:meth:`finish`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

from dicomnode.errors import BodyInvalid

#: the most bytes of headers one part may have
MAX_HEADER_BYTES = 16 << 10
#: RFC 2046 5.1.1: 1 to 70 of these characters, the last not a space
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


@dataclass(frozen=True)
class MediaType:
    """A Content-Type value: ``type/subtype`` (lower case) and its parameters."""

    value: str
    params: dict[str, str]


def media_type(header: str) -> MediaType:
    """Parse a Content-Type header value (quoted parameters too); an empty one is ``""``."""
    message = Message()
    message["content-type"] = header
    value = header.split(";", 1)[0].strip().lower()
    params = {
        key.lower(): str(val) for key, val in (message.get_params(header="content-type") or [])[1:]
    }
    return MediaType(value, params)


def boundary_of(content_type: MediaType) -> bytes:
    """The boundary of a multipart Content-Type; BodyInvalid when it has none or a bad one."""
    boundary = content_type.params.get("boundary")
    if not boundary:
        raise BodyInvalid("the Content-Type has no boundary parameter (RFC 2046 5.1.1)")
    if not _BOUNDARY.fullmatch(boundary):
        raise BodyInvalid(
            f"the boundary {boundary[:80]!r} is not valid: 1 to 70 letters, digits or "
            "'()+_,-./:=? (RFC 2046 5.1.1)"
        )
    return boundary.encode("ascii")


@dataclass(frozen=True)
class PartStart:
    """A part begins: its headers, names in lower case."""

    number: int
    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    """Data of the current part: a view of the chunk fed (valid until the caller drops it)."""

    data: bytes | memoryview


@dataclass(frozen=True)
class PartEnd:
    number: int


Event = PartStart | PartData | PartEnd

_PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)


class MultipartParser:
    """Parses one multipart body fed in chunks; see the module docstring."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"\r\n--" + boundary
        # a body may start with the delimiter itself, without the CRLF before it
        self._buffer = bytearray(b"\r\n")
        #: in a part's data: its last bytes, which may begin the delimiter the next chunk ends
        self._tail = b""
        self._state = _PREAMBLE
        self.parts = 0

    @property
    def done(self) -> bool:
        """The closing boundary has been read."""
        return self._state == _DONE

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` completes. A part's data is not copied: the bulk of the
        body passes as views of the chunks fed; the boundaries and headers between parts go
        through a small buffer."""
        events: list[Event] = []
        while chunk and self._state != _DONE:  # after the closing boundary: the epilogue, ignored
            if self._state == _BODY:
                chunk = self._body(chunk, events)
                continue
            self._buffer += chunk
            while self._state != _BODY and self._step(events):
                pass
            chunk = b""
            if self._state == _BODY and self._buffer:  # the first data of a part
                chunk = bytes(self._buffer)
                self._buffer.clear()
        return events

    def finish(self) -> None:
        """The body has ended: BodyInvalid unless its closing boundary came."""
        if self._state == _DONE:
            return
        if self._state == _PREAMBLE:
            raise BodyInvalid("the body holds no boundary line: no part at all")
        if self._state == _BODY:
            raise BodyInvalid(
                f"the body ends inside part {self.parts}: it is truncated (no boundary after it)"
            )
        if self._state == _HEADERS:
            raise BodyInvalid(f"the body ends inside the headers of part {self.parts}")
        raise BodyInvalid("the body ends without its closing boundary ('--' after the last one)")

    def _step(self, events: list[Event]) -> bool:
        """Advance by one state; False when more data is needed."""
        buffer = self._buffer
        if self._state == _PREAMBLE:
            found = buffer.find(self.delimiter)
            if found < 0:
                # keep what could be the start of the delimiter
                del buffer[: max(0, len(buffer) - len(self.delimiter) + 1)]
                return False
            del buffer[: found + len(self.delimiter)]
            self._state = _AFTER_DELIMITER
            return True
        if self._state == _AFTER_DELIMITER:
            return self._after_delimiter(events)
        if self._state == _HEADERS:
            return self._headers(events)
        return False

    def _after_delimiter(self, events: list[Event]) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        if buffer[:2] == b"--":
            del buffer[:]
            self._state = _DONE
            return False
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > 256:
                raise BodyInvalid(f"the boundary line before part {self.parts + 1} does not end")
            return False
        if buffer[:end].strip(b" \t"):  # only transport padding may follow a boundary
            raise BodyInvalid(
                f"the boundary line before part {self.parts + 1} is followed by "
                f"{bytes(buffer[: min(end, 40)])!r}: not a boundary (a wrong boundary?)"
            )
        del buffer[: end + 2]
        self.parts += 1
        self._state = _HEADERS
        return True

    def _headers(self, events: list[Event]) -> bool:
        buffer = self._buffer
        if buffer[:2] == b"\r\n":  # no headers at all
            end, skip = 0, 2
        else:
            end, skip = buffer.find(b"\r\n\r\n"), 4
        if end < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise BodyInvalid(
                    f"the headers of part {self.parts} are longer than {MAX_HEADER_BYTES} bytes"
                )
            return False
        if end > MAX_HEADER_BYTES:
            raise BodyInvalid(
                f"the headers of part {self.parts} are longer than {MAX_HEADER_BYTES} bytes"
            )
        headers = _parse_headers(bytes(buffer[:end]), self.parts)
        del buffer[: end + skip]
        events.append(PartStart(self.parts, headers))
        self._state = _BODY
        return True

    def _body(self, chunk: bytes, events: list[Event]) -> bytes:
        """Pass ``chunk`` on as the part's data up to the delimiter; return what follows the
        delimiter (empty: all of it is data, its last bytes held back as the tail)."""
        delimiter, tail = self.delimiter, self._tail
        keep = len(delimiter) - 1
        if tail:  # a delimiter that begins in the tail ends in the chunk's first bytes
            found = (tail + chunk[:keep]).find(delimiter)
            if found >= 0:
                if found:
                    events.append(PartData(tail[:found]))
                return self._end_part(events, chunk[found + len(delimiter) - len(tail) :])
        found = chunk.find(delimiter)
        if found >= 0:
            if tail:
                events.append(PartData(tail))
            if found:
                events.append(PartData(memoryview(chunk)[:found]))
            return self._end_part(events, chunk[found + len(delimiter) :])
        if len(chunk) >= keep:
            if tail:
                events.append(PartData(tail))
            if len(chunk) > keep:
                events.append(PartData(memoryview(chunk)[: len(chunk) - keep]))
            self._tail = chunk[len(chunk) - keep :]
        else:
            joined = tail + chunk
            if len(joined) > keep:
                events.append(PartData(joined[: len(joined) - keep]))
            self._tail = joined[-keep:]
        return b""

    def _end_part(self, events: list[Event], rest: bytes) -> bytes:
        self._tail = b""
        events.append(PartEnd(self.parts))
        self._state = _AFTER_DELIMITER
        return rest


def _parse_headers(raw: bytes, number: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not raw:
        return headers
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BodyInvalid(f"the headers of part {number} are not ASCII") from None
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and headers:  # a folded header continues the last one
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise BodyInvalid(f"part {number} has a malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return headers
