"""Socket activation and sd_notify without systemd: the test plays systemd's part.

The proxy runs as a real subprocess. A small wrapper moves the sockets the test
bound onto fds 3 and 4 and sets LISTEN_PID to its own pid before exec'ing
``doqproxy forward``, exactly as systemd does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from doqproxy.ops import systemd

from .conftest import SERVER_NAME, Certs, free_port
from .doq_fixture import DoqTestUpstream

ROOT = Path(__file__).resolve().parent.parent

WRAPPER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDNAMES"] = ":".join(["dns"] * len(fds))
os.execv(sys.executable, [sys.executable, "-m", "doqproxy", *sys.argv[2:]])
"""


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def wait_for(self, key: str, within: float = 15.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while True:
                for message in self.messages:
                    if key in message:
                        return message
                data = await loop.sock_recv(self.sock, 4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines())
                self.messages.append(fields)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.sock.close()


def bound_pair(port: int) -> tuple[socket.socket, socket.socket]:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(16)
    return udp, tcp


def plain_proxy(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "doqproxy", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=ROOT,
        )


def activated_proxy(
    sockets: list[socket.socket], args: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    fds = [s.fileno() for s in sockets]
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), *args],
            pass_fds=fds,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=ROOT,
        )


async def ask(port: int, tcp: bool = False, wait: float = 10) -> str:
    query = dns.message.make_query("a.test.", "A")
    if tcp:
        response = await dns.asyncquery.tcp(query, "127.0.0.1", port=port, timeout=wait)
    else:
        response = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=wait)
    return str(response.answer[0][0])


async def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    for _ in range(200):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("proxy did not stop on SIGTERM")


async def test_adopts_passed_sockets_and_notifies(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path, notify_socket: NotifySocket
) -> None:
    port = free_port()
    udp, tcp = bound_pair(port)
    unused = free_port()  # --listen is ignored when sockets are passed
    args = [
        "forward",
        "-l", f"127.0.0.1:{unused}",
        "-u", f"quic://127.0.0.1:{upstream.port}",
        "--tls-ca-file", certs.ca_file,
        "--tls-server-name", SERVER_NAME,
        "-v",
    ]  # fmt: skip
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    log = tmp_path / "proxy.log"
    proc = activated_proxy([udp, tcp], args, env, log)
    udp.close()
    tcp.close()
    try:
        ready = await notify_socket.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(proc.pid)  # the exec'd wrapper keeps its pid
        assert "queries 0" in ready["STATUS"]
        assert await ask(port) == "192.0.2.1"
        assert await ask(port, tcp=True) == "192.0.2.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", unused))  # nothing bound the --listen address
        watchdog = await notify_socket.wait_for("WATCHDOG", within=5)
        assert watchdog["WATCHDOG"] == "1"
        assert "queries 2" in watchdog["STATUS"]
        assert await stop(proc) == 0
        await notify_socket.wait_for("STOPPING", within=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert f"listening on udp 127.0.0.1:{port}, tcp 127.0.0.1:{port}" in text


async def test_sockets_for_another_pid_are_ignored(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path
) -> None:
    """LISTEN_PID not ours (a parent's leftovers): bind --listen as usual."""
    port = free_port()
    args = [
        "forward",
        "-l", f"127.0.0.1:{port}",
        "-u", f"quic://127.0.0.1:{upstream.port}",
        "--tls-ca-file", certs.ca_file,
        "--tls-server-name", SERVER_NAME,
    ]  # fmt: skip
    proc = plain_proxy(args, {"LISTEN_FDS": "2", "LISTEN_PID": "1"}, tmp_path / "proxy.log")
    try:
        for _ in range(300):
            try:
                assert await ask(port, wait=0.5) == "192.0.2.1"
                break
            except (TimeoutError, ConnectionRefusedError, dns.exception.Timeout):
                await asyncio.sleep(0.05)
        else:
            raise AssertionError((tmp_path / "proxy.log").read_text())
        assert await stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_listen_sockets_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: the parser splits by type and clears the variables."""
    env = {"LISTEN_FDS": "0", "LISTEN_PID": str(os.getpid())}
    assert systemd.listen_sockets(env) is None
    assert env == {}
    env = {"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())}
    with pytest.raises(systemd.ActivationError, match="not a number"):
        systemd.listen_sockets(env)
    assert systemd.listen_sockets({}) is None


def test_notifier_watchdog_interval_and_abstract_address() -> None:
    notifier = systemd.Notifier({"NOTIFY_SOCKET": "@doqproxy-test", "WATCHDOG_USEC": "30000000"})
    assert notifier.enabled
    assert notifier.watchdog_interval == 15.0
    other = systemd.Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert not other.enabled
    assert other.watchdog_interval is None
    assert other.ready() is False


def _verify(directory: Path) -> str:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(directory / "doqproxy.socket"),
         str(directory / "doqproxy.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("drop_in", [False, True])
def test_units_verify(tmp_path: Path, drop_in: bool) -> None:
    """`systemd-analyze verify` accepts the shipped units, with and without the drop-in
    for binding without the socket (ExecStart points at a stand-in binary)."""
    units = ROOT / "contrib" / "systemd"
    stand_in = shutil.which("true") or "/bin/true"
    for name in ("doqproxy.socket", "doqproxy.service"):
        text = (units / name).read_text().replace("/usr/bin/doqproxy", stand_in)
        (tmp_path / name).write_text(text)
    if drop_in:
        (tmp_path / "doqproxy.service.d").mkdir()
        shutil.copy(
            units / "doqproxy.service.d" / "bind-without-socket.conf",
            tmp_path / "doqproxy.service.d",
        )
    # Warnings (unknown keys, bad values) name the file; the exit status stays 0.
    output = _verify(tmp_path)
    assert "doqproxy" not in output, output
