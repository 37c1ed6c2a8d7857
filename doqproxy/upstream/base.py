"""What the resolver pipeline needs from whatever answers its queries."""

from __future__ import annotations

from typing import Protocol

from doqproxy.dns.ede import Ede
from doqproxy.dns.wire import Question


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
