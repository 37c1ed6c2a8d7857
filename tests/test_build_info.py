"""``doqproxy_build_info`` names the QUIC engine and event loop actually in use, so that
``doqproxy top`` shows what runs (``--quic-engine``, ``DOQPROXY_EVENT_LOOP``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from doqproxy.upstream import engine

from .conftest import ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .test_operations import ask, scrape

StartProxy = Callable[..., ProxyProcess]


@pytest.mark.parametrize("name", engine.installed())
async def test_build_info_names_the_engine(
    upstream: DoqTestUpstream, start_proxy: StartProxy, name: str
) -> None:
    port = free_port()
    proxy = start_proxy(
        upstream.port, "--quic-engine", name, "--metrics-listen", f"127.0.0.1:{port}"
    )
    assert await ask(proxy, "a.test.") == "0"
    samples = await scrape(port)
    (labels,) = [dict(k[1]) for k in samples if k[0] == "doqproxy_build_info"]
    assert labels["quic_engine"] == name
    assert labels["event_loop"] in ("uvloop", "asyncio")
