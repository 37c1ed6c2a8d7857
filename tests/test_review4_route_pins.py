"""Review of the routes' shared bootstrap pins: a stamp's address is pinned for as
long as a route uses that stamp, not for the rest of the process."""

from __future__ import annotations

import pytest

from doqproxy.forwarder import Routes
from doqproxy.net import stamps
from doqproxy.net.addresses import HostPort, parse_upstream
from doqproxy.net.stamps import Stamp, encode_stamp
from doqproxy.resolver import Resolver
from doqproxy.routing.routes import RouteSpec, RoutingSettings
from doqproxy.settings import ForwardSettings
from doqproxy.upstream.plain import PlainUpstream
from doqproxy.upstream.pool import DoqUpstream
from doqproxy.upstream.spec import parse_spec


def settings_with(*routes: RouteSpec) -> ForwardSettings:
    return ForwardSettings(
        listen=(HostPort("127.0.0.1", 53),),
        upstreams=(parse_spec("quic://127.0.0.1:853"),),
        timeout=0.2,
        routing=RoutingSettings(routes=routes),
    )


async def test_a_stamp_route_that_is_gone_unpins_its_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a reload that replaced a stamp by the plain URL of its host left the
    stamp's address pinned in the shared bootstrap: the route went on connecting to
    the old address instead of looking the host up."""
    monkeypatch.setattr(DoqUpstream, "start", lambda self: None)
    default = PlainUpstream(parse_upstream("udp://127.0.0.1:9", ("udp",)))
    routes = Routes(Resolver(default), tickets=None)  # type: ignore[arg-type]
    stamp = encode_stamp(Stamp(stamps.DOQ, 0, "127.0.0.3:853", (), "doq.example:853"))
    pinning = RouteSpec(("corp.test.",), (stamp,))
    plain = RouteSpec(("corp.test.",), ("quic://doq.example:853",))
    try:
        routes.apply(settings_with(pinning), default)
        assert routes.builder is not None
        assert routes.builder.bootstrap.pinned == {"doq.example": ("127.0.0.3",)}
        routes.apply(settings_with(pinning), default)  # unchanged: the stamp's upstream kept
        assert routes.builder.bootstrap.pinned == {"doq.example": ("127.0.0.3",)}
        routes.apply(settings_with(plain), default)
        assert routes.builder.bootstrap.pinned == {}, "the stamp that is gone still pins"
    finally:
        await routes.aclose()
