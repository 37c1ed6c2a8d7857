"""A qh3 client connection that never lets a stream go while the core holds a frame for it.

qh3 2.1.0's core (``src/quic/connection.rs``) takes a STREAM frame for sending in two
steps: it *reserves* the frame and queues it in its packet builder, and *commits*
the reservation once a packet carrying it is built. Reservations it could not put
in a packet wait in ``pending_streams`` while the congestion window is closed
(``poll_transmit``, l. 2128-2136). After a PTO it reserves every stream that has
data to send at once (``queue_probe_stream_actions``, l. 2926), resends included.
Separately, a stream whose both sides are done is removed from the core as soon as
the application pops its ``StreamFinished`` event (``poll_event``, l. 902-903).
qh3's Python facade does that after every received datagram and timer
(``QuicConnection._drain_core``). Suppose the waiting frame is a resend (a PTO probe
copy) of data that the peer then ACKs, with the answer. The stream is then finished
and removed while its frame still waits. The next packet that carries the frame
fails to commit it (``commit_stream_reservation``, l. 3137-3170: "reserved stream
is missing"). The ``?`` at l. 2194 returns before ``complete_datagram`` (l. 2203),
so the packet is lost with the other streams' frames in it. qh3 2.0.x fails the
same way, with "flow-control error: StreamNotFound".

:class:`ReservationSafeConnection` keeps that from happening, with congestion control
intact: it changes only when packets are built and when events are read. A
reservation outlives ``datagrams_to_send`` only while the window is closed (the
core builds every reserved frame while it is open). So after the
core takes a datagram or a timer, and the window was closed at the last send:

1. it builds packets at once, before the core's events are popped, so the frames
   the window now admits are committed while their streams still exist
   (the datagrams wait in :attr:`prepared` for the next ``datagrams_to_send``);
2. if the window is still closed, it leaves the events in the core (no stream is
   removed) until a datagram or timer finds it open; the answers they carry are
   only late by that much, never lost. Nothing is held before the handshake is
   complete or once the connection is no longer established.
"""

from __future__ import annotations

from typing import Any

from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicErrorCode

_LARGEST_DATAGRAM = 1500
"""Above any datagram size qh3's core uses on our paths: more window than this is open."""
_ENDED = ("closing", "draining", "terminated")


class ReservationSafeConnection(QuicConnection):  # type: ignore[misc, unused-ignore]
    """qh3's client :class:`QuicConnection`, minus the "reserved stream is missing" failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: list[tuple[bytes, Any]] = []
        """Datagrams built while a datagram or timer was taken, not yet handed out."""
        self.holding = False
        """Whether the core's events are being left in it (see the module docstring)."""
        self._window_closed = False
        self._now = 0.0

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self._now = now
        super().receive_datagram(data, addr, now)

    def receive_many_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        self._now = now
        super().receive_many_datagrams(datagrams, addr, now)

    def receive_gro_buffer(self, buffer: bytes, segment_size: int, addr: Any, now: float) -> None:
        self._now = now
        super().receive_gro_buffer(buffer, segment_size, addr, now)

    def handle_timer(self, now: float) -> None:
        self._now = now
        super().handle_timer(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        prepared = self.prepared
        if not prepared:
            return self._build(now)
        self.prepared = []
        prepared.extend(self._build(now))
        return prepared

    def _build(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None or self._quic_logger is not None:
            datagrams: list[tuple[bytes, Any]] = super().datagrams_to_send(now)
        else:
            # qh3's own loop, minus a header walk per datagram for a qlog that is off.
            datagrams = []
            try:
                while (datagram := core.poll_transmit(now)) is not None:
                    datagrams.append((datagram[0], datagram[1]))
            except RuntimeError as exc:  # as qh3's wrapper reports a core failure
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
        self._window_closed = self._closed_window()
        return datagrams

    def _closed_window(self) -> bool:
        """Whether the core may keep reserved frames now (see ``poll_transmit``)."""
        core = self._core
        if core is None or core.state in _ENDED:
            return False
        window = int(core.congestion_window) - int(core.bytes_in_flight)
        if window >= _LARGEST_DATAGRAM:
            return False
        datagram_size = max(int(self._configuration.max_datagram_size), int(core.active_path[5]))
        return window < datagram_size

    def _drain_core(self) -> None:
        core = self._core
        if (
            self._window_closed
            and self._handshake_complete
            and core is not None
            and core.state not in _ENDED
        ):
            self.prepared.extend(self._build(self._now))
            if self._window_closed:
                self.holding = True
                return
        self.holding = False
        super()._drain_core()
