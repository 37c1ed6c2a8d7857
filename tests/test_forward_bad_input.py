"""Bad input, slow clients, connection limits and CLI errors of ``doqproxy forward``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable

import dns.message
import dns.rcode
import pytest

from .conftest import ProxyProcess, doqproxy_command, free_port
from .doq_fixture import DoqTestUpstream
from .nobody import NOBODY, NobodyPython

StartProxy = Callable[..., ProxyProcess]

HEADER = struct.Struct("!HHHHHH")
QUESTION_A = b"\x01a\x04test\x00\x00\x01\x00\x01"


def query(
    flags: int = 0x0100, counts: tuple[int, int, int, int] = (1, 0, 0, 0), body: bytes = QUESTION_A
) -> bytes:
    return HEADER.pack(0x1234, flags, *counts) + body


OPT_V0 = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
OPT_V1 = b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00"
A_RECORD = b"\x01a\x04test\x00\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"
_TSIG_RDATA = (
    b"\x0bhmac-sha256\x00"
    + b"\x00\x00\x65\x00\x00\x00"
    + b"\x01\x2c\x00\x00\x12\x34\x00\x00\x00\x00"
)
TSIG_RECORD = (
    b"\x03key\x00\x00\xfa\x00\xff\x00\x00\x00\x00"
    + len(_TSIG_RDATA).to_bytes(2, "big")
    + _TSIG_RDATA
)

# (case, query, expected rcode or None for "dropped")
CASES: list[tuple[str, bytes, int | None]] = [
    ("short", b"\x12\x34\x01\x00\x00", None),
    ("qr-set", query(flags=0x8100), None),
    ("opcode-status", query(flags=0x1100), dns.rcode.NOTIMP),
    ("opcode-update", query(flags=0x2800), dns.rcode.NOTIMP),
    ("qdcount-0", query(counts=(0, 0, 0, 0), body=b""), dns.rcode.FORMERR),
    ("qdcount-2", query(counts=(2, 0, 0, 0), body=QUESTION_A * 2), dns.rcode.FORMERR),
    ("bad-label-type", query(body=b"\x41a\x00\x00\x01\x00\x01"), dns.rcode.FORMERR),
    ("compression-loop", query(body=b"\xc0\x0c\x00\x01\x00\x01"), dns.rcode.FORMERR),
    ("pointer-past-end", query(body=b"\x01a\xc0\xff\x00\x01\x00\x01"), dns.rcode.FORMERR),
    ("truncated-question", query(body=b"\x01a\x04te"), dns.rcode.FORMERR),
    ("two-opt", query(counts=(1, 0, 0, 2), body=QUESTION_A + OPT_V0 + OPT_V0), dns.rcode.FORMERR),
    ("opt-in-answer", query(counts=(1, 1, 0, 0), body=QUESTION_A + OPT_V0), dns.rcode.FORMERR),
    ("edns-version-1", query(counts=(1, 0, 0, 1), body=QUESTION_A + OPT_V1), dns.rcode.BADVERS),
    ("qtype-opt", query(body=b"\x01a\x04test\x00\x00\x29\x00\x01"), dns.rcode.FORMERR),
    ("qtype-tsig", query(body=b"\x01a\x04test\x00\x00\xfa\x00\x01"), dns.rcode.FORMERR),
    ("qtype-tkey", query(body=b"\x01a\x04test\x00\x00\xf9\x00\x01"), dns.rcode.FORMERR),
    ("qtype-128", query(body=b"\x01a\x04test\x00\x00\x80\x00\x01"), dns.rcode.FORMERR),
    ("axfr", query(body=b"\x01a\x04test\x00\x00\xfc\x00\x01"), dns.rcode.REFUSED),
    (
        "ixfr",
        query(counts=(1, 0, 1, 0), body=QUESTION_A[:-4] + b"\x00\xfb\x00\x01" + A_RECORD),
        dns.rcode.REFUSED,
    ),
    # Queries carrying records must never reach the upstream byte for byte.
    ("answer-record", query(counts=(1, 1, 0, 0), body=QUESTION_A + A_RECORD), dns.rcode.FORMERR),
    ("authority-record", query(counts=(1, 0, 1, 0), body=QUESTION_A + A_RECORD), dns.rcode.FORMERR),
    ("lone-tsig", query(counts=(1, 0, 0, 1), body=QUESTION_A + TSIG_RECORD), dns.rcode.FORMERR),
    (
        "opt-and-tsig",
        query(counts=(1, 0, 0, 2), body=QUESTION_A + OPT_V0 + TSIG_RECORD),
        dns.rcode.FORMERR,
    ),
    ("extra-a-record", query(counts=(1, 0, 0, 1), body=QUESTION_A + A_RECORD), dns.rcode.FORMERR),
]


def rcode_of(reply: bytes) -> int:
    rcode = reply[3] & 0x0F
    try:
        message = dns.message.from_wire(reply)
    except Exception:
        return rcode
    return int(message.rcode())


class UdpClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.replies.put_nowait(data)


async def test_bad_input_udp(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port)
    loop = asyncio.get_running_loop()
    for name, data, expected in CASES:
        transport, client = await loop.create_datagram_endpoint(
            UdpClient, remote_addr=("127.0.0.1", proxy.port)
        )
        transport.sendto(data)
        # A good query after the bad one proves the bad one was dropped or answered.
        good = dns.message.make_query("a.test.", "A")
        transport.sendto(good.to_wire())
        replies = [await asyncio.wait_for(client.replies.get(), 10)]
        if expected is not None:
            replies.append(await asyncio.wait_for(client.replies.get(), 10))
        transport.close()
        by_id = {reply[:2]: reply for reply in replies}
        assert dns.message.from_wire(by_id[good.id.to_bytes(2, "big")]).answer, name
        if expected is None:
            assert len(replies) == 1, name
        else:
            bad = by_id[b"\x12\x34"]
            assert rcode_of(bad) == expected, name
    # None of these reached the upstream.
    assert {seen.message.question[0].name.to_text() for seen in upstream.state.seen} == {"a.test."}
    assert len(upstream.state.seen) == len(CASES)


async def tcp_exchange(port: int, data: bytes) -> bytes | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        header = await asyncio.wait_for(reader.read(2), 10)
        if not header:
            return None
        return await reader.readexactly(struct.unpack("!H", header)[0])
    finally:
        writer.close()


async def test_bad_input_tcp(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port)
    for name, data, expected in CASES:
        if name == "qr-set":
            continue  # dropped: no reply, the connection stays open (tested below)
        reply = await tcp_exchange(proxy.port, data)
        if expected is None:
            assert reply is None, name  # short message: connection closed
        else:
            assert reply is not None and rcode_of(reply) == expected, name
    # QR=1 is dropped without closing: the next query on the connection is answered.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    good = dns.message.make_query("a.test.", "A").to_wire()
    for data in (query(flags=0x8100), good):
        writer.write(struct.pack("!H", len(data)) + data)
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
    assert (await reader.readexactly(length))[:2] == good[:2]
    writer.close()


async def test_partial_reads_do_not_close(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    data = dns.message.make_query("a.test.", "A").to_wire()
    framed = struct.pack("!H", len(data)) + data
    for offset in range(len(framed)):
        writer.write(framed[offset : offset + 1])
        await writer.drain()
        await asyncio.sleep(0.01)
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
    assert dns.message.from_wire(await reader.readexactly(length)).answer
    writer.close()


async def test_slow_sender_is_cut_off_while_others_are_served(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--tcp-message-timeout", "1.5")
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"\xff\xff")  # announces 65535 octets, then one octet every 0.3 s

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.3)

    trickler = asyncio.ensure_future(trickle())
    started = loop.time()
    # Meanwhile other clients are answered.
    for _ in range(3):
        assert (await tcp_query(proxy.port, "a.test.")).answer
    assert await asyncio.wait_for(reader.read(1), 10) == b"", "slow sender was not cut off"
    elapsed = loop.time() - started
    assert 1.0 < elapsed < 6, elapsed
    trickler.cancel()
    writer.close()


async def tcp_query(port: int, name: str) -> dns.message.Message:
    import dns.asyncquery

    return await dns.asyncquery.tcp(
        dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5
    )


async def test_per_ip_connection_limit(upstream: DoqTestUpstream, start_proxy: StartProxy) -> None:
    proxy = start_proxy(upstream.port, "--tcp-max-connections-per-ip", "3")
    held = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    # Make sure the proxy has accepted all three before opening the fourth.
    for reader, writer in held:
        data = dns.message.make_query("a.test.", "A").to_wire()
        writer.write(struct.pack("!H", len(data)) + data)
        await asyncio.wait_for(reader.readexactly(2), 10)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await asyncio.wait_for(reader.read(1), 10) == b""  # closed at once
    writer.close()
    held[0][1].close()
    await asyncio.sleep(0.3)
    assert (await tcp_query(proxy.port, "a.test.")).answer
    for _, w in held[1:]:
        w.close()


def run_cli(*args: str, nobody: NobodyPython | None = None) -> subprocess.CompletedProcess[str]:
    if nobody is None:
        return subprocess.run(doqproxy_command(*args), capture_output=True, text=True, timeout=30)
    return subprocess.run(
        [*NOBODY, *nobody.command(*args)],
        capture_output=True,
        text=True,
        timeout=30,
        env=nobody.environ(),
        cwd="/",
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    ("upstream_url", "needle"),
    [
        ("dns.example", "expected a URL"),
        ("https://dns.example", "unknown scheme"),
        ("quic://dns.example:99999", "port"),
        ("quic://", "no host"),
    ],
)
def test_cli_bad_upstream(upstream_url: str, needle: str) -> None:
    result = run_cli("forward", "-l", "127.0.0.1:5399", "-u", upstream_url)
    assert_one_line_error(result, needle)


def test_cli_missing_ca_file(tmp_path: object) -> None:
    result = run_cli("forward", "-u", "quic://127.0.0.1", "--tls-ca-file", "/nonexistent/ca.pem")
    assert_one_line_error(result, "/nonexistent/ca.pem", "no such file")


def test_cli_bad_listen_address() -> None:
    result = run_cli("forward", "-l", "localhost:53", "-u", "quic://127.0.0.1")
    assert_one_line_error(result, "not an IP address")


def test_cli_address_in_use() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", port))
        result = run_cli("forward", "-l", f"127.0.0.1:{port}", "-u", "quic://127.0.0.1")
    assert_one_line_error(result, "address already in use")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to switch to nobody"
)
def test_cli_permission_denied_below_1024(nobody_python: NobodyPython) -> None:
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as handle:
        if int(handle.read()) <= 53:
            pytest.skip("unprivileged users may bind port 53 on this kernel")
    result = run_cli(
        "forward", "-l", "127.0.0.1:53", "-u", "quic://127.0.0.1", nobody=nobody_python
    )
    assert_one_line_error(result, "permission denied", "CAP_NET_BIND_SERVICE", "socket activation")


async def test_client_that_never_reads_is_cut_off(
    upstream: DoqTestUpstream, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(upstream.port, "--tcp-message-timeout", "1", "-vv", cache=True)
    data = dns.message.make_query("mid.test.", "TXT").to_wire()
    framed = struct.pack("!H", len(data)) + data
    assert (await tcp_exchange(proxy.port, data)) is not None  # now cached (~800 octets)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    sent = 0
    with contextlib.suppress(ConnectionError, TimeoutError):
        async with asyncio.timeout(8):
            while sent < 20_000:  # 16 MB of answers if it buffered them all
                await loop.sock_sendall(sock, framed * 50)
                sent += 50
    for _ in range(100):
        if "does not read its answers" in proxy.stderr():
            break
        await asyncio.sleep(0.1)
    assert "does not read its answers" in proxy.stderr()
    assert _rss_kb(proxy.proc.pid) < 150_000
    assert (await tcp_query(proxy.port, "a.test.")).answer  # everyone else is still served
    sock.close()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(handle.read().split("VmRSS:")[1].split()[0])
