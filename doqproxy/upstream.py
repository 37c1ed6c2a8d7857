"""What the resolver pipeline needs from whatever answers its queries."""

from __future__ import annotations

import enum
from typing import Protocol

from .wire import Question


class Ede(enum.IntEnum):
    """Extended DNS Error codes (RFC 8914, RFC 9250) that doqproxy sends."""

    OTHER = 0
    STALE_ANSWER = 3
    NOT_READY = 14
    NO_REACHABLE_AUTHORITY = 22
    NETWORK_ERROR = 23
    INVALID_DATA = 24
    TOO_EARLY = 26


class UpstreamError(Exception):
    """An upstream did not give a usable answer.

    The message says why, in words fit for an Extended DNS Error's EXTRA-TEXT;
    ``ede`` is the INFO-CODE.
    """

    def __init__(self, message: str, ede: Ede = Ede.NETWORK_ERROR) -> None:
        super().__init__(message)
        self.ede = ede


class Upstream(Protocol):
    """Something that answers DNS queries given as wire bytes with ID 0."""

    name: str
    """Shown in logs and EDE texts, e.g. ``quic://dns.example:853``."""
    pad_block: int | None
    """Block size the resolver pads queries to before calling :meth:`query`."""

    async def query(self, message: bytes, question: Question) -> bytes:
        """Return the answer (ID 0), or raise :class:`UpstreamError`."""
        ...

    async def aclose(self) -> None:
        """Release connections; in-flight queries fail."""
        ...
