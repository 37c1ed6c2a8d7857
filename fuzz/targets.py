"""Fuzz targets: one function per parser that meets bytes from the outside.

Each target takes raw bytes, feeds them to doqproxy's code and checks what must
always hold; anything else it raises is a finding. They need no atheris, so the
regression tests replay saved inputs through them directly
(tests/fuzz_regressions/<target>/). ``SEEDS`` gives each a small starting corpus.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import dns.message
import dns.rrset

from doqproxy.cache.policy import AnswerCache
from doqproxy.dns import rewrite, validate, wire
from doqproxy.doq import framing
from doqproxy.upstream.tickets import TicketFile

OPCODES = frozenset({wire.OPCODE_QUERY, wire.OPCODE_NOTIFY})
CACHED = ("www.example.", "Example.ORG.", "a.b.c.d.test.", "x.")


def _check_error_reply(query: bytes, reply: bytes) -> None:
    assert len(reply) >= wire.HEADER_LEN, "error reply shorter than a header"
    assert reply[:2] == query[:2], "error reply has another ID"
    assert reply[2] & 0x80, "error reply without QR"


def target_validate(data: bytes) -> None:
    """The query validator on a raw datagram: a question or a rejection, never an exception."""
    outcome = validate.classify(data, OPCODES)
    if isinstance(outcome, validate.Rejected):
        if outcome.reply is not None:
            _check_error_reply(data, outcome.reply)
        return
    assert outcome.opcode in OPCODES
    assert outcome.question_end <= len(data)
    assert wire.parse_question(data).key == outcome.key


@functools.cache
def _cache() -> AnswerCache:
    """A cache holding a few answers, with a clock that never moves (always fresh)."""
    cache = AnswerCache(clock=lambda: 1000.0)
    for name in CACHED:
        for rdtype in ("A", "AAAA", "TXT"):
            query = dns.message.make_query(name, rdtype, use_edns=0)
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(name, 300, "IN", rdtype, _RDATA[rdtype]))
            question = wire.parse_question(query.to_wire())
            reply = response.to_wire()
            assert cache.store(question, reply, rewrite.check_response(reply, question))
    return cache


_RDATA = {"A": "192.0.2.1", "AAAA": "2001:db8::1", "TXT": '"hello"'}


def target_cache_fast_path(data: bytes) -> None:
    """The cache's fast path on a raw datagram, against the validator: a fast reply only
    for a query validation accepts, with its ID, QR set and its question."""
    for udp in (True, False):
        reply = _cache().fast_reply(data, udp)
        if reply is None:
            continue
        question = validate.classify(data, OPCODES)
        assert isinstance(question, wire.Question), f"fast reply to a rejected query: {question}"
        assert reply[:2] == data[:2], "fast reply has another ID"
        parsed = wire.parse_question(reply)
        assert parsed.flags & wire.FLAG_QR
        assert parsed.key == question.key, "fast reply answers another question"
        if udp:
            assert len(reply) <= max(wire.udp_payload_limit(question), wire.MIN_UDP_PAYLOAD)


_ASKED = wire.parse_question(dns.message.make_query("www.example.", "A").to_wire())


def target_doq_response(data: bytes) -> None:
    """DoQ stream bytes as an upstream sends them: the first byte says where the stream
    is cut into frames; the reader and the response checker must only raise their own
    errors."""
    if not data:
        return
    step = data[0] % 17 + 1
    stream = data[1:]
    reader = framing.StreamReader()
    message = None
    try:
        for offset in range(0, len(stream), step):
            chunk = stream[offset : offset + step]
            message = reader.feed(chunk, offset + step >= len(stream))
        if not stream:
            message = reader.feed(b"", True)
    except framing.DoqProtocolError:
        return
    assert message is not None
    assert framing.frame(message) == stream
    try:
        parsed = rewrite.check_response(message, _ASKED)
    except rewrite.ResponseMismatch:
        return
    assert parsed.key == _ASKED.key


def target_tickets(data: bytes) -> None:
    """The ticket-file loader: content that is not a tickets file is a ValueError only."""
    store = TicketFile(None)
    try:
        store.load_bytes(data)
    except ValueError:
        return
    for key in list(store._tickets):
        store.count(key)
        store.take(key)


@functools.cache
def _config_path() -> Path:
    # The loader reads the environment too: keep DOQPROXY_* out of what is fuzzed.
    for name in [name for name in os.environ if name.startswith("DOQPROXY_")]:
        del os.environ[name]
    directory = Path(tempfile.mkdtemp(prefix="doqproxy-fuzz-"))
    return directory / "doqproxy.toml"


def target_toml_config(data: bytes) -> None:
    """The TOML configuration loader, through the same path as check-config: a bad file
    is a click error (one line for the user), never another exception."""
    from doqproxy.cli import config
    from doqproxy.cli.forward import forward

    path = _config_path()
    path.write_bytes(data)
    try:
        config.parse(forward, ["--config", str(path)])
    except click.ClickException:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "validate": target_validate,
    "cache_fast_path": target_cache_fast_path,
    "doq_response": target_doq_response,
    "tickets": target_tickets,
    "toml_config": target_toml_config,
}


def _query(name: str, rdtype: str, **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


def _framed(message: bytes) -> bytes:
    return b"\x03" + framing.frame(message)


def _response(name: str) -> bytes:
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
    return response.to_wire()


def _ticket_seed() -> bytes:
    import datetime
    import json

    from aioquic.tls import CipherSuite, SessionTicket

    from doqproxy.upstream.tickets import ticket_to_json

    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    ticket = SessionTicket(
        age_add=1,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now,
        not_valid_before=now - datetime.timedelta(days=1),
        resumption_secret=b"s" * 32,
        server_name="doq.test",
        ticket=b"t" * 16,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"\x01")],
    )
    data = {"version": 1, "tickets": {"k": [ticket_to_json(ticket)]}, "tokens": {"k": "AAAA"}}
    return json.dumps(data).encode()


def seeds(name: str) -> list[bytes]:
    """A starting corpus for the target ``name``."""
    if name in ("validate", "cache_fast_path"):
        return [
            _query("www.example.", "A"),
            _query("www.example.", "A", use_edns=0),
            _query("Example.ORG.", "TXT", use_edns=0, want_dnssec=True),
            _query("x.", "AAAA", use_edns=0, payload=4096, options=[]),
            _query("a.b.c.d.test.", "ANY"),
        ]
    if name == "doq_response":
        return [_framed(_response("www.example.")), _framed(_response("other.example."))]
    if name == "tickets":
        return [_ticket_seed(), b'{"version": 1, "tickets": {}}']
    if name == "toml_config":
        example = Path(__file__).resolve().parent.parent / "contrib" / "doqproxy.toml.example"
        return [
            example.read_bytes(),
            b'upstream = "quic://127.0.0.1:853"\nlisten = ["127.0.0.1:5353"]\n',
            b'[[upstream]]\nurl = "quic://dns.example"\ntls-server-name = "dns.example"\n',
            b'upstream = "quic://127.0.0.1"\ncache-size = 10\nno-cache = true\n',
        ]
    raise KeyError(name)


def write_seeds(name: str, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(seeds(name)):
        (directory / f"seed-{n}").write_bytes(seed)
