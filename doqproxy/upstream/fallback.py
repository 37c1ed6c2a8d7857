"""``--fallback``: other upstreams used only while a route's DoQ upstreams all fail.

:class:`FallbackUpstream` wraps the route's primary upstream (one pool or a group)
and tracks its failures itself, so it works with either. While the primary
answers, the fallbacks are never asked. When the primary fails (an error, or no
answer within ``primary_budget`` seconds: UDP 853 blocked, a black hole), that
query and the following ones go to the fallbacks in order, and a real query is
sent to the primary every ``probe_interval`` seconds in the background; the
first one it answers switches traffic back. Each switch is logged at WARNING and
counted. A plain ``udp://`` fallback (only ever when the user names it) is
named as unencrypted in that warning.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from doqproxy.dns.ede import Ede
from doqproxy.dns.padding import repad
from doqproxy.dns.wire import Question
from doqproxy.upstream import answered
from doqproxy.upstream.base import Upstream, UpstreamError

log = logging.getLogger(__name__)

TO_FALLBACK = "to_fallback"
TO_PRIMARY = "to_primary"


class FallbackUpstream:
    """An :class:`~doqproxy.upstream.base.Upstream`: ``primary`` while it works,
    else ``fallbacks`` until a probe of the primary succeeds."""

    def __init__(
        self,
        primary: Upstream,
        fallbacks: Sequence[Upstream],
        *,
        route: str = ".",
        primary_budget: float = 2.5,
        probe_interval: float = 5.0,
    ) -> None:
        self.primary = primary
        self.fallbacks = list(fallbacks)
        self.route = route
        self.name = primary.name
        self.pad_block = primary.pad_block
        self.primary_budget = primary_budget
        self.probe_interval = probe_interval
        self.active = False
        """True while the fallbacks carry the traffic."""
        self.switches = {TO_FALLBACK: 0, TO_PRIMARY: 0}
        self.answered_by_fallback = 0
        self._next_probe = 0.0
        self._probes: set[asyncio.Task[None]] = set()

    async def query(self, message: bytes, question: Question) -> bytes:
        if self.active:
            self._maybe_probe(message, question)
            return await self._fallback(message, question)
        try:
            async with asyncio.timeout(self.primary_budget):
                return await self.primary.query(message, question)
        except TimeoutError:
            reason = f"no answer within {self.primary_budget:g}s"
        except UpstreamError as exc:
            reason = str(exc)
        if not self.active:
            self._switch(True, reason)
        return await self._fallback(message, question)

    async def aclose(self) -> None:
        """Stop probing; the primary and the fallbacks belong to whoever made them."""
        for task in list(self._probes):
            task.cancel()

    def _switch(self, to_fallback: bool, reason: str) -> None:
        self.active = to_fallback
        direction = TO_FALLBACK if to_fallback else TO_PRIMARY
        self.switches[direction] += 1
        if to_fallback:
            self._next_probe = time.monotonic() + self.probe_interval
            names = ", ".join(_describe(f) for f in self.fallbacks)
            log.warning(
                "route %s: %s is failing (%s); using the fallback %s",
                self.route, self.primary.name, reason, names,
            )  # fmt: skip
        else:
            log.warning(
                "route %s: %s answers again; leaving the fallback", self.route, self.primary.name
            )

    async def _fallback(self, message: bytes, question: Question) -> bytes:
        errors = []
        for upstream in self.fallbacks:
            outgoing = message
            if upstream.pad_block != self.pad_block:
                outgoing = repad(message, upstream.pad_block)
            since = answered.mark()
            try:
                answer = await upstream.query(outgoing, question)
            except UpstreamError as exc:
                errors.append(f"{upstream.name}: {exc}")
                continue
            answered.note(upstream.name, since)
            self.answered_by_fallback += 1
            return answer
        raise UpstreamError(
            f"{self.primary.name} failing, and the fallback too: " + "; ".join(errors),
            Ede.NO_REACHABLE_AUTHORITY,
        )

    def _maybe_probe(self, message: bytes, question: Question) -> None:
        now = time.monotonic()
        if self._probes or now < self._next_probe:
            return
        self._next_probe = now + self.probe_interval
        task = asyncio.ensure_future(self._probe(message, question))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, message: bytes, question: Question) -> None:
        try:
            async with asyncio.timeout(self.primary_budget):
                await self.primary.query(message, question)
        except (TimeoutError, UpstreamError) as exc:
            log.debug("route %s: probe of %s failed: %s", self.route, self.primary.name, exc)
            return
        if self.active:
            self._switch(False, "")


def _describe(upstream: Upstream) -> str:
    if upstream.name.startswith("udp://"):
        return f"{upstream.name} (plain DNS, unencrypted)"
    return upstream.name
