"""DoqConnection's own logic, sans I/O: a scripted engine session stands in for QUIC, so
stream credit, liveness and the Message ID check are exercised step by step."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from doqproxy.doq import framing
from doqproxy.upstream import doq_connection
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.doq_connection import ConnectionLost, DoqConnection

QUERY = bytes(12)  # a header with ID 0 is all the connection looks at


class ScriptedSession:
    """Records what DoqConnection asks of the engine; the test plays the server."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.stream_limit = 0
        self.streams_opened = 0
        self.sent: list[int] = []
        self.cancelled: list[int] = []
        self.pings = 0
        self.closed: list[tuple[int, str]] = []
        self.probe_timeout = 0.01
        self.smoothed_rtt = 0.001
        self.idle_timeout = 30.0
        self.datagrams = (0, 0)
        self.cipher = None
        self.peer_certificate = None

    async def open(self, address: tuple[str, int]) -> None:
        pass

    def transmit_soon(self) -> None:
        pass

    def send_query(self, data: bytes) -> int:
        assert self.streams_opened < self.stream_limit, "stream opened beyond the credit"
        stream_id = self.streams_opened * 4
        self.streams_opened += 1
        self.sent.append(stream_id)
        return stream_id

    def cancel_stream(self, stream_id: int, error_code: int) -> None:
        self.cancelled.append(stream_id)

    def ping(self) -> None:
        self.pings += 1

    def close(self, error_code: int, reason: str) -> None:
        self.closed.append((error_code, reason))

    async def wait_closed(self, grace: float) -> None:
        pass

    def abandon(self) -> None:
        pass

    def restart_idle_timer(self) -> None:
        pass

    # the server's side
    def handshake(self, limit: int) -> None:
        self.stream_limit = limit
        self.owner.on_handshake("doq", False, False)
        self.owner.on_datagram()

    def answer(self, stream_id: int, message: bytes) -> None:
        self.owner.on_stream_data(stream_id, framing.frame(message), True)
        self.owner.on_datagram()


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[ScriptedSession]:
    made: list[ScriptedSession] = []

    def new_session(owner: Any, configuration: Any, **_: Any) -> ScriptedSession:
        made.append(ScriptedSession(owner))
        return made[-1]

    fake = SimpleNamespace(new_session=new_session)
    monkeypatch.setattr(doq_connection.engine, "get", lambda name=None: fake)
    return made


async def connected(sessions: list[ScriptedSession], limit: int) -> tuple[DoqConnection, Any]:
    conn = DoqConnection(("192.0.2.1", 853), SimpleNamespace(session_ticket=None))
    await conn.open()
    session = sessions[-1]
    session.handshake(limit)
    return conn, session


async def test_a_query_waiting_for_credit_leaves_without_a_frame(
    sessions: list[ScriptedSession],
) -> None:
    conn, session = await connected(sessions, limit=2)
    first = [asyncio.ensure_future(conn.query(QUERY)) for _ in range(2)]
    waiting = asyncio.ensure_future(conn.query(QUERY))
    later = asyncio.ensure_future(conn.query(QUERY))
    await asyncio.sleep(0)
    assert session.sent == [0, 4] and conn.stream_credit == -2  # two admitted, waiting
    waiting.cancel()  # its timeout: never sent, so nothing to reset or stop
    await asyncio.sleep(0)
    assert session.cancelled == [] and session.sent == [0, 4]
    session.stream_limit = 3  # MAX_STREAMS arrives
    session.owner.on_datagram()
    await asyncio.sleep(0)
    assert session.sent == [0, 4, 8]
    first[0].cancel()  # an opened stream is cancelled on the wire
    await asyncio.sleep(0)
    assert session.cancelled == [0]
    session.answer(4, QUERY)
    session.answer(8, QUERY)
    assert await first[1] == QUERY and await later == QUERY
    assert sum(task.cancelled() for task in (waiting, first[0])) == 2


async def test_before_the_handshake_an_unknown_limit_counts_as_ten(
    sessions: list[ScriptedSession],
) -> None:
    conn = DoqConnection(("192.0.2.1", 853), SimpleNamespace(session_ticket=None))
    await conn.open()
    queries = [asyncio.ensure_future(conn.query(QUERY)) for _ in range(4)]
    await asyncio.sleep(0)
    assert conn.stream_credit == doq_connection.UNKNOWN_STREAM_CREDIT - 4
    sessions[-1].handshake(limit=100)
    await asyncio.sleep(0)
    assert conn.stream_credit == 100 - 4
    conn.close()
    await asyncio.gather(*queries, return_exceptions=True)


async def test_slow_answer_is_alive_while_acknowledged_and_dead_when_silent(
    sessions: list[ScriptedSession],
) -> None:
    conn, session = await connected(sessions, limit=10)
    conn.dead_after = 0.2
    query = asyncio.ensure_future(conn.query(QUERY))
    for _ in range(6):  # 1.2 s of thinking, the server acknowledging our PINGs
        await asyncio.sleep(0.1)
        session.owner.on_datagram()
    assert not query.done() and not conn.dead
    assert session.pings >= 2
    with pytest.raises(ConnectionLost, match="no acknowledgement"):
        await asyncio.wait_for(query, 2.0)  # silence: dead within about two windows
    assert session.closed == [(framing.DoqError.NO_ERROR, "unresponsive")]


async def test_nonzero_message_id_closes_with_protocol_error(
    sessions: list[ScriptedSession],
) -> None:
    conn, session = await connected(sessions, limit=10)
    bad = asyncio.ensure_future(conn.query(QUERY))
    other = asyncio.ensure_future(conn.query(QUERY))
    await asyncio.sleep(0)
    session.answer(0, b"\x12\x34" + bytes(10))
    with pytest.raises(UpstreamError, match="message ID 4660") as caught:
        await bad
    assert not isinstance(caught.value, ConnectionLost)  # this one is not retried
    with pytest.raises(ConnectionLost):
        await other  # the pool retries this one on a fresh connection
    assert session.closed[0][0] == framing.DoqError.PROTOCOL_ERROR
