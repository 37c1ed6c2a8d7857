"""aioquic's :class:`QuicServer`, with :mod:`doqproxy.doq.admission` deciding before any TLS.

aioquic builds a :class:`QuicConnection` for every new Initial and only then lets
the application refuse it, after the whole ClientHello has been processed (about
1.45 ms each). Here a new connection's first Initial is weighed first:

- REFUSE: a CONNECTION_CLOSE (CONNECTION_REFUSED) in an Initial packet built from
  the client's own connection IDs; no connection object, no TLS;
- RETRY: aioquic's stateless Retry, turned on for this one datagram;
- ACCEPT: aioquic's usual path; a client that shows a valid Retry token keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicHeader,
    QuicPacketType,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.retry import QuicRetryTokenHandler

from doqproxy.doq.admission import Admission, Verdict

ConnectionFactory = Callable[[QuicConnection, str], QuicConnectionProtocol]
"""Makes the protocol for an accepted connection, given the client's address."""


def refusal_packet(header: QuicHeader, reason: str) -> bytes:
    """An Initial packet closing the client's connection with CONNECTION_REFUSED.

    The Initial keys come from the client's destination connection ID, so this
    needs no state and no TLS. It is smaller than the client's padded Initial,
    so it amplifies nothing.
    """
    crypto = CryptoPair()
    assert header.version is not None
    crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    builder = QuicPacketBuilder(
        host_cid=header.destination_cid,
        is_client=False,
        max_datagram_size=SMALLEST_MAX_DATAGRAM_SIZE,
        peer_cid=header.source_cid,
        version=header.version,
    )
    builder.start_packet(QuicPacketType.INITIAL, crypto)
    phrase = reason.encode()[:64]
    buf = builder.start_frame(QuicFrameType.TRANSPORT_CLOSE, capacity=16 + len(phrase))
    buf.push_uint_var(QuicErrorCode.CONNECTION_REFUSED)
    buf.push_uint_var(QuicFrameType.PADDING)
    buf.push_uint_var(len(phrase))
    buf.push_bytes(phrase)
    datagrams, _ = builder.flush()
    return datagrams[0]


class GuardedQuicServer(QuicServer):
    """A :class:`QuicServer` that asks ``admission`` about every new connection."""

    def __init__(
        self,
        *,
        admission: Admission,
        create_connection: ConnectionFactory,
        on_refused: Callable[[str, str], None],
        on_retry: Callable[[], None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(create_protocol=self._create, retry=False, **kwargs)
        self.admission = admission
        self._create_connection = create_connection
        self._on_refused = on_refused
        self._on_retry = on_retry
        self._tokens = QuicRetryTokenHandler()
        self._use_retry(None)
        self._client = ""

    def _use_retry(self, handler: QuicRetryTokenHandler | None) -> None:
        # aioquic reads self._retry for each new connection's first datagram only.
        self._retry = handler  # type: ignore[assignment]

    def _create(
        self, quic: QuicConnection, stream_handler: object = None
    ) -> QuicConnectionProtocol:
        return self._create_connection(quic, self._client)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        data = cast(bytes, data)
        header = self._new_initial(data)
        if header is None:
            super().datagram_received(data, addr)
            return
        validated = False
        if header.token:
            try:
                self._tokens.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=self._loop.time(),
                )
                validated = True
            except ValueError:
                pass
        host = str(addr[0])
        verdict, reason = self.admission.decide(host, validated=validated)
        if verdict is Verdict.REFUSE:
            assert self._transport is not None
            self._transport.sendto(refusal_packet(header, reason), addr)
            self._on_refused(host, reason)
            return
        if verdict is Verdict.RETRY:
            self._on_retry()
        # RETRY: aioquic sends the Retry (or INVALID_TOKEN for a bad token). ACCEPT:
        # aioquic checks a valid token again and records the Retry's connection IDs;
        # without one, the connection starts unvalidated and any stale token is ignored.
        self._use_retry(self._tokens if verdict is Verdict.RETRY or validated else None)
        self._client = host
        try:
            super().datagram_received(data, addr)
        finally:
            self._use_retry(None)
            self._client = ""

    def _new_initial(self, data: bytes) -> QuicHeader | None:
        """The header of a datagram that would start a new connection, else ``None``."""
        if len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
            return None
        try:
            header = pull_quic_header(
                Buffer(data=data), host_cid_length=self._configuration.connection_id_length
            )
        except ValueError:
            return None
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in self._configuration.supported_versions
            or header.destination_cid in self._protocols
        ):
            return None
        return header
