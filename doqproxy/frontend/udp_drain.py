"""DNS over UDP read straight off the socket: one event-loop callback drains it.

The same rules as :class:`~doqproxy.frontend.udp.UdpFrontEnd` (both are
:class:`~doqproxy.frontend.udp.UdpAnswers`), but instead of one protocol callback
per datagram, a reader callback calls ``recvfrom`` until the socket is empty or a
per-callback budget is spent, and replies go out with ``sendto`` on the socket
itself. A reply the kernel will not take now waits in a bounded queue flushed when
the socket is writable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
import sys
from typing import Any

from doqproxy.frontend.admission import Admission
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.udp import UdpAnswers
from doqproxy.resolver import Resolver

log = logging.getLogger(__name__)

BUDGET = 64
"""Datagrams read per callback, so that one busy socket cannot starve the loop."""
MAX_QUEUED = 1024
"""Replies waiting for a writable socket; past this the oldest is dropped."""
_RECV_SIZE = 65535
_LINUX = sys.platform.startswith("linux")
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)  # Linux's numbers; Python 3.11 lacks the names
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
_SEND_LATER = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})
# With IP_RECVERR (which a socket handed to us may have), an ICMP error for an
# earlier reply is reported by the next sendto, which then sends nothing: that
# reply is for someone else, so it is sent again.
_ICMP_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)


def choose_reader(setting: str, event_loop: str) -> str:
    """``drain`` or ``protocol`` for ``--udp-reader`` on the running ``event_loop``.

    ``auto`` drains on the standard asyncio loop, whose datagram transport costs
    about four times the CPU per cache hit, and keeps uvloop's protocol callbacks,
    which the drained reader did not beat beyond the noise (BENCHMARKS.md).
    """
    if setting != "auto":
        return setting
    return "drain" if event_loop == "asyncio" else "protocol"


def quiet_icmp_errors(sock: socket.socket) -> None:
    """Turn off IP_RECVERR on Linux (a socket handed to us may have it on).

    With it, an ICMP error for an earlier reply sits in the socket's error queue
    and keeps it in POLLERR: libuv (uvloop) then stops the reader for good, and
    epoll (asyncio) reports the socket ready for ever. Without it, Linux does not
    report ICMP errors on an unconnected UDP socket at all, as we want.
    """
    if not _LINUX:
        return
    options = [(socket.IPPROTO_IP, _IP_RECVERR)]
    if sock.family == socket.AF_INET6:
        options.append((socket.IPPROTO_IPV6, _IPV6_RECVERR))
    for level, option in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, 0)


class DrainedUdpFront(UdpAnswers):
    """Answers DNS over UDP on ``sock`` with a reader callback (see the module doc)."""

    def __init__(
        self,
        resolver: Resolver,
        inflight: InFlight,
        admission: Admission,
        sock: socket.socket,
        *,
        budget: int = BUDGET,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.resolver = resolver
        self.inflight = inflight
        self.admission = admission
        self.sock = sock
        self.budget = budget
        self.max_queued = max_queued
        self.accepting = True
        self.closed = False
        self.queued: collections.deque[tuple[bytes, Any]] = collections.deque()
        self.dropped_replies = 0
        """Replies dropped because the send queue was full or the send failed."""
        self.recv_errors = 0
        """Errors from recvfrom (ICMP errors for earlier replies), read past."""
        self.send_retries = 0
        """Replies sent again because sendto reported an earlier ICMP error."""
        self.deferred = 0
        """Replies that waited in the queue for the socket to become writable."""
        self.reads = 0
        """Reader callbacks run."""
        self._fd = sock.fileno()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Make the socket non-blocking and start reading it."""
        self._loop = loop or asyncio.get_running_loop()
        self.sock.setblocking(False)
        quiet_icmp_errors(self.sock)
        self._loop.add_reader(self._fd, self._readable)

    def close(self) -> None:
        """Stop reading and writing and close the socket (queued replies are dropped)."""
        if self.closed:
            return
        self.closed = True
        self.accepting = False
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
                self._writing = False
        self.dropped_replies += len(self.queued)
        self.queued.clear()
        self.sock.close()

    def _readable(self) -> None:
        recvfrom = self.sock.recvfrom
        receive = self.receive
        self.reads += 1
        for _ in range(self.budget):
            try:
                data, addr = recvfrom(_RECV_SIZE)
            except _WOULD_BLOCK:
                return
            except OSError as exc:
                # ICMP errors for earlier replies (the client went away) surface
                # here as ECONNREFUSED and the like: note them and read on.
                self.recv_errors += 1
                log.debug("UDP error: %s", exc)
                continue
            receive(data, addr)

    def send(self, reply: bytes, addr: Any) -> None:
        if self.closed:
            return
        if self.queued:  # keep the order: behind what is already waiting
            self._queue(reply, addr)
            return
        error = self._sendto(reply, addr)
        if error is not None:
            if error.errno in _SEND_LATER:
                self._queue(reply, addr)
            else:
                self.dropped_replies += 1
                log.debug("UDP send to %s: %s", addr[0], error)

    def _sendto(self, reply: bytes, addr: Any) -> OSError | None:
        """Send once (twice if an earlier ICMP error got in the way); the error if any."""
        try:
            self.sock.sendto(reply, addr)
        except OSError as exc:
            if exc.errno not in _ICMP_ERRORS:
                return exc
            self.send_retries += 1
            try:
                self.sock.sendto(reply, addr)
            except OSError as again:
                return again
        return None

    def _queue(self, reply: bytes, addr: Any) -> None:
        queued = self.queued
        if len(queued) >= self.max_queued:
            queued.popleft()
            self.dropped_replies += 1
            if self.dropped_replies in (1, 100) or self.dropped_replies % 10000 == 0:
                log.warning("UDP send queue full: %d replies dropped so far", self.dropped_replies)
        queued.append((reply, addr))
        self.deferred += 1
        if not self._writing and self._loop is not None and not self.closed:
            self._loop.add_writer(self._fd, self._writable)
            self._writing = True

    def _writable(self) -> None:
        queued = self.queued
        while queued:
            reply, addr = queued[0]
            error = self._sendto(reply, addr)
            if error is not None:
                if error.errno in _SEND_LATER:
                    return
                self.dropped_replies += 1
                log.debug("UDP send to %s: %s", addr[0], error)
            queued.popleft()
        if self._writing and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writing = False
