"""Finding an upstream's addresses without asking ourselves.

An upstream given by name is resolved through ``--bootstrap udp://IP[:PORT]``
servers (plain DNS, A and AAAA asked together); the addresses are kept for their
TTL, clamped to [:data:`MIN_TTL`, :data:`MAX_TTL`], and looked up again after a
connection failure. Pinned addresses (``--upstream-address``, a stamp's address)
are used as they are. Without bootstrap servers the system resolver is used, and
:func:`check_no_loop` refuses to start when that resolver is doqproxy itself.

Addresses come back IPv6 first, then IPv4, interleaved (RFC 8305 §4);
:func:`happy_eyeballs` races connection attempts over them, starting the next one
:data:`ATTEMPT_DELAY` seconds after the previous unless it failed sooner.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from doqproxy.dns import wire
from doqproxy.net.addresses import UpstreamUrl, is_ip_literal
from doqproxy.upstream.base import UpstreamError
from doqproxy.upstream.plain import PlainUpstream

log = logging.getLogger(__name__)

MIN_TTL = 60.0
MAX_TTL = 3600.0
ATTEMPT_DELAY = 0.05
"""Seconds between starting connection attempts (RFC 8305 recommends 250 ms; a DoQ
or DoT handshake to a nearby resolver is faster than that)."""
RESOLV_CONF_ENV = "DOQPROXY_RESOLV_CONF"
"""Read instead of /etc/resolv.conf by :func:`check_no_loop` (for tests)."""

T = TypeVar("T")


class BootstrapError(ValueError):
    """Start-up must not go on; the message says what to add."""


def order_addresses(addresses: Iterable[str]) -> list[str]:
    """IPv6 first, then alternate families (RFC 8305 §4), duplicates removed."""
    unique = list(dict.fromkeys(addresses))
    v6 = [a for a in unique if ":" in a]
    v4 = [a for a in unique if ":" not in a]
    out: list[str] = []
    for pair in itertools.zip_longest(v6, v4):
        out.extend(a for a in pair if a is not None)
    return out


class Bootstrap:
    """Resolves upstream host names; shared by every upstream of a process."""

    def __init__(
        self,
        servers: Iterable[str] = (),
        *,
        pinned: dict[str, tuple[str, ...]] | None = None,
        timeout: float = 3.0,
    ) -> None:
        self.servers = [PlainUpstream(_server_url(text), tcp_timeout=timeout) for text in servers]
        self.pinned = {host.lower().rstrip("."): v for host, v in (pinned or {}).items()}
        self.timeout = timeout
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        """Addresses to try for ``host``, best first (raises :class:`UpstreamError`)."""
        if is_ip_literal(host):
            return [(host, port)]
        key = host.lower().rstrip(".")
        pinned = self.pinned.get(key)
        if pinned:
            return [(address, port) for address in order_addresses(pinned)]
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return [(address, port) for address in cached[1]]
        addresses, ttl = await (self._ask(key) if self.servers else self._system(key, port))
        if not addresses:
            raise UpstreamError(f"cannot resolve {host}: no A or AAAA records")
        ordered = order_addresses(addresses)
        self._cache[key] = (time.monotonic() + min(max(ttl, MIN_TTL), MAX_TTL), ordered)
        return [(address, port) for address in ordered]

    def failed(self, host: str) -> None:
        """A connection to ``host`` failed: look it up again next time."""
        self._cache.pop(host.lower().rstrip("."), None)

    async def _ask(self, host: str) -> tuple[list[str], float]:
        self.lookups += 1
        errors = []
        for server in self.servers:
            # Each type on its own clock: a server that ignores AAAA (some home routers
            # do) must not cost the A records it did send.
            results = await asyncio.gather(
                *(
                    asyncio.wait_for(self._lookup(server, host, rdtype), self.timeout)
                    for rdtype in ("AAAA", "A")
                ),
                return_exceptions=True,
            )
            answered = [r for r in results if isinstance(r, tuple)]
            if not answered:
                errors.append(f"{server.name}: {_why(results[0])}")
                continue
            addresses = [a for found, _ in answered for a in found]
            ttls = [ttl for found, ttl in answered if found]
            return addresses, min(ttls) if ttls else MIN_TTL
        raise UpstreamError(f"cannot resolve {host} through the bootstrap: " + "; ".join(errors))

    @staticmethod
    async def _lookup(server: PlainUpstream, host: str, rdtype: str) -> tuple[list[str], float]:
        # dnspython's message module costs ~4 MB of RSS: only when a lookup happens.
        import dns.message
        import dns.rdatatype

        query = dns.message.make_query(host, rdtype)
        data = query.to_wire()
        reply = dns.message.from_wire(await server.query(data, wire.parse_question(data)))
        kind = dns.rdatatype.from_text(rdtype)
        found, ttl = [], MAX_TTL
        for rrset in reply.answer:
            if rrset.rdtype == kind:
                found += [rd.to_text() for rd in rrset]
                ttl = min(ttl, float(rrset.ttl))
        return found, ttl

    @staticmethod
    async def _system(host: str, port: int) -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise UpstreamError(f"cannot resolve {host}: {exc}") from None
        return [str(info[4][0]) for info in infos], MIN_TTL


def _why(failure: object) -> str:
    """A failed lookup in words; anything but a timeout, an upstream error or a
    malformed answer is a bug and is raised."""
    if isinstance(failure, TimeoutError):
        return "no answer (timeout)"
    if isinstance(failure, UpstreamError):
        return str(failure)
    import dns.exception  # already loaded by the lookup that failed

    if isinstance(failure, dns.exception.DNSException):
        return f"bad answer ({failure})"
    assert isinstance(failure, BaseException)
    raise failure


def _server_url(text: str) -> UpstreamUrl:
    host, _, port = text.rpartition(":")
    return UpstreamUrl("udp", host.strip("[]"), int(port))


async def happy_eyeballs(
    addresses: list[T], attempt: Callable[[T], Awaitable[object]], delay: float = ATTEMPT_DELAY
) -> tuple[T, object]:
    """Race ``attempt`` over ``addresses`` (RFC 8305 §5): each starts ``delay`` seconds
    after the previous, or at once when that one failed. The first success wins and
    the others are cancelled; if all fail, the last error is raised."""
    if not addresses:
        raise OSError("no address to connect to")
    tasks: dict[asyncio.Task[object], T] = {}
    error: BaseException | None = None
    pending = list(addresses)
    try:
        while pending or tasks:
            if pending:
                address = pending.pop(0)
                tasks[asyncio.ensure_future(attempt(address))] = address
            done, _ = await asyncio.wait(
                tasks, timeout=delay if pending else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                address = tasks.pop(task)
                if task.exception() is None:
                    return address, task.result()
                error = task.exception()
        assert error is not None
        raise error
    finally:
        for task in tasks:
            task.cancel()


def system_nameservers(path: str | None = None) -> list[str]:
    """The ``nameserver`` addresses of resolv.conf (``$DOQPROXY_RESOLV_CONF`` for tests)."""
    path = path or os.environ.get(RESOLV_CONF_ENV) or "/etc/resolv.conf"
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            found.append(parts[1].split("%")[0])
    return found


def check_no_loop(
    upstream_hosts: Iterable[str],
    listen: Iterable[tuple[str, int]],
    *,
    bootstrap: bool,
    nameservers: list[str] | None = None,
    servers: Iterable[str] = (),
) -> None:
    """Refuse to start when an upstream name would be resolved through ourselves.

    That is: no bootstrap, an upstream given by name without pinned addresses, and
    a system nameserver that is one of our listen addresses on port 53 (resolv.conf
    has no ports). Raises :class:`BootstrapError` with what to add.
    """
    names = sorted({h for h in upstream_hosts if not is_ip_literal(h)})
    if not names:
        return
    for text in servers:  # ``IP:PORT`` of --bootstrap: one of our own listeners?
        url = _server_url(text)
        target = ipaddress.ip_address(url.host)
        for host, port in listen:
            mine = ipaddress.ip_address(host)
            if port == url.port and (
                target == mine or (mine.is_unspecified and target.is_loopback)
            ):
                raise BootstrapError(
                    f"--bootstrap {text} is doqproxy itself, so it cannot look up "
                    f"{names[0]}: name another DNS server (e.g. your router or 9.9.9.9)"
                )
    if bootstrap:
        return
    ours = {ipaddress.ip_address(host) for host, port in listen if port == 53}
    unspecified = {a for a in ours if a.is_unspecified}
    for server in nameservers if nameservers is not None else system_nameservers():
        try:
            address = ipaddress.ip_address(server)
        except ValueError:
            continue
        if address in ours or (unspecified and (address.is_loopback or address in ours)):
            raise BootstrapError(
                f"the system resolver ({server}) is doqproxy itself, so it cannot look up "
                f"{names[0]}: add --bootstrap udp://IP (e.g. your router or 9.9.9.9), or "
                f"--upstream-address {names[0]}=IP"
            )
