"""What a long-running ``doqproxy forward`` does besides answering queries.

sd_notify (READY, STATUS, WATCHDOG, STOPPING), the metrics endpoint, the query
log, and the signals: SIGHUP reloads the configuration, SIGUSR1 logs a stats
summary. :func:`doqproxy.forwarder.serve` creates one :class:`Operations` and
calls it at start, on reload and at shutdown; each feature is inert when off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from doqproxy.frontend.admission import Admission
from doqproxy.frontend.inflight import InFlight
from doqproxy.frontend.tcp import TcpStats
from doqproxy.net.addresses import HostPort
from doqproxy.ops import early
from doqproxy.ops.observers import (
    LatencyHistogram,
    Observations,
    ObservedResolver,
    QueryLog,
    TimedUpstream,
)
from doqproxy.ops.systemd import Notifier
from doqproxy.resolver import Resolver
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.group import UpstreamGroup
from doqproxy.upstream.pool import DoqUpstream

log = logging.getLogger(__name__)


STATUS_INTERVAL = 10.0
"""Seconds between STATUS= updates when there is no watchdog to piggyback on."""


@dataclass(slots=True, frozen=True)
class OpsSettings:
    """The ``forward`` options that are about running it, not about DNS."""

    metrics_listen: HostPort | None = None
    query_log: str | None = None
    user: str | None = None
    verbose: int = 0


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP literal) is a loopback address; a wildcard is not."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def log_level(verbose: int) -> int:
    return logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG


class Operations:
    """Runs the operational side of one forwarder process."""

    def __init__(self, settings: OpsSettings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier if notifier is not None else Notifier()
        self.latency: dict[str, LatencyHistogram] = {}
        self.observations = Observations(count=settings.metrics_listen is not None)
        self.resolver: Resolver | None = None
        self.upstream: UpstreamGroup | None = None
        self.inflight: InFlight | None = None
        self.on_reload: Callable[[], object] | None = None
        self.admission: Admission | None = None
        self.tcp_stats: TcpStats | None = None
        self.fallbacks: Callable[[], list[Any]] = list
        """The routes' fallback wrappers, for metrics (set by the forwarder)."""
        self._metrics: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics_address: tuple[str, int] | None = None
        self._stopping = False

    @property
    def observing(self) -> bool:
        return self.settings.metrics_listen is not None or self.settings.query_log is not None

    def wrap_upstream(self, upstream: Upstream) -> Upstream:
        """Time upstream queries when metrics are on; otherwise ``upstream`` itself."""
        if self.settings.metrics_listen is None:
            return upstream
        histogram = self.latency.setdefault(upstream.name, LatencyHistogram())
        return TimedUpstream(upstream, histogram)

    def front_resolver(self, resolver: Resolver) -> Resolver:
        """What the front ends should call: ``resolver``, or an observing facade."""
        if not self.observing:
            return resolver
        return cast(Resolver, ObservedResolver(resolver, self.observations))

    def start(self, resolver: Resolver, upstream: UpstreamGroup, inflight: InFlight) -> None:
        """Called once the listeners are up (raises OSError if metrics cannot bind)."""
        self.resolver, self.upstream, self.inflight = resolver, upstream, inflight
        if self.settings.query_log is not None:
            query_log = QueryLog(self.settings.query_log)
            self.observations.query_log = query_log
            self._spawn(self._flush_every(query_log, QueryLog.FLUSH_INTERVAL))
        if self.settings.metrics_listen is not None:
            self._start_metrics(self.settings.metrics_listen)
        loop = asyncio.get_running_loop()
        self._take_signals(loop)
        self.notifier.ready(self.summary())
        if early.received:
            early.received.clear()
            loop.call_soon(self._sighup)  # the file may have changed since it was read
        if self.notifier.enabled:
            self._spawn(self._heartbeat())

    def _start_metrics(self, address: HostPort) -> None:
        # prometheus-client is imported only when metrics are asked for.
        from doqproxy.ops.metrics import ForwardCollector, MetricsServer, Sources

        sources = Sources(
            resolver=lambda: cast(Resolver, self.resolver),
            upstream=lambda: cast(UpstreamGroup, self.upstream),
            latency=lambda: self.latency,
            observations=self.observations,
            in_flight=lambda: len(self.inflight) if self.inflight is not None else 0,
            fallbacks=lambda: self.fallbacks(),
            admission=lambda: self.admission.stats if self.admission is not None else None,
            tcp=lambda: self.tcp_stats,
        )
        self._metrics = MetricsServer(address, ForwardCollector(sources))
        self.metrics_address = self._metrics.start()
        log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
        if not is_loopback_host(self.metrics_address[0]):
            log.warning(
                "metrics on http://%s:%d/metrics are reachable from other hosts and have "
                "no authentication; prefer a loopback address or a firewall",
                *self.metrics_address,
            )

    def summary(self) -> str:
        """One line of live counts, for STATUS= and SIGUSR1."""
        parts = []
        resolver, upstream = self.resolver, self.upstream
        if resolver is not None:
            stats = resolver.stats
            servfail = stats.rcodes.get(2, 0)
            parts.append(f"queries {stats.queries}, SERVFAIL {servfail}")
            if resolver.cache is not None:
                cache = resolver.cache.stats
                parts.append(
                    f"cache {len(resolver.cache)} entries, hits {cache.hits}, "
                    f"misses {cache.misses}, stale {cache.stale}"
                )
        if self.inflight is not None:
            parts.append(f"in flight {len(self.inflight)}")
        for member in upstream.members if upstream is not None else ():
            pool = member.upstream
            text = f"upstream {member.name} {member.health.state}"
            if isinstance(pool, DoqUpstream):
                counts = pool.stats
                text += (
                    f": {len(pool.connections)} connections, "
                    f"{counts.handshakes} handshakes ({counts.sessions_resumed} resumed, "
                    f"0-RTT {counts.early_data_accepted}/{counts.early_data_sent}), "
                    "datagrams out {}, in {}".format(*pool.datagrams())
                )
            parts.append(text)
        return "; ".join(parts) or "starting"

    async def _heartbeat(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC, from the event loop itself: a stuck
        loop stops the pings and systemd restarts the service."""
        interval = self.notifier.watchdog_interval
        while True:
            await asyncio.sleep(interval or STATUS_INTERVAL)
            if interval is not None:
                self.notifier.send("WATCHDOG=1", f"STATUS={self.summary()}")
            else:
                self.notifier.status(self.summary())

    async def _flush_every(self, query_log: QueryLog, interval: float) -> None:
        """Quiet periods: lines buffered by the last queries still reach the file."""
        while True:
            await asyncio.sleep(interval)
            query_log.flush()

    def _take_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGHUP reloads, SIGUSR1 logs the counts.

        Plain ``signal.signal`` handlers that hand over to the loop, not the loop's
        ``add_signal_handler``: :meth:`stopping` can then switch them to SIG_IGN in
        one step, where removing a loop's handler passes through SIG_DFL first (a
        SIGHUP in that instant ended the process mid-shutdown), and the loop never
        resets them to SIG_DFL when it closes. Python runs them in the main thread;
        the loop's wakeup fd (set for SIGINT/SIGTERM) wakes it for them.
        """
        if threading.current_thread() is not threading.main_thread():
            return

        def handing_over(callback: Callable[[], None]) -> Callable[..., None]:
            def handler(signum: int, frame: object) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(callback)

            return handler

        early.owned = True
        signal.signal(signal.SIGHUP, handing_over(self._sighup))
        signal.signal(signal.SIGUSR1, handing_over(lambda: log.warning("%s", self.summary())))

    def _sighup(self) -> None:
        if self._stopping:  # a held SIGHUP scheduled by start(), after a stop that came first
            return
        log.warning("SIGHUP: reloading the configuration")
        self.notifier.reloading()
        query_log = self.observations.query_log
        if query_log is not None:
            query_log.reopen()
        try:
            if self.on_reload is not None:
                self.on_reload()
        finally:
            self.notifier.ready(self.summary())

    def set_verbose(self, verbose: int) -> None:
        level = log_level(verbose)
        logging.getLogger().setLevel(level)
        if verbose < 3:
            logging.getLogger("quic").setLevel(max(level, logging.INFO))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stopping(self) -> None:
        """Shutting down: say so, and stop reloading. SIGHUP and SIGUSR1 are ignored
        from now on, since their default action (once the loop drops its handlers)
        would end the process mid-shutdown with status 129 or 138."""
        self._stopping = True
        self.notifier.stopping()
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, signal.SIG_IGN)  # one step: never SIG_DFL meanwhile
        early.owned = False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)
        if self.observations.query_log is not None:
            self.observations.query_log.close()
        self.notifier.close()
