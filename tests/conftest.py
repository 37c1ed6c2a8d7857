"""Shared fixtures: test certificates, free ports, the DoQ test upstream, proxy processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from .doq_fixture import DoqTestUpstream
from .nobody import NobodyPython, find_nobody_python

SERVER_NAME = "doq.test"


@dataclass(frozen=True)
class Certs:
    ca_file: str
    cert_file: str
    key_file: str
    other_ca_file: str
    """A CA that did not sign the server certificate."""


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert(SERVER_NAME, "127.0.0.1", "::1")
    paths = Certs(
        ca_file=str(directory / "ca.pem"),
        cert_file=str(directory / "server.pem"),
        key_file=str(directory / "server.key"),
        other_ca_file=str(directory / "other-ca.pem"),
    )
    ca.cert_pem.write_to_path(paths.ca_file)
    server.private_key_pem.write_to_path(paths.key_file)
    with open(paths.cert_file, "wb") as handle:
        for blob in server.cert_chain_pems:
            handle.write(blob.bytes())
    trustme.CA().cert_pem.write_to_path(paths.other_ca_file)
    return paths


@pytest.fixture(scope="session")
def nobody_python() -> Iterator[NobodyPython]:
    """A Python command that ``nobody`` can run doqproxy with (see tests/nobody.py)."""
    python = find_nobody_python()
    yield python
    if python.copy is not None:
        import shutil

        shutil.rmtree(python.copy, ignore_errors=True)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def tcp_accepting(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP on ``host:port``.

    A connect to a port nobody listens on can pick that same port as its own
    source and connect to itself (TCP simultaneous open, about one in 14,000
    tries for an even port on Linux), which would pass for a listener.
    """
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return bool(sock.getsockname() != sock.getpeername())
    except OSError:
        return False


@pytest.fixture
async def upstream(certs: Certs) -> AsyncIterator[DoqTestUpstream]:
    server = DoqTestUpstream(certs.cert_file, certs.key_file)
    await server.start()
    yield server
    await server.stop()


def doqproxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "doqproxy", *args]


class ManagedProcess:
    """A ``doqproxy`` subprocess logging to a file, stopped by its own handle."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.stderr_path = log_path
        self._stderr = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = env or dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, return the exit status (killing it if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._stderr.closed:
            self._stderr.close()
        return self.proc.returncode


class ProxyProcess(ManagedProcess):
    """``doqproxy ARGS`` listening on ``port`` (TCP accepting means ready)."""

    def __init__(
        self, args: list[str], port: int, stderr_path: Path, python: NobodyPython | None = None
    ) -> None:
        if python is None:
            super().__init__(doqproxy_command(*args), stderr_path)
        else:
            super().__init__(python.command(*args), stderr_path, python.environ())
        self.port = port

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"doqproxy exited early:\n{self.stderr()}")
            if tcp_accepting(self.port):
                return
            time.sleep(0.05)
        raise AssertionError(f"doqproxy did not start listening:\n{self.stderr()}")


async def reloaded(proxy: ManagedProcess, count: int = 1) -> str:
    """Send SIGHUP and wait for the ``count``-th "reload: done"; the log so far."""
    proxy.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        log = proxy.stderr()
        if log.count("reload: done") >= count:
            return log
        await asyncio.sleep(0.05)
    raise AssertionError(f"reload {count} not done:\n{proxy.stderr()}")


@pytest.fixture
def start_proxy(tmp_path: Path, certs: Certs) -> Iterator[object]:
    """Start ``doqproxy forward`` against a DoQ upstream port; returns a ProxyProcess."""
    started: list[ProxyProcess] = []

    def start(
        upstream_port: int,
        *extra: str,
        ca_file: str | None = None,
        cache: bool = False,
        python: NobodyPython | None = None,
    ) -> ProxyProcess:
        """Most tests look at the upstream side, so the cache is off unless asked for."""
        port = free_port()
        args = [
            "forward",
            "-l", f"127.0.0.1:{port}",
            "-u", f"quic://127.0.0.1:{upstream_port}",
            "--tls-ca-file", ca_file or certs.ca_file,
            "--tls-server-name", SERVER_NAME,
            *extra,
        ]  # fmt: skip
        if "--state-dir" not in extra:
            args += ["--state-dir", str(tmp_path / "state")]
        if not cache:
            args.append("--no-cache")
        proxy = ProxyProcess(args, port, tmp_path / f"proxy-{port}.log", python)
        started.append(proxy)
        proxy.wait_ready()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
