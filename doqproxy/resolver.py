"""The one request pipeline that every front end (UDP, TCP, DoQ) hands queries to.

validate → upstream → check → reply. Each step is a pure function from
:mod:`doqproxy.validate` or :mod:`doqproxy.rewrite`; this module only sequences
them, applies the deadline and turns failures into SERVFAIL with an Extended
DNS Error saying why.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from . import rewrite, validate, wire
from .upstream import Ede, Upstream, UpstreamError
from .wire import Question

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ResolverStats:
    """Counters kept for logs and metrics."""

    queries: int = 0
    dropped: int = 0
    rejected: int = 0
    upstream_errors: int = 0
    rcodes: dict[int, int] = field(default_factory=dict)


class Resolver:
    """Answers raw DNS queries through one :class:`~doqproxy.upstream.Upstream`."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        timeout: float = 5.0,
        opcodes: frozenset[int] = frozenset({wire.OPCODE_QUERY}),
    ) -> None:
        self.upstream = upstream
        self.timeout = timeout
        self.opcodes = opcodes
        self.stats = ResolverStats()

    async def resolve(self, data: bytes, *, udp: bool) -> bytes | None:
        """The reply to send for ``data``, or ``None`` to send nothing."""
        self.stats.queries += 1
        verdict = validate.classify(data, self.opcodes)
        if isinstance(verdict, validate.Rejected):
            if verdict.reply is None:
                self.stats.dropped += 1
            else:
                self.stats.rejected += 1
            log.debug("rejected query: %s", verdict.reason)
            return verdict.reply
        return await self.forward(data, verdict, udp=udp)

    async def forward(self, data: bytes, question: Question, *, udp: bool) -> bytes:
        """Send a valid query upstream and shape the answer for the client."""
        message = rewrite.upstream_query(data, question, pad_block=self.upstream.pad_block)
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.upstream.query(message, question)
            parsed = rewrite.check_response(response, question)
        except TimeoutError:
            return self._failure(
                question,
                f"{self.upstream.name}: no answer within {self.timeout:g}s",
                Ede.NO_REACHABLE_AUTHORITY,
            )
        except UpstreamError as exc:
            return self._failure(question, f"{self.upstream.name}: {exc}", exc.ede)
        except rewrite.ResponseMismatch as exc:
            return self._failure(question, f"{self.upstream.name}: {exc}", Ede.INVALID_DATA)
        reply = rewrite.client_reply(response, parsed, question, udp=udp)
        rcode = wire.get_rcode(reply)
        self.stats.rcodes[rcode] = self.stats.rcodes.get(rcode, 0) + 1
        return reply

    def _failure(self, question: Question, reason: str, ede: Ede) -> bytes:
        self.stats.upstream_errors += 1
        self.stats.rcodes[wire.RCODE_SERVFAIL] = self.stats.rcodes.get(wire.RCODE_SERVFAIL, 0) + 1
        log.warning("SERVFAIL for %s: %s", _name(question), reason)
        return wire.error_reply(question, wire.RCODE_SERVFAIL, ede=(ede, reason[:200]))


def _name(question: Question) -> str:
    labels = []
    pos = 0
    qname = question.qname
    while qname[pos]:
        labels.append(qname[pos + 1 : pos + 1 + qname[pos]].decode("ascii", "backslashreplace"))
        pos += 1 + qname[pos]
    return ".".join(labels) + "."
