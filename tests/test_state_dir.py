"""The forwarder's state dir and tickets.json: ticket storms, FIFOs, symlinks, foreign owners."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.tls import CipherSuite, NewSessionTicket, SessionTicket, push_new_session_ticket

from doqproxy.upstream.tickets import KEEP_PER_UPSTREAM, TicketFile, ticket_to_json

from .conftest import SERVER_NAME, Certs, ProxyProcess, doqproxy_command, free_port
from .doq_fixture import DoqTestUpstream

STORM = 2000


def ticket(label: bytes) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(
        age_add=7,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(hours=1),
        not_valid_before=now - datetime.timedelta(minutes=1),
        resumption_secret=b"s" * 32,
        server_name="doq.test",
        ticket=label,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[],
    )


async def test_a_storm_inside_the_loop_is_saved_once_and_bounded(tmp_path: Path) -> None:
    store = TicketFile(tmp_path, save_delay=0.2)
    for n in range(STORM):
        store.add("k", ticket(n.to_bytes(4, "big")))
    assert store.saves == 0  # nothing written on the loop during the storm
    await asyncio.sleep(0.6)
    assert store.saves == 1
    saved = json.loads((tmp_path / "tickets.json").read_text())
    assert len(saved["tickets"]["k"]) == KEEP_PER_UPSTREAM
    store.add("k", ticket(b"late"))
    store.save()  # shutdown: written at once, the pending save is cancelled
    assert store.saves == 2
    await asyncio.sleep(0.4)
    assert store.saves == 2


def test_loader_bounds_what_it_keeps(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"
    many = {f"up{n}": [ticket_to_json(ticket(b"t%d" % i)) for i in range(10)] for n in range(100)}
    path.write_text(json.dumps({"version": 1, "tickets": many}))
    path.chmod(0o600)
    store = TicketFile(tmp_path)
    assert store.count("up99") == KEEP_PER_UPSTREAM
    assert store.count("up0") == 0  # only the last 64 upstreams are kept


def test_symlinked_ticket_file_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    TicketFile(tmp_path / "other").add("k", ticket(b"x"))
    real.write_bytes((tmp_path / "other" / "tickets.json").read_bytes())
    real.chmod(0o600)
    (tmp_path / "tickets.json").symlink_to(real)
    assert TicketFile(tmp_path).count("k") == 0


# --- real processes -------------------------------------------------------------------


def start_forward(state: Path, upstream_port: int, certs: Certs, log: Path) -> ProxyProcess:
    port = free_port()
    args = [
        "forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{upstream_port}",
        "--tls-ca-file", certs.ca_file, "--tls-server-name", SERVER_NAME,
        "--state-dir", str(state), "--no-cache",
    ]  # fmt: skip
    return ProxyProcess(args, port, log)


async def test_fifo_in_place_of_the_ticket_file_does_not_hang_start_up(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / "tickets.json", 0o600)
    proxy = start_forward(state, upstream.port, certs, tmp_path / "fifo.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        answer = await dns.asyncquery.udp(
            dns.message.make_query("a.test.", "A"), "127.0.0.1", port=proxy.port, timeout=5
        )
        assert answer.answer, proxy.stderr()
        assert "not a regular file" in proxy.stderr()
        if os.geteuid() == 0:
            assert "WARNING" in proxy.stderr() and "running as root" in proxy.stderr()
    finally:
        code = await asyncio.to_thread(proxy.stop)
    assert code == 0, proxy.stderr()


@pytest.mark.parametrize("problem", ["foreign owner", "others may write"])
def test_unsafe_state_dir_is_refused_with_one_line(
    problem: str, certs: Certs, tmp_path: Path
) -> None:
    if os.geteuid() != 0 and problem == "foreign owner":
        pytest.skip("changing a directory's owner needs root")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if problem == "foreign owner":
        os.chown(state, 65534, 65534)
    else:
        state.chmod(0o777)
    port = free_port()
    result = subprocess.run(
        doqproxy_command(
            "forward",
            "-l",
            f"127.0.0.1:{port}",
            "-u",
            "quic://127.0.0.1:853",
            "--tls-server-name",
            SERVER_NAME,
            "--state-dir",
            str(state),
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1, result.stderr
    assert f"state dir {state}" in errors[0]
    assert ("owned by uid 65534" if problem == "foreign owner" else "others may write") in errors[0]
    assert "Traceback" not in result.stderr


def push_tickets(quic: object, count: int) -> None:
    """Make an aioquic server connection send ``count`` NewSessionTicket messages."""
    buf = Buffer(capacity=count * 200)
    context = quic._quic.tls  # type: ignore[attr-defined]
    for _ in range(count):
        push_new_session_ticket(
            buf,
            NewSessionTicket(
                ticket_lifetime=86400,
                ticket_age_add=1,
                ticket_nonce=b"",
                ticket=os.urandom(32),
                max_early_data_size=0xFFFFFFFF,
                other_extensions=list(context.handshake_extensions),
            ),
        )
    quic._quic._crypto_streams[tls.Epoch.ONE_RTT].sender.write(buf.data)  # type: ignore[attr-defined]
    quic.transmit()  # type: ignore[attr-defined]


async def test_ticket_storm_from_the_upstream_is_not_written_per_ticket(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    proxy = start_forward(state, upstream.port, certs, tmp_path / "storm.log")
    path = state / "tickets.json"
    try:
        await asyncio.to_thread(proxy.wait_ready)
        question = dns.message.make_query("a.test.", "A")
        assert (await dns.asyncquery.udp(question, "127.0.0.1", port=proxy.port, timeout=5)).answer
        await asyncio.sleep(6)  # the first ticket's save is done
        versions: set[tuple[int, int]] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    info = os.stat(path)
                    versions.add((info.st_ino, info.st_mtime_ns))
                except FileNotFoundError:
                    pass
                time.sleep(0.0005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert upstream.server is not None
        for protocol in set(upstream.server._protocols.values()):
            push_tickets(protocol, STORM)
        answered = 0
        for _ in range(20):
            reply = await dns.asyncquery.udp(question, "127.0.0.1", port=proxy.port, timeout=5)
            answered += bool(reply.answer)
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.to_thread(watcher.join)
        assert answered == 20
        # The file as it was before the storm, and at most one save within the delay.
        assert len(versions) <= 2, f"{len(versions)} versions of tickets.json during the storm"
    finally:
        code = await asyncio.to_thread(proxy.stop)
    assert code == 0, proxy.stderr()
    saved = json.loads(path.read_text())
    assert all(len(items) <= KEEP_PER_UPSTREAM for items in saved["tickets"].values())
