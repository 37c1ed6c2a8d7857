"""DNS over TLS (RFC 7858): one pipelined TCP+TLS connection per upstream (RFC 7766).

Queries arrive with ID 0 (the resolver's convention); each one in flight gets a
unique random ID on the wire and its answer is matched back by that ID, in
whatever order the server answers. The connection is opened on demand, closed
after ``idle_timeout`` seconds without queries, and opened again after any
failure; a query whose connection died under it is tried once more on a new one
(DNS queries are idempotent). Verification is as strict as for DoQ: the system
trust store or ``--tls-ca-file``, the server name checked, TLS 1.2 at least, and
an optional SPKI pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import cast

from doqproxy.dns import wire
from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question
from doqproxy.net.addresses import UpstreamUrl
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.bootstrap import happy_eyeballs
from doqproxy.upstream.pins import PinMismatch, check_pin

log = logging.getLogger(__name__)

Resolve = Callable[[str, int], Awaitable[list[tuple[str, int]]]]
"""Host and port → addresses to try, best first (see :mod:`doqproxy.upstream.bootstrap`)."""
Connect = Callable[
    [list[tuple[str, int]]], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
]


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A strict client context: certificate and host name verified, TLS 1.2+."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.dead = False
        self.task: asyncio.Task[None] | None = None
        self.idle: asyncio.TimerHandle | None = None

    def new_id(self) -> int:
        while True:
            msg_id = secrets.randbelow(0xFFFF) + 1
            if msg_id not in self.pending:
                return msg_id


class DotUpstream:
    """An :class:`~doqproxy.upstream.base.Upstream` speaking DNS over TLS to one server."""

    def __init__(
        self,
        url: UpstreamUrl,
        context: ssl.SSLContext,
        *,
        server_name: str | None = None,
        resolve: Resolve | None = None,
        connect: Connect | None = None,
        pad_block: int | None = 128,
        idle_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        pins: tuple[str, ...] = (),
        forget: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self._forget = forget
        self.name = str(url)
        self.pad_block = pad_block
        self.server_name = server_name or url.host
        self.context = context
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.pins = pins
        self._resolve = resolve
        self._connect = connect
        self._conn: _Connection | None = None
        self._opening: asyncio.Task[_Connection] | None = None
        self._closed = False
        self.connections_opened = 0
        self.last_error = ""

    async def query(self, message: bytes, question: Question) -> bytes:
        for attempt in range(2):
            conn = await self._connection()
            try:
                return await self._exchange(conn, message)
            except _Lost as exc:
                if attempt:
                    raise UpstreamError(f"{self.name}: {exc}", Ede.NETWORK_ERROR) from None
                log.debug("%s: retrying a query after: %s", self.name, exc)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        if self._conn is not None:
            self._drop(self._conn, _Lost("shutting down"))

    # --- connections ---------------------------------------------------------

    async def _connection(self) -> _Connection:
        if self._closed:
            raise UpstreamError("shutting down", Ede.NOT_READY)
        conn = self._conn
        if conn is not None and not conn.dead:
            return conn
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, task: asyncio.Task[_Connection]) -> None:
        self._opening = None
        if task.cancelled():
            return
        if task.exception() is None:
            self._conn = task.result()

    async def _open(self) -> _Connection:
        host, port = self.url.host, self.url.port
        if self._resolve is not None:
            addresses = await self._resolve(host, port)
        else:
            addresses = [(host, port)]
        try:
            reader, writer = await self._handshake(addresses)
        except UpstreamError:
            if self._forget is not None:
                self._forget(host)  # look the name up again next time
            raise
        ssl_object = writer.get_extra_info("ssl_object")
        try:
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            check_pin(self.server_name, der, self.pins)
        except PinMismatch as exc:
            writer.close()
            self.last_error = str(exc)
            raise
        self.connections_opened += 1
        conn = _Connection(reader, writer)
        conn.task = asyncio.ensure_future(self._read(conn))
        self._arm_idle(conn)
        return conn

    async def _handshake(
        self, addresses: list[tuple[str, int]]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._connect is not None:
                    return await self._connect(addresses)
                return await _first_connection(addresses, self.context, self.server_name)
        except TimeoutError:
            self.last_error = f"no TLS connection within {self.connect_timeout:g}s"
            raise UpstreamError(
                f"{self.name}: {self.last_error}", Ede.NO_REACHABLE_AUTHORITY
            ) from None
        except ssl.SSLCertVerificationError as exc:
            self.last_error = f"TLS verification failed: {exc.verify_message}"
            raise UpstreamError(f"{self.name}: {self.last_error}", Ede.NETWORK_ERROR) from None
        except (ssl.SSLError, OSError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.last_error = f"cannot connect: {detail}"
            raise UpstreamError(f"{self.name}: {self.last_error}", Ede.NETWORK_ERROR) from None

    def _arm_idle(self, conn: _Connection) -> None:
        if conn.idle is not None:
            conn.idle.cancel()
        conn.idle = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle_check, conn)

    def _idle_check(self, conn: _Connection) -> None:
        conn.idle = None
        if conn.pending:
            self._arm_idle(conn)
        else:
            self._drop(conn, _Lost("idle"))

    def _drop(self, conn: _Connection, exc: _Lost) -> None:
        if conn.dead:
            return
        conn.dead = True
        if self._conn is conn:
            self._conn = None
        if conn.idle is not None:
            conn.idle.cancel()
        pending, conn.pending = conn.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()
        with contextlib.suppress(Exception):
            conn.writer.close()

    # --- queries -------------------------------------------------------------

    async def _exchange(self, conn: _Connection, message: bytes) -> bytes:
        msg_id = conn.new_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        conn.pending[msg_id] = future
        try:
            conn.writer.write(struct.pack("!H", len(message)) + wire.set_id(message, msg_id))
            reply = await future
        finally:
            conn.pending.pop(msg_id, None)
        return wire.set_id(reply, 0)

    async def _read(self, conn: _Connection) -> None:
        reason = "closed by the server"
        try:
            while True:
                (length,) = struct.unpack("!H", await conn.reader.readexactly(2))
                data = await conn.reader.readexactly(length)
                if len(data) < wire.HEADER_LEN:
                    continue
                future = conn.pending.get(wire.get_id(data))
                if future is not None and not future.done():
                    future.set_result(data)
                self._arm_idle(conn)
        except asyncio.IncompleteReadError:
            pass
        except (OSError, ssl.SSLError) as exc:
            reason = f"connection failed: {exc}"
        self._drop(conn, _Lost(reason))


class _Lost(Exception):
    """The connection went away before the answer came."""


async def _first_connection(
    addresses: list[tuple[str, int]], context: ssl.SSLContext, server_name: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TLS to the first address that completes a handshake (Happy Eyeballs, RFC 8305)."""

    async def attempt(
        address: tuple[str, int],
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            address[0], address[1], ssl=context, server_hostname=server_name
        )

    _, streams = await happy_eyeballs(addresses, attempt)
    return cast(tuple[asyncio.StreamReader, asyncio.StreamWriter], streams)
