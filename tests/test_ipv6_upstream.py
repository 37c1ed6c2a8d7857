"""An IPv6-literal DoQ upstream, end to end, under both event loops: ``serve --listen
[::1]:PORT``, ``forward -u quic://[::1]:PORT`` and ``doqproxy query`` against it."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ManagedProcess, ProxyProcess, doqproxy_command, free_port
from .serve_helpers import SERVER_NAME, ServeCerts, serve_certs, zone_file  # noqa: F401


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this host"),
    pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"]),
]

_LISTENING = re.compile(r"listening on quic://\[::1\]:(\d+)")


class Serve6(ManagedProcess):
    """``doqproxy serve --listen [::1]:0`` answering from the test zone."""

    def __init__(self, certs: ServeCerts, zone: str, log_path: Path) -> None:
        super().__init__(
            doqproxy_command(
                "serve", "-l", "[::1]:0", "-v", "--cert", certs.cert_file,
                "--key", certs.key_file, "--zone", zone,
            ),
            log_path,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not (match := _LISTENING.search(self.stderr())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.05)
        self.port = int(match.group(1))


@pytest.fixture
def serve6(
    event_loop: str,
    monkeypatch: pytest.MonkeyPatch,
    serve_certs: ServeCerts,  # noqa: F811
    zone_file: str,  # noqa: F811
    tmp_path: Path,
) -> Iterator[Serve6]:
    monkeypatch.setenv("DOQPROXY_EVENT_LOOP", event_loop)  # for every process started here
    server = Serve6(serve_certs, zone_file, tmp_path / "serve6.log")
    yield server
    assert server.stop() == 0, server.stderr()
    assert f"event loop: {event_loop}" in server.stderr()


def test_serve_on_ipv6_and_query_it(
    serve6: Serve6,
    serve_certs: ServeCerts,  # noqa: F811
    event_loop: str,
) -> None:
    result = subprocess.run(
        doqproxy_command(
            "query", "www.example.test", "A", "-v", "-u", f"quic://[::1]:{serve6.port}",
            "--tls-ca-file", serve_certs.ca_file, "--tls-server-name", SERVER_NAME,
        ),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "192.0.2.80" in result.stdout
    assert "::1" in result.stdout
    assert f"event loop: {event_loop}" in result.stderr


def test_forward_to_an_ipv6_upstream(
    serve6: Serve6,
    serve_certs: ServeCerts,  # noqa: F811
    event_loop: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    proxy = ProxyProcess(
        [
            "forward", "-v", "-l", f"127.0.0.1:{port}", "-u", f"quic://[::1]:{serve6.port}",
            "--tls-ca-file", serve_certs.ca_file, "--tls-server-name", SERVER_NAME,
        ],
        port,
        tmp_path / "forward.log",
    )  # fmt: skip
    try:
        proxy.wait_ready()
        for name in ("www.example.test", "mail.example.test"):
            dig = subprocess.run(
                ["dig", "+short", "+tries=1", "+time=10", "-p", str(port), "@127.0.0.1", name],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert dig.stdout.split() in (["192.0.2.80"], ["192.0.2.25"]), proxy.stderr()
    finally:
        assert proxy.stop() == 0, proxy.stderr()
    log = proxy.stderr()
    assert f"event loop: {event_loop}" in log
    assert "Traceback" not in log and "Invalid address" not in log, log
