"""portproxy.dnsmsg: header and question parsing, SERVFAIL/FORMERR, answer checks."""

from __future__ import annotations

import struct

import pytest

from portproxy import dnsmsg
from portproxy.dnsmsg import Header, MessageError, Question, Rcode

A, AAAA, IN = 1, 28, 1


def name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def message(id: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ar: int = 0,
            body: bytes | None = None) -> bytes:
    if body is None:
        body = name(b"example", b"test") + struct.pack("!HH", A, IN)
    return struct.pack("!6H", id, flags, qd, an, 0, ar) + body


OPT = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)   # EDNS0 OPT, as dig sends it


def answer_to(query: bytes, rcode: int = 0, flags: int = 0x8180, id: int | None = None,
              tc: bool = False) -> bytes:
    qid = struct.unpack_from("!H", query)[0] if id is None else id
    body = query[12:]
    rr = b"\xc0\x0c" + struct.pack("!HHIH", A, IN, 60, 4) + bytes([198, 51, 100, 80])
    return struct.pack("!6H", qid, flags | rcode | (0x0200 if tc else 0), 1, 1, 0, 0) \
        + body + rr


# -- header ----------------------------------------------------------------------------


def test_header_fields() -> None:
    header = Header.parse(message(flags=0x8000 | (2 << 11) | 0x0200 | 0x0100 | 3))
    assert header.id == 0x1234
    assert header.qr and header.tc and header.rd
    assert header.opcode == 2 and header.rcode == 3
    assert header.qdcount == 1
    assert Header.parse(header.pack()) == header


@pytest.mark.parametrize("size", [0, 1, 11])
def test_short_header_is_refused_without_a_reply(size: int) -> None:
    with pytest.raises(MessageError) as info:
        dnsmsg.parse_query(message()[:size])
    assert info.value.reply is None


# -- queries ---------------------------------------------------------------------------


def test_parse_query() -> None:
    query = dnsmsg.parse_query(message() + OPT)
    assert query.id == 0x1234
    assert query.question == Question((b"example", b"test"), A, IN)
    assert query.question.name == "example.test."


def test_parse_root_and_odd_labels() -> None:
    root = dnsmsg.parse_query(message(body=b"\0" + struct.pack("!HH", 2, IN)))
    assert root.question.labels == () and root.question.name == "."
    odd = dnsmsg.parse_query(message(body=name(b"a.b", b"\x00\xff") + struct.pack("!HH", A, IN)))
    assert odd.question.name == "a\\.b.\\000\\255."


def test_question_name_with_a_pointer_into_the_header() -> None:
    # "a" then a pointer to offset 4, the high byte of QDCOUNT (0): the root.  Legal, odd.
    data = message(body=b"\x01a\xc0\x04" + struct.pack("!HH", A, IN))
    query = dnsmsg.parse_query(data)
    assert query.question == Question((b"a",), A, IN)
    reply = dnsmsg.servfail(query)
    assert reply[12:] == name(b"a") + struct.pack("!HH", A, IN)      # sent uncompressed


def test_pointer_loop_is_refused() -> None:
    with pytest.raises(MessageError, match="loops"):
        dnsmsg.parse_query(message(body=b"\x01a\xc0\x0c" + struct.pack("!HH", A, IN)))


def test_pointer_to_an_earlier_name() -> None:
    first = name(b"example", b"test")
    data = b"\0" * 12 + first + b"\x03www\xc0\x0c" + struct.pack("!HH", AAAA, IN)
    question, end = dnsmsg.parse_question(data, 12 + len(first))
    assert question == Question((b"www", b"example", b"test"), AAAA, IN)
    assert end == len(data)


@pytest.mark.parametrize("body, why", [
    (b"\xc0\x0c" + struct.pack("!HH", A, IN), "loops"),           # points at itself
    (b"\xc0\x20" + struct.pack("!HH", A, IN), "forward"),         # points forward
    (b"\x07example", "past the end"),
    (b"\x07exam", "past the end"),
    (name(b"x"), "cut short"),                                      # no type and class
    (b"\x41" + b"a" * 65 + b"\0" + struct.pack("!HH", A, IN), "label type"),
    (b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\0" + struct.pack("!HH", A, IN),
     "255"),
    (b"\xc0", "cut short"),
])
def test_malformed_question_gets_formerr(body: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why) as info:
        dnsmsg.parse_query(message(body=body))
    reply = info.value.reply
    assert reply is not None
    header = Header.parse(reply)
    assert (header.id, header.qr, header.rcode, header.rd) == (0x1234, True, Rcode.FORMERR, True)
    assert header.qdcount == 0 and len(reply) == 12


def test_name_of_exactly_255_bytes_is_fine() -> None:
    labels = [b"a" * 63] * 3 + [b"b" * 61]          # 3*64 + 62 + 1 = 255
    query = dnsmsg.parse_query(message(body=name(*labels) + struct.pack("!HH", A, IN)))
    assert len(query.question.pack()) == 255 + 4


@pytest.mark.parametrize("qd", [0, 2])
def test_question_count_other_than_one_gets_formerr(qd: int) -> None:
    with pytest.raises(MessageError) as info:
        dnsmsg.parse_query(message(qd=qd))
    assert info.value.reply is not None
    assert Header.parse(info.value.reply).rcode == Rcode.FORMERR


def test_other_opcode_gets_notimp() -> None:
    with pytest.raises(MessageError) as info:
        dnsmsg.parse_query(message(flags=(5 << 11)))          # UPDATE
    assert info.value.reply is not None
    header = Header.parse(info.value.reply)
    assert header.rcode == Rcode.NOTIMP and header.opcode == 5 and not header.rd


def test_a_response_is_dropped_not_answered() -> None:
    with pytest.raises(MessageError, match="response") as info:
        dnsmsg.parse_query(message(flags=0x8180))
    assert info.value.reply is None


# -- replies ---------------------------------------------------------------------------


@pytest.mark.parametrize("rd", [True, False])
def test_servfail_echoes_id_question_and_rd(rd: bool) -> None:
    data = message(id=0xBEEF, flags=0x0100 if rd else 0) + OPT
    reply = dnsmsg.servfail(dnsmsg.parse_query(data))
    header = Header.parse(reply)
    assert header.id == 0xBEEF and header.qr and header.rd is rd
    assert header.flags & dnsmsg.RA and header.rcode == Rcode.SERVFAIL
    assert (header.qdcount, header.ancount, header.nscount, header.arcount) == (1, 0, 0, 0)
    assert reply[12:] == name(b"example", b"test") + struct.pack("!HH", A, IN)


def test_with_id() -> None:
    data = message(id=1) + OPT
    assert dnsmsg.with_id(data, 0xABCD) == b"\xab\xcd" + data[2:]
    with pytest.raises(MessageError):
        dnsmsg.with_id(b"\x01", 2)


# -- answers ---------------------------------------------------------------------------


def test_check_answer_accepts_the_answer() -> None:
    query = message(id=42) + OPT
    question = dnsmsg.parse_query(query).question
    header = dnsmsg.check_answer(answer_to(query), 42, question)
    assert header.ancount == 1 and header.rcode == 0


def test_check_answer_ignores_case() -> None:
    query = message(id=42)
    question = Question((b"EXAMPLE", b"Test"), A, IN)
    dnsmsg.check_answer(answer_to(query), 42, question)


@pytest.mark.parametrize("mutate, why", [
    (lambda a: a[:11], "shorter"),
    (lambda a: b"\x00\x2b" + a[2:], "id"),
    (lambda a: a[:2] + b"\x01\x80" + a[4:], "not a response"),     # QR clear
    (lambda a: a[:2] + b"\xa9\x80" + a[4:], "not a response"),     # opcode 5
    (lambda a: a[:4] + b"\x00\x00" + a[6:], "0 questions"),
    (lambda a: a.replace(b"\x07example", b"\x07exbmple"), "question"),
    (lambda a: a.replace(b"\x00\x01\x00\x01", b"\x00\x1c\x00\x01", 1), "question"),
    (lambda a: a[:20], "past the end"),
])
def test_check_answer_refuses_what_does_not_match(mutate: object, why: str) -> None:
    query = message(id=42)
    question = dnsmsg.parse_query(query).question
    assert callable(mutate)
    with pytest.raises(MessageError, match=why):
        dnsmsg.check_answer(mutate(answer_to(query)), 42, question)
