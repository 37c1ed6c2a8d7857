"""A route build that fails half way (a reload whose second route cannot be built)
closes the upstreams it had already made and started; the old ones stay in use."""

from __future__ import annotations

import asyncio

import pytest

from doqproxy.forwarder import Routes
from doqproxy.net import stamps
from doqproxy.net.addresses import HostPort, parse_upstream
from doqproxy.net.stamps import Stamp, encode_stamp
from doqproxy.resolver import Resolver
from doqproxy.routing import build
from doqproxy.routing.routes import RouteSpec, RoutingSettings
from doqproxy.settings import ForwardSettings
from doqproxy.upstream.plain import PlainUpstream
from doqproxy.upstream.pool import DoqUpstream
from doqproxy.upstream.spec import parse_spec
from doqproxy.upstream.targets import Target


def settings_with(*routes: RouteSpec) -> ForwardSettings:
    return ForwardSettings(
        listen=(HostPort("127.0.0.1", 53),),
        upstreams=(parse_spec("quic://127.0.0.1:853"),),
        timeout=0.2,
        routing=RoutingSettings(routes=routes),
    )


async def test_a_failed_route_build_closes_what_it_had_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make = build.RouteBuilder._make

    def failing(self: build.RouteBuilder, target: Target) -> object:
        if target.url.scheme == "tls":
            raise OSError("cannot read the CA file")
        return make(self, target)

    monkeypatch.setattr(build.RouteBuilder, "_make", failing)
    default = PlainUpstream(parse_upstream("udp://127.0.0.1:9", ("udp",)))
    routes = Routes(Resolver(default), tickets=None)  # type: ignore[arg-type]
    kept = RouteSpec(("old.test.",), ("quic://127.0.0.1:9",))
    try:
        routes.apply(settings_with(kept), default)
        assert routes.builder is not None
        (old,) = routes.builder.made.values()
        new = RouteSpec(("new.test.",), ("quic://127.0.0.2:9",))
        bad = RouteSpec(("bad.test.",), ("tls://127.0.0.1:9",))
        made: list[DoqUpstream] = []
        monkeypatch.setattr(DoqUpstream, "start", lambda self: made.append(self))
        with pytest.raises(OSError, match="CA file"):
            routes.apply(settings_with(kept, new, bad), default)
        (started,) = made  # quic://127.0.0.2 was made and started before tls:// failed
        await asyncio.sleep(0.2)
        assert started._closed, "the upstream of the failed build still runs"
        assert isinstance(old, DoqUpstream) and not old._closed  # still serves old.test
        assert routes.builder is not None and old in routes.builder.made.values()
    finally:
        await routes.aclose()


async def test_a_failed_route_build_leaves_the_bootstrap_pins_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new stamp pins its host's address in the bootstrap the old routes share: when
    a later route fails, the old routes must not go on looking that host up there."""
    make = build.RouteBuilder._make

    def failing(self: build.RouteBuilder, target: Target) -> object:
        if target.url.scheme == "tls":
            raise OSError("cannot read the CA file")
        return make(self, target)

    monkeypatch.setattr(build.RouteBuilder, "_make", failing)
    monkeypatch.setattr(DoqUpstream, "start", lambda self: None)
    default = PlainUpstream(parse_upstream("udp://127.0.0.1:9", ("udp",)))
    routes = Routes(Resolver(default), tickets=None)  # type: ignore[arg-type]
    kept = RouteSpec(("old.test.",), ("quic://doq.example:853",))
    try:
        routes.apply(settings_with(kept), default)
        assert routes.builder is not None
        bootstrap = routes.builder.bootstrap
        assert bootstrap.pinned == {}
        stamp = encode_stamp(Stamp(stamps.DOQ, 0, "127.0.0.3:853", (), "doq.example:853"))
        pinning = RouteSpec(("new.test.",), (stamp,))
        bad = RouteSpec(("bad.test.",), ("tls://127.0.0.1:9",))
        with pytest.raises(OSError, match="CA file"):
            routes.apply(settings_with(kept, pinning, bad), default)
        assert routes.builder.bootstrap is bootstrap  # the old routes' own
        assert bootstrap.pinned == {}, "the failed build's stamp still pins doq.example"
        # A build that succeeds keeps the stamp's address, as before.
        routes.apply(settings_with(kept, pinning), default)
        assert routes.builder.bootstrap.pinned == {"doq.example": ("127.0.0.3",)}
    finally:
        await routes.aclose()
