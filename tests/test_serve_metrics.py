"""``doqproxy serve --metrics-listen``: connection closes by DoQ code, sent and received."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Callable

from .conftest import free_port
from .serve_helpers import (  # noqa: F401 - fixtures
    ServeCerts,
    ServeProcess,
    client_configuration,
    open_raw,
    query,
    rdatas,
    serve_certs,
    start_serve,
    zone_file,
)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(doqproxy_serve_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


async def test_serve_metrics_count_closes_by_code(
    start_serve: Callable[..., ServeProcess],  # noqa: F811
    serve_certs: ServeCerts,  # noqa: F811
    zone_file: str,  # noqa: F811
) -> None:
    metrics_port = free_port()
    server = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file,
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
    )  # fmt: skip
    before = scrape(metrics_port)
    assert before["doqproxy_serve_connections_total"] == 0
    # One client breaks the protocol (the server sends 0x2), one closes politely (0x0).
    bad = await open_raw(server.port, client_configuration(serve_certs.ca_file))
    assert rdatas(await bad.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    wire = query("www.example.test").to_wire()
    bad.client.send_raw(len(wire).to_bytes(2, "big") + b"\x12\x34" + wire[2:])  # ID 0x1234
    await asyncio.wait_for(bad.client.terminated, 10)
    bad.close()
    good = await open_raw(server.port, client_configuration(serve_certs.ca_file))
    assert rdatas(await good.client.ask(query("www.example.test"))) == ["192.0.2.80"]
    good.close()
    for _ in range(100):
        after = scrape(metrics_port)
        if after.get('doqproxy_serve_connection_closes_received_total{code="NO_ERROR"}'):
            break
        await asyncio.sleep(0.05)
    assert after['doqproxy_serve_connection_closes_sent_total{code="PROTOCOL_ERROR"}'] == 1
    assert after['doqproxy_serve_connection_closes_received_total{code="NO_ERROR"}'] == 1
    assert after["doqproxy_serve_connections_total"] == 2
    assert after["doqproxy_serve_queries_total"] == 2  # the bad message is not a query
