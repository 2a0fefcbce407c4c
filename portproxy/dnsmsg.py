"""DNS messages, as much of them as a forwarder needs (sans-IO: bytes in, values out).

Theory of operation: the DNS proxy never looks past the question.  A query is the
12-byte header (RFC 1035 4.1.1) and exactly one question; the rest (EDNS's OPT record,
say) is forwarded untouched with only the id rewritten.  An upstream answer is accepted
when it carries the id the proxy chose, has QR set, opcode QUERY and echoes the very
question asked (RFC 5452 9.1; names compared without regard to ASCII case).

Malformed input is refused with :class:`MessageError`, whose ``reply`` is what the client
should get: FORMERR (or NOTIMP for an opcode other than QUERY) when the header could be
read, nothing at all when it could not, or when the message is a response (answering a
response could start a loop between two servers).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "HEADER_LEN",
    "Header",
    "MessageError",
    "Query",
    "Question",
    "Rcode",
    "check_answer",
    "error_reply",
    "parse_query",
    "parse_question",
    "response",
    "servfail",
    "with_id",
]

HEADER_LEN = 12
MAX_NAME = 255          # wire length of a name, the final root label included
MAX_LABEL = 63
MAX_POINTERS = 32       # compression pointers followed in one name

QR = 0x8000
OPCODE_SHIFT = 11
OPCODE_MASK = 0x7800
TC = 0x0200
RD = 0x0100
RA = 0x0080
RCODE_MASK = 0x000F
OPCODE_QUERY = 0

_HEADER = struct.Struct("!6H")
_TAIL = struct.Struct("!2H")


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class MessageError(ValueError):
    """A message that cannot be used; ``reply`` is the answer owed to its sender, if any."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Header:
    id: int
    flags: int
    qdcount: int = 0
    ancount: int = 0
    nscount: int = 0
    arcount: int = 0

    @classmethod
    def parse(cls, data: bytes) -> Header:
        if len(data) < HEADER_LEN:
            raise MessageError(f"{len(data)} bytes: shorter than a DNS header")
        return cls(*_HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return _HEADER.pack(self.id, self.flags, self.qdcount, self.ancount, self.nscount,
                            self.arcount)

    @property
    def qr(self) -> bool:
        return bool(self.flags & QR)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> OPCODE_SHIFT

    @property
    def tc(self) -> bool:
        return bool(self.flags & TC)

    @property
    def rd(self) -> bool:
        return bool(self.flags & RD)

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK


@dataclass(frozen=True, slots=True)
class Question:
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int = 1

    @property
    def name(self) -> str:
        """The name in presentation form (for logs): dots between labels, odd bytes escaped."""
        if not self.labels:
            return "."
        return ".".join(_escape(label) for label in self.labels) + "."

    def same(self, other: Question) -> bool:
        """The same question, names compared without regard to ASCII case (RFC 4343)."""
        return (self.qtype == other.qtype and self.qclass == other.qclass
                and len(self.labels) == len(other.labels)
                and all(a.lower() == b.lower()
                        for a, b in zip(self.labels, other.labels, strict=True)))

    def pack(self) -> bytes:
        """The question in wire form, without compression."""
        parts = [bytes([len(label)]) + label for label in self.labels]
        return b"".join(parts) + b"\0" + _TAIL.pack(self.qtype, self.qclass)


@dataclass(frozen=True, slots=True)
class Query:
    header: Header
    question: Question

    @property
    def id(self) -> int:
        return self.header.id


def _escape(label: bytes) -> str:
    out = []
    for byte in label:
        char = chr(byte)
        if char in ".\\":
            out.append("\\" + char)
        elif 0x21 <= byte <= 0x7E:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def _parse_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """The labels of the name at ``offset`` and the offset after it (pointers followed)."""
    labels: list[bytes] = []
    length = 1                      # the root label
    end = -1                        # where the name ends in the message (first pointer)
    pointers = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise MessageError("name runs past the end of the message")
        size = data[pos]
        if size == 0:
            pos += 1
            break
        kind = size & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise MessageError("compression pointer cut short")
            target = ((size & 0x3F) << 8) | data[pos + 1]
            pointers += 1
            if target >= pos or pointers > MAX_POINTERS:
                raise MessageError("compression pointer loops or points forward")
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if kind:
            raise MessageError(f"unsupported label type 0x{kind:02x}")
        label = data[pos + 1:pos + 1 + size]
        if len(label) != size:
            raise MessageError("label runs past the end of the message")
        length += size + 1
        if length > MAX_NAME:
            raise MessageError("name longer than 255 bytes")
        labels.append(bytes(label))
        pos += 1 + size
    return tuple(labels), (pos if end < 0 else end)


def parse_question(data: bytes, offset: int = HEADER_LEN) -> tuple[Question, int]:
    """The question at ``offset`` and the offset after it."""
    labels, pos = _parse_name(data, offset)
    if pos + _TAIL.size > len(data):
        raise MessageError("question cut short")
    qtype, qclass = _TAIL.unpack_from(data, pos)
    return Question(labels, qtype, qclass), pos + _TAIL.size


def error_reply(header: Header, rcode: Rcode) -> bytes:
    """A reply to ``header`` with ``rcode`` and no sections (FORMERR, NOTIMP)."""
    flags = QR | (header.flags & (OPCODE_MASK | RD)) | RA | int(rcode)
    return Header(header.id, flags).pack()


def parse_query(data: bytes) -> Query:
    """The header and question of a query, or :class:`MessageError` (see the module)."""
    header = Header.parse(data)
    if header.qr:
        raise MessageError("a response, not a query")
    if header.opcode != OPCODE_QUERY:
        raise MessageError(f"opcode {header.opcode}", error_reply(header, Rcode.NOTIMP))
    if header.qdcount != 1:
        raise MessageError(f"{header.qdcount} questions",
                           error_reply(header, Rcode.FORMERR))
    try:
        question, _ = parse_question(data)
    except MessageError as exc:
        raise MessageError(str(exc), error_reply(header, Rcode.FORMERR)) from None
    return Query(header, question)


def response(query: Query, rcode: Rcode) -> bytes:
    """An answer to ``query`` with ``rcode``: same id, RD copied, RA set, question echoed."""
    flags = QR | (query.header.flags & RD) | RA | int(rcode)
    return Header(query.id, flags, qdcount=1).pack() + query.question.pack()


def servfail(query: Query) -> bytes:
    return response(query, Rcode.SERVFAIL)


def check_answer(data: bytes, id: int, question: Question) -> Header:
    """The header of ``data`` if it answers the query ``id`` asking ``question``."""
    header = Header.parse(data)
    if header.id != id:
        raise MessageError(f"id {header.id}, not {id}")
    if not header.qr or header.opcode != OPCODE_QUERY:
        raise MessageError("not a response to a query")
    if header.qdcount != 1:
        raise MessageError(f"{header.qdcount} questions")
    echoed, _ = parse_question(data)
    if not echoed.same(question):
        raise MessageError(f"question {echoed.name}, not {question.name}")
    return header


def with_id(message: bytes, id: int) -> bytes:
    """``message`` with its id replaced."""
    if len(message) < 2:
        raise MessageError("no room for an id")
    return id.to_bytes(2, "big") + message[2:]
