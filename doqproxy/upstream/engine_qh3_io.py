"""qh3's asyncio protocol with leaner per-datagram paths (used by :mod:`engine_qh3`).

qh3's ``QuicConnectionProtocol`` and its ``QuicConnection`` wrapper spend Python on
every datagram for things a connected DoQ client never needs once the handshake is
confirmed: each received datagram's packet headers are parsed twice (for Retry and
to split coalesced packets) and each sent one's once more (for a qlog that is off;
:mod:`qh3_reservations` builds without it); every transmit re-arms the connection's
timer, although the deadline it holds (loss detection) only moves later while
queries flow. This class takes the same steps through qh3's core with less around
them, and falls back to qh3's own paths while a qlog is on or the handshake is not
confirmed. What goes on the wire is unchanged. Two timings change: a pacing timer
that uvloop runs before its deadline sends what the pacer held at once, instead of
spinning until the loop's clock passes the deadline; and the loss-detection timer
may wake the loop before its deadline (when traffic stops less than
:data:`KEEP_AHEAD` before it), to find it moved on and re-arm.
"""

from __future__ import annotations

from typing import Any

from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.quic import events
from qh3.quic.connection import QuicConnectionError
from qh3.quic.packet import QuicErrorCode

__all__ = ["LeanProtocol"]

_STREAM_DATA = events.StreamDataReceived

KEEP_AHEAD = 0.010
"""Seconds: an armed timer at least this far ahead is kept when the deadline moves
later. While queries flow, some transmit re-arms it before it comes due (one timer
handle per KEEP_AHEAD or so instead of one per transmit), so it seldom wakes the
loop for nothing; a wake-up costs far more CPU than a timer handle (30-45 us on
the 2-core test VM, see BENCHMARKS.md)."""


class LeanProtocol(QuicConnectionProtocol):  # type: ignore[misc, unused-ignore]
    """A ``QuicConnectionProtocol`` whose receive, transmit and timer paths are lean."""

    _timer_clock = 0.0
    """While the timer's transmit runs: the time the timer stands for (see below)."""

    def receive(self, data: bytes, addr: Any, now: float) -> None:
        """Give qh3 one datagram from the server (its events are left queued).

        Once the handshake is confirmed, a datagram can carry no Retry nor any packet
        TLS must see before the next one, so it goes to the core whole, as qh3's own
        batched path sends it, without the header parsing ``receive_datagram``
        does for those.
        """
        quic = self._quic
        if quic._handshake_confirmed and quic._quic_logger is None:
            quic.receive_many_datagrams([data], addr, now=now)
        else:
            quic.receive_datagram(data, addr, now=now)

    def _process_events(self) -> None:
        quic_event_received = self.quic_event_received
        next_event = self._quic.next_event
        while (event := next_event()) is not None:
            if event.__class__ is not _STREAM_DATA:
                self._connection_event(event)
            quic_event_received(event)

    def _connection_event(self, event: Any) -> None:
        """What qh3's protocol does with an event besides handing it on."""
        if isinstance(event, events.ConnectionTerminated):
            waiter = self._connected_waiter
            if waiter is not None:
                self._connected_waiter = None
                waiter.set_exception(ConnectionError)
            for waiter in self._ping_waiters.values():
                waiter.set_exception(ConnectionError)
            self._ping_waiters.clear()
            self._closed.set()
        elif isinstance(event, events.HandshakeCompleted):
            self._connected = True
            waiter = self._connected_waiter
            if waiter is not None:
                self._connected_waiter = None
                waiter.set_result(None)
        elif isinstance(event, events.PingAcknowledged):
            waiter = self._ping_waiters.pop(event.uid, None)
            if waiter is not None:
                waiter.set_result(None)

    def transmit(self) -> None:
        """Send what qh3's core has ready, then make sure the timer wakes in time."""
        self._transmit_task = None
        quic = self._quic
        core = quic._core
        if core is None or quic._quic_logger is not None:
            super().transmit()
            return
        transport = self._transport
        if transport is None:
            return
        now = self._loop_time()
        if now < self._timer_clock:
            now = self._timer_clock
        sendto = transport.sendto
        # Through the connection, not its core: a connection that builds packets
        # while it takes datagrams (qh3_reservations) hands those out here too.
        for data, addr in quic.datagrams_to_send(now):
            sendto(data, addr)
        try:
            timer = core.get_timer()
        except RuntimeError as exc:  # as qh3's wrapper reports a core failure
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        self._arm_timer(None if timer is None else timer[1], now)

    def _arm_timer(self, at: float | None, now: float) -> None:
        timer = self._timer
        if timer is not None:
            armed = self._timer_at
            if at is not None and armed is not None and armed <= at and armed - now > KEEP_AHEAD:
                return  # re-armed by a later transmit, or it wakes first and re-arms
            timer.cancel()
            self._timer = None
        if at is not None:
            self._timer = self._loop.call_at(at, self._handle_timer)
        self._timer_at = at

    def _handle_timer(self) -> None:
        armed = self._timer_at
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        quic = self._quic
        core = quic._core
        if core is not None and armed is not None:
            timer = core.get_timer()
            if timer is None:
                return
            if timer[1] > max(armed, now):
                self._arm_timer(timer[1], now)  # the deadline moved on since this was armed
                return
            armed = timer[1]
        # uvloop rounds a timer's delay to whole milliseconds, so a pacing timer (often
        # less than 0.5 ms away) runs up to half a millisecond early. qh3's protocol
        # then handles the timer at its deadline but builds packets at the loop's
        # time, when the pacer still holds them back: nothing is sent, the same
        # deadline is armed again and the loop spins (1.3 wasted timer runs per query
        # at 800 q/s). Both steps take the deadline's time here, the packets a
        # microsecond after it: at the exact deadline qh3's pacer sometimes still
        # holds them and asks for that microsecond more.
        clock = max(armed or now, now)
        quic.handle_timer(now=clock)
        self._process_events()
        self._timer_clock = clock + 1e-6
        try:
            self.transmit()
        finally:
            self._timer_clock = 0.0
