"""A lying DoQ upstream against the default (qh3) engine (attack session 6): answers
cut short, padded with garbage, without FIN, server-opened streams, odd closes, and
a flood of concurrent queries over all of them. Every query gets an answer (SERVFAIL
is fine), the forwarder stays up, and nothing logs a traceback."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import dns.message
import dns.rcode

from . import doq_fixture
from .conftest import Certs
from .doq_fixture import DoqTestUpstream

_original = doq_fixture._DoqServerProtocol._handle


async def _hostile(
    self: doq_fixture._DoqServerProtocol, stream_id: int, wire: bytes, early: bool
) -> None:
    query = dns.message.from_wire(wire)
    name = query.question[0].name.to_text().lower()
    quic = self._quic
    body = dns.message.make_response(query).to_wire()
    body = b"\x00\x00" + body[2:]
    if name.startswith("trunc"):
        quic.send_stream_data(stream_id, struct.pack("!H", 500) + body[:10], end_stream=True)
    elif name.startswith("zero"):
        quic.send_stream_data(stream_id, b"\x00\x00", end_stream=True)
    elif name.startswith("one"):
        quic.send_stream_data(stream_id, b"\x05", end_stream=True)
    elif name.startswith("extra"):
        quic.send_stream_data(
            stream_id, struct.pack("!H", len(body)) + body + b"junk", end_stream=True
        )
    elif name.startswith("nofin"):
        quic.send_stream_data(stream_id, struct.pack("!H", len(body)) + body, end_stream=False)
    elif name.startswith("garbage"):
        junk = os.urandom(300)
        quic.send_stream_data(stream_id, struct.pack("!H", len(junk)) + junk, end_stream=True)
    elif name.startswith("huge"):
        junk = os.urandom(65535)
        quic.send_stream_data(stream_id, struct.pack("!H", 65535) + junk, end_stream=True)
    elif name.startswith("srv"):
        other = quic.get_next_available_stream_id(is_unidirectional=False)
        quic.send_stream_data(other, b"\x00\x02ab", end_stream=True)
        uni = quic.get_next_available_stream_id(is_unidirectional=True)
        quic.send_stream_data(uni, b"hello", end_stream=True)
    elif name.startswith("close"):
        quic.close(error_code=0x3FFFFFFF, reason_phrase="\x00\r\n%s" + "é" * 400)
    elif name.startswith("stop"):
        quic.stop_stream(stream_id, 0x7FFF)
    elif name.startswith("never"):
        return
    else:
        await _original(self, stream_id, wire, early)
        return
    self.transmit()


async def test_lying_upstream_flood(certs: Certs, start_proxy, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(doq_fixture._DoqServerProtocol, "_handle", _hostile)
    upstream = DoqTestUpstream(certs.cert_file, certs.key_file)
    await upstream.start()
    try:
        proxy = await asyncio.to_thread(start_proxy, upstream.port, "--timeout", "2")
        kinds = ["trunc", "zero", "one", "extra", "nofin", "garbage", "huge", "srv", "close",
                 "stop", "never", "a"]  # fmt: skip
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        sent: dict[int, str] = {}
        for i in range(600):
            name = (
                f"{kinds[i % len(kinds)]}{i}.test."
                if i % len(kinds) != len(kinds) - 1
                else "a.test."
            )
            q = dns.message.make_query(name, "A")
            q.id = i
            sent[i] = name
            await loop.sock_sendto(client, q.to_wire(), ("127.0.0.1", proxy.port))
            if i % 20 == 0:
                await asyncio.sleep(0.05)
        got: dict[int, int] = {}
        deadline = loop.time() + 60
        while len(got) < len(sent) and loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(client, 65535), deadline - loop.time())
            except TimeoutError:
                break
            reply = dns.message.from_wire(data)
            got[reply.id] = reply.rcode()
        missing = sorted(set(sent) - set(got))
        log = proxy.stderr()
        assert proxy.proc.poll() is None, log
        assert not missing, ([sent[i] for i in missing[:20]], len(missing), log[-3000:])
        assert "Traceback" not in log, log
        final = dns.message.make_query("a.test.", "A")
        await loop.sock_sendto(client, final.to_wire(), ("127.0.0.1", proxy.port))
        reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(client, 65535), 30))
        assert reply.rcode() == dns.rcode.NOERROR, (reply, log[-3000:])
        client.close()
    finally:
        await upstream.stop()
