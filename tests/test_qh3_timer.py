"""qh3's connection timer: re-armed only when its deadline moves earlier, and a pacing
timer that runs early sends what the pacer held instead of spinning.

qh3's own asyncio protocol cancels and re-creates the timer on every transmit whose
deadline differs from the armed one, and while queries flow the loss-detection
deadline moves later with every packet sent: that was a timer handle per query.
doqproxy's qh3 engine keeps the armed timer when the new deadline is later; the
timer then wakes first, finds the deadline moved on and re-arms once. Counted,
not timed: a burst of queries sent one transmit after another, in one loop turn,
arms the timer a few times at most (the loss-detection deadline, a pacing one if
qh3 holds some packets back, a re-arm if the machine stalls past a deadline), not
once per transmit, and every answer still arrives.

uvloop rounds a timer's delay to whole milliseconds, so a pacing deadline tens of
microseconds away runs on the next loop turn, before the deadline. qh3's protocol
then handled the timer at the deadline's time but built packets at the loop's time,
when the pacer still held them: nothing went out, the same deadline was armed
again, and the loop spun (1.3 timer runs per query at 800 q/s under dnsperf)."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import pytest

from doqproxy.dns import rewrite, wire
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream import engine
from doqproxy.upstream.doq_connection import client_configuration
from doqproxy.upstream.pool import DoqUpstream, PoolSettings

from .conftest import SERVER_NAME, Certs
from .doq_fixture import DoqTestUpstream

pytestmark = pytest.mark.skipif("qh3" not in engine.installed(), reason="qh3 is not installed")

BURST = 10


class CountingLoop:
    """The running loop, counting the timers armed for one protocol's connection timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: Any) -> None:
        self._loop = loop
        self._protocol = protocol
        self.timer_arms = 0

    def call_at(self, when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        if callback == self._protocol._handle_timer:
            self.timer_arms += 1
        return self._loop.call_at(when, callback, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


def query(name: str) -> tuple[bytes, wire.Question]:
    data = dns.message.make_query(name, "A").to_wire()
    question = wire.parse_question(data)
    return rewrite.upstream_query(data, question, pad_block=128), question


async def test_a_burst_of_transmits_does_not_rearm_the_timer_each_time(
    upstream: DoqTestUpstream, certs: Certs
) -> None:
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file, quic_engine="qh3")
    pool = DoqUpstream(url, configuration, PoolSettings(max_connections=1, quic_engine="qh3"))
    try:
        assert dns.message.from_wire(await pool.query(*query("n0.test."))).answer
        [connection] = pool.connections
        protocol = connection.session._protocol  # type: ignore[attr-defined]
        for _ in range(200):  # until the handshake is confirmed (HANDSHAKE_DONE arrived)
            if protocol._quic._handshake_confirmed:
                break
            await asyncio.sleep(0.01)
        counting = CountingLoop(protocol._loop, protocol)
        protocol._loop = counting
        try:
            # One loop turn: each query is sent by a transmit of its own.
            answers = []
            for i in range(1, BURST + 1):
                answers.append(asyncio.ensure_future(pool.query(*query(f"n{i}.test."))))
                await asyncio.sleep(0)  # the query task writes its stream
                protocol.transmit()
            arms = counting.timer_arms
            replies = await asyncio.wait_for(asyncio.gather(*answers), 10)
        finally:
            protocol._loop = counting._loop
    finally:
        await pool.aclose()
    assert all(dns.message.from_wire(reply).answer for reply in replies)
    assert arms <= 4, f"the timer was armed {arms} times for {BURST} transmits"


async def test_a_pacing_timer_run_before_its_deadline_sends_what_was_held(
    upstream: DoqTestUpstream, certs: Certs
) -> None:
    url = UpstreamUrl("quic", "127.0.0.1", upstream.port)
    configuration = client_configuration(SERVER_NAME, ca_file=certs.ca_file, quic_engine="qh3")
    pool = DoqUpstream(url, configuration, PoolSettings(max_connections=1, quic_engine="qh3"))
    answers: list[asyncio.Future[bytes]] = []
    try:
        assert dns.message.from_wire(await pool.query(*query("n0.test."))).answer
        [connection] = pool.connections
        protocol = connection.session._protocol  # type: ignore[attr-defined]
        core = protocol._quic._core
        held = False
        # One query per packet, back to back, until qh3's pacer holds one back.
        for i in range(1, 300):
            answers.append(asyncio.ensure_future(pool.query(*query(f"n{i % 64}.test."))))
            await asyncio.sleep(0)  # the query task writes its stream
            protocol.transmit()
            timer = core.get_timer()
            if (
                timer is not None
                and timer[0] == "pacing"
                and timer[1] > protocol._loop.time()
                and core.get_send_buffer_size() > 0
            ):
                held = True
                break
        assert held, "qh3's pacer never held a query back"
        if protocol._timer is not None:
            protocol._timer.cancel()
        sent = protocol.connected.sent
        protocol._handle_timer()  # as uvloop runs it: on the next turn, before the deadline
        assert protocol.connected.sent > sent, "the pacing timer sent nothing"
        replies = await asyncio.wait_for(asyncio.gather(*answers), 10)
    finally:
        for answer in answers:
            answer.cancel()
        await pool.aclose()
    assert all(dns.message.from_wire(reply).answer for reply in replies)
