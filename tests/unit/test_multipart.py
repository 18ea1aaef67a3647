"""The streaming multipart parser of STOW-RS: the same parts whatever the chunking, and every
way a body can break refused with a reason that names the part."""

from __future__ import annotations

import re

import pytest

from dicomnode.api.multipart import (
    MAX_HEADER_BYTES,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
    media_type,
)
from dicomnode.errors import BodyInvalid

BOUNDARY = b"0f3cf5c0-70e0-41ef"


def body(*parts: bytes, boundary: bytes = BOUNDARY, preamble: bytes = b"") -> bytes:
    """A multipart/related body of application/dicom parts, as dicomweb-client writes one."""
    out = preamble
    for part in parts:
        out += b"\r\n--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + part
    return out + b"\r\n--" + boundary + b"--\r\nepilogue"


def parse(data: bytes, chunk: int) -> list[tuple[dict[str, str], bytes]]:
    """Each part's headers and data, the body fed ``chunk`` bytes at a time."""
    parser = MultipartParser(BOUNDARY)
    parts: list[tuple[dict[str, str], bytes]] = []
    current = b""
    for start in range(0, len(data), chunk):
        for event in parser.feed(data[start : start + chunk]):
            if isinstance(event, PartStart):
                headers, current = event.headers, b""
            elif isinstance(event, PartData):
                current += event.data
            elif isinstance(event, PartEnd):
                parts.append((headers, current))
    parser.finish()
    assert parser.done
    return parts


@pytest.mark.parametrize("chunk", [1, 2, 7, 23, 64, 4096])
def test_the_same_parts_whatever_the_chunking(chunk: int) -> None:
    # data that holds pieces of the delimiter (CRLF, dashes, the boundary without its dashes)
    payloads = [b"DICM" + bytes(range(256)) * 3, b"\r\n--0f3cf5c0\r\n-", b"", b"x" * 1000]
    parts = parse(body(*payloads, preamble=b"ignored preamble"), chunk)
    assert [data for _, data in parts] == payloads
    assert all(headers == {"content-type": "application/dicom"} for headers, _ in parts)


def test_a_body_may_start_with_its_delimiter_and_parts_may_have_no_headers() -> None:
    data = b"--" + BOUNDARY + b"  \r\n\r\nabc\r\n--" + BOUNDARY + b"--"
    assert parse(data, 3) == [({}, b"abc")]


def test_folded_headers_are_joined() -> None:
    data = b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom;\r\n transfer-syntax=*\r\n\r\n"
    data += b"x\r\n--" + BOUNDARY + b"--"
    ((headers, _),) = parse(data, 5)
    assert headers == {"content-type": "application/dicom; transfer-syntax=*"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (body(b"abc", boundary=b"another-boundary"), "no boundary line"),
        (body(b"abc", b"defgh")[:-30], "ends inside part 2: it is truncated"),
        (b"--" + BOUNDARY + b"\r\nContent-Type: appl", "inside the headers of part 1"),
        (b"--" + BOUNDARY + b"\r\n\r\nabc\r\n--" + BOUNDARY, "without its closing boundary"),
        (b"--" + BOUNDARY + b"X\r\n\r\nabc", "before part 1 is followed by b'X': not a boundary"),
        (b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"--" + BOUNDARY + b"\r\nA: \xff\r\n\r\n", "not ASCII"),
        (b"", "no boundary line"),
    ],
)
def test_broken_bodies_are_refused_naming_the_part(data: bytes, reason: str) -> None:
    parser = MultipartParser(BOUNDARY)
    with pytest.raises(BodyInvalid, match=re.escape(reason)):
        parser.feed(data)
        parser.finish()


def test_headers_are_bounded() -> None:
    parser = MultipartParser(BOUNDARY)
    parser.feed(b"--" + BOUNDARY + b"\r\n")
    with pytest.raises(BodyInvalid, match=f"longer than {MAX_HEADER_BYTES} bytes"):
        for _ in range(MAX_HEADER_BYTES // 1000 + 2):
            parser.feed(b"X-Padding: " + b"a" * 989 + b"\r\n")


def test_the_preamble_is_not_kept_in_memory() -> None:
    parser = MultipartParser(BOUNDARY)
    for _ in range(1000):
        assert parser.feed(b"p" * 10_000) == []
    assert len(parser._buffer) < len(parser.delimiter)


def test_content_types_and_boundaries() -> None:
    parsed = media_type('Multipart/Related; type="application/dicom"; boundary="a b:c"')
    assert parsed.value == "multipart/related"
    assert parsed.params == {"type": "application/dicom", "boundary": "a b:c"}
    assert boundary_of(parsed) == b"a b:c"
    assert media_type("").value == ""
    with pytest.raises(BodyInvalid, match="no boundary parameter"):
        boundary_of(media_type("multipart/related; type=application/dicom"))
    with pytest.raises(BodyInvalid, match="is not valid"):
        boundary_of(media_type("multipart/related; boundary=" + "x" * 71))
    with pytest.raises(BodyInvalid, match="is not valid"):
        boundary_of(media_type('multipart/related; boundary="a\\"b"'))
