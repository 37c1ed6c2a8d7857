"""SIGHUP: re-read the configuration and apply what can change without a restart.

The listeners, the cache, the state directory, the TCP limits, the metrics
endpoint, the query log and the user stay as they are (a reload that changes
them says so, and the next reload compares with what runs). The upstream group is rebuilt:
an upstream whose URL and TLS, pool and padding settings did not change keeps
its connection pool (the same object, with its health and counters); a new or
changed one gets a new pool; one that is gone is closed once the queries on it
had time to finish. The strategy and hedging apply to the next query; the
query timeout and the log level apply at once. Anything invalid in the new
configuration is logged and the old configuration stays in force.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from doqproxy.ops.control import Operations
from doqproxy.resolver import Resolver
from doqproxy.settings import ForwardSettings
from doqproxy.upstream import engine
from doqproxy.upstream.base import Upstream
from doqproxy.upstream.group import UpstreamGroup, close_later

log = logging.getLogger(__name__)

_UPSTREAM_FIELDS = (
    "upstreams",
    "tls_ca_file",
    "tls_server_name",
    "padding",
    "pool",
    "selection",
    "timeout",
)


_START_ONLY = {
    "listen": "listen addresses",
    "udp_reader": "--udp-reader",
    "tcp": "the --tcp-* limits",
    "state_dir": "--state-dir",
}
_START_ONLY_OPS = {
    "metrics_listen": "--metrics-listen",
    "query_log": "--query-log",
    "user": "--user",
}
"""Settings read only at start-up (field: how the warning names it)."""


def _in_force(new: ForwardSettings, old: ForwardSettings) -> ForwardSettings:
    """``new`` with the settings read only at start-up put back to ``old``'s, saying
    which ones a reload tried to change (so a later reload compares with what runs)."""
    for source, running, fields in (
        (new, old, _START_ONLY),
        (new.ops, old.ops, _START_ONLY_OPS),
    ):
        for name, what in fields.items():
            if getattr(source, name) != getattr(running, name):
                log.warning("reload: %s cannot change without a restart; keeping the old", what)
    ops = dataclasses.replace(new.ops, **{name: getattr(old.ops, name) for name in _START_ONLY_OPS})
    return dataclasses.replace(new, ops=ops, **{name: getattr(old, name) for name in _START_ONLY})


def _lookup_inputs(settings: ForwardSettings) -> tuple[object, ...]:
    """What the default upstream's address lookup and pinning depend on."""
    routing = settings.routing
    return routing.bootstrap, routing.addresses, routing.pins


class Reloader:
    """The SIGHUP handler's body: ``load()`` gives the new settings or raises with a
    message fit for the log."""

    def __init__(
        self,
        settings: ForwardSettings,
        load: Callable[[], ForwardSettings],
        make_upstream: Callable[[ForwardSettings, UpstreamGroup | None], UpstreamGroup],
        ops: Operations,
        resolver: Resolver,
        *,
        route: Callable[[ForwardSettings, Upstream], Upstream] | None = None,
    ) -> None:
        self.route = route
        """Wraps the default upstream in the routes (forwarder.Routes.apply)."""
        self.settings = settings
        self.load = load
        self.make_upstream = make_upstream
        self.ops = ops
        self.resolver = resolver
        self.generation = 0
        self._retired: set[asyncio.Task[None]] = set()

    def __call__(self) -> bool:
        """Apply the configuration as it is now; ``False`` if the old one was kept."""
        old = self.settings
        running_engine = engine.NAME  # reading the options selects the file's engine
        try:
            new = self.load()
            upstream = None
            if any(getattr(new, name) != getattr(old, name) for name in _UPSTREAM_FIELDS) or (
                _lookup_inputs(new) != _lookup_inputs(old)
            ):
                upstream = self.make_upstream(new, self.ops.upstream)
            routed = None
            default = upstream if upstream is not None else self.ops.upstream
            # Built inside the try: a route that cannot be built (a bad CA file for a
            # new tls:// route) must leave the old configuration in force.
            if (
                self.route is not None
                and default is not None
                and (upstream is not None or new.routing != old.routing)
            ):
                routed = self.route(new, default)
        except Exception as exc:  # whatever the loader raises, the old config stays
            log.error("reload failed, keeping the old configuration: %s", exc)
            engine.NAME = running_engine
            return False
        new = _in_force(new, old)
        cache = self.resolver.cache
        if new.cache != old.cache:
            if new.cache.enabled != old.cache.enabled:
                log.warning("reload: turning the cache on or off needs a restart")
                new = dataclasses.replace(new, cache=old.cache)  # what runs
            elif cache is not None:
                cache.reconfigure(new.cache)
                log.warning("reload: cache limits changed (%d entries kept)", len(cache))
        if upstream is not None:
            previous = self.ops.upstream
            self.ops.upstream = upstream
            self.resolver.upstream = routed if routed is not None else upstream
            if previous is not None:
                previous.detach()
                gone = [m for m in previous.members if m not in upstream.members]
                if gone:
                    self._retire(close_later([m.upstream for m in gone], grace=old.timeout))
            upstream.start()
            log.warning(
                "reload: now forwarding to %s (%s)",
                ", ".join(m.name for m in upstream.members),
                new.selection.strategy,
            )
        elif routed is not None:
            self.resolver.upstream = routed
        self.resolver.timeout = new.timeout
        self.resolver.max_udp = new.max_udp_size
        if cache is not None:
            cache.max_udp = new.max_udp_size
        self.ops.set_verbose(new.ops.verbose)
        self.settings = new
        self.generation += 1
        log.warning("reload: done")
        return True

    def _retire(self, task: asyncio.Task[None]) -> None:
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def aclose(self) -> None:
        for task in list(self._retired):
            task.cancel()
        if self._retired:
            await asyncio.wait(list(self._retired))
