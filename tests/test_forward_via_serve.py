"""The whole product chain: ``doqproxy forward`` → ``doqproxy serve --zone``, both real
processes. The same pool and 0-RTT behaviour is tested against the independent aioquic
fixture in test_pool_e2e.py, so the two sides are not only tested against each other."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from .conftest import ProxyProcess, free_port
from .serve_helpers import SERVER_NAME, ServeCerts, ServeProcess, make_certs, zone_file  # noqa: F401


@pytest.fixture(scope="module")
def certs_for_serve(tmp_path_factory: pytest.TempPathFactory) -> ServeCerts:
    return make_certs(tmp_path_factory.mktemp("chain-certs"))


@pytest.fixture
def chain(
    tmp_path: Path,
    certs_for_serve: ServeCerts,
    zone_file: str,  # noqa: F811
) -> Iterator[Callable[..., tuple[ServeProcess, Callable[..., ProxyProcess]]]]:
    """Start serve on a fixed port (so it can be restarted there) and proxies to it."""
    servers: list[ServeProcess] = []
    proxies: list[ProxyProcess] = []
    port = free_port()

    def start_serve(*extra: str) -> ServeProcess:
        args = ["-l", f"127.0.0.1:{port}", "--zone", zone_file, *extra]
        args += ["--cert", certs_for_serve.cert_file, "--key", certs_for_serve.key_file]
        server = ServeProcess(
            args,
            tmp_path / f"serve-{len(servers)}.log",
        )
        servers.append(server)
        return server

    def start_proxy(*extra: str) -> ProxyProcess:
        listen = free_port()
        args = ["forward", "-l", f"127.0.0.1:{listen}", "-u", f"quic://127.0.0.1:{port}"]
        args += ["--tls-ca-file", certs_for_serve.ca_file, "--tls-server-name", SERVER_NAME]
        args += ["--state-dir", str(tmp_path / "state"), "--no-cache", *extra]
        proxy = ProxyProcess(
            args,
            listen,
            tmp_path / f"proxy-{len(proxies)}.log",
        )
        proxies.append(proxy)
        proxy.wait_ready()
        return proxy

    def start(*serve_extra: str) -> tuple[ServeProcess, Callable[..., ProxyProcess]]:
        return start_serve(*serve_extra), start_proxy

    start.restart_serve = start_serve  # type: ignore[attr-defined]
    yield start
    codes = [(proxy.stop(), proxy) for proxy in proxies]
    for server in servers:  # stopped whatever the proxies did
        server.stop()
    for code, proxy in codes:
        assert code == 0, proxy.stderr()


async def ask(proxy: ProxyProcess, name: str = "www.example.test.") -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)


def stop_and_stats(server: ServeProcess) -> dict[str, str]:
    assert server.stop() == 0, server.log()
    return server.stats()


async def test_queries_share_one_connection(chain) -> None:  # type: ignore[no-untyped-def]
    server, start_proxy = chain()
    proxy = start_proxy()
    for _ in range(10):
        assert (await ask(proxy)).answer[0][0].address == "192.0.2.80"
    assert proxy.stop() == 0
    stats = stop_and_stats(server)
    assert stats["connections"] == "1"
    assert stats["streams"] == "10"


async def test_proxy_restart_first_query_is_early_data(chain) -> None:  # type: ignore[no-untyped-def]
    server, start_proxy = chain()
    proxy = start_proxy()
    assert (await ask(proxy)).answer
    await asyncio.sleep(0.3)  # the session ticket arrives just after the handshake
    assert proxy.stop() == 0
    proxy = start_proxy()
    assert (await ask(proxy, "mail.example.test.")).answer
    assert proxy.stop() == 0
    stats = stop_and_stats(server)
    assert stats["connections"] == "2"
    assert stats["early_queries"] == "1", server.log()


async def test_serve_restart_down_and_back(chain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, start_proxy = chain()
    proxy = start_proxy("--timeout", "3")
    assert (await ask(proxy)).answer
    assert server.stop() == 0
    server = chain.restart_serve()
    assert (await ask(proxy)).rcode() == dns.rcode.NOERROR, proxy.stderr()
    assert server.stop() == 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await ask(proxy)).rcode() == dns.rcode.SERVFAIL
    assert loop.time() - started < 4
    chain.restart_serve()
    deadline = loop.time() + 15
    while (await ask(proxy)).rcode() != dns.rcode.NOERROR:
        assert loop.time() < deadline, proxy.stderr()
        await asyncio.sleep(0.25)


async def test_serve_with_retry_and_early_data(chain) -> None:  # type: ignore[no-untyped-def]
    _, start_proxy = chain("--retry")
    proxy = start_proxy("--timeout", "4")
    assert (await ask(proxy)).answer
    await asyncio.sleep(0.3)
    assert proxy.stop() == 0
    proxy = start_proxy("--timeout", "4")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await ask(proxy, "mail.example.test.")).answer
    assert loop.time() - started < 2, "the early query was lost after Retry"


async def test_serve_stream_limit_200_concurrent(chain) -> None:  # type: ignore[no-untyped-def]
    _, start_proxy = chain("--max-streams", "5")
    proxy = start_proxy("--timeout", "20")
    replies = await asyncio.gather(*(ask(proxy) for _ in range(200)))
    assert all(reply.rcode() == dns.rcode.NOERROR for reply in replies)
