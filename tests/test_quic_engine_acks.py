"""ACKs ride on queries, on every engine installed: a client that asks one query after
another, each soon after the previous answer (as a forwarder does when its clients
ask again), sends one datagram per query, the query with the ACK for the previous
answer, not an ACK-only datagram as well. And which engine runs when none is named."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import dns.message
import pytest

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream import engine
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pool import DoqUpstream, PoolSettings

from .conftest import SERVER_NAME, Certs, doqproxy_command
from .doq_fixture import DoqTestUpstream

QUERIES = 40


@pytest.mark.parametrize("quic_engine", engine.installed())
async def test_sequential_queries_carry_the_acks(
    upstream: DoqTestUpstream, certs: Certs, quic_engine: str
) -> None:
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(
        SERVER_NAME, ca_file=certs.ca_file, quic_engine=quic_engine
    )
    settings = PoolSettings(max_connections=1, quic_engine=quic_engine)
    pool = DoqUpstream(url, configuration, settings)
    try:
        for i in range(QUERIES):
            data = dns.message.make_query(f"n{i}.test.", "A").to_wire()
            question = wire.parse_question(data)
            answer = await pool.query(
                rewrite.upstream_query(data, question, pad_block=128), question
            )
            assert dns.message.from_wire(answer).answer
            await asyncio.sleep(0)  # the next query comes from elsewhere, a loop turn later
        [connection] = pool.connections
        sent, received = connection.datagrams
    finally:
        await pool.aclose()
    assert received >= QUERIES
    # The handshake takes a few datagrams of its own; an ACK-only datagram after each
    # answer would make it about two per query.
    assert sent <= QUERIES + QUERIES // 4, f"{sent} datagrams sent for {QUERIES} queries"


def engine_in_process(value: str | None) -> str:
    env = {key: item for key, item in os.environ.items() if key != engine.ENV}
    if value is not None:
        env[engine.ENV] = value
    code = (
        "from doqproxy.upstream import engine, pool; "
        "print(engine.NAME, pool.PoolSettings().quic_engine)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out[0] == out[1], "pools default to another engine than the selected one"
    return out[0]


@pytest.mark.parametrize("quic_engine", engine.installed())
def test_the_environment_names_the_engine_in_process(quic_engine: str) -> None:
    assert engine_in_process(quic_engine) == quic_engine


def test_the_default_engine() -> None:
    """qh3 when it is installed (a default dependency where it has wheels), else aioquic."""
    expected = "qh3" if "qh3" in engine.installed() else "aioquic"
    assert engine_in_process(None) == expected
    assert engine_in_process("bogus") == expected  # the command line reports it, below


def test_a_bad_engine_in_the_environment_is_one_clear_line() -> None:
    env = dict(os.environ, **{engine.ENV: "bogus"})
    done = subprocess.run(
        doqproxy_command("forward", "-u", "quic://127.0.0.1:853", "-l", "127.0.0.1:0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: Invalid value for '--quic-engine': 'bogus' is not one of 'aioquic', 'qh3'."
    ]
