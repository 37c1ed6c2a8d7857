"""Review finding: a SIGHUP whose new routes cannot be built keeps the old configuration
(it raised out of the signal handler, half applied)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path

import dns.asyncquery
import dns.message

from .conftest import SERVER_NAME, Certs, ManagedProcess, ProxyProcess, free_port


async def _wait_for_log(proxy: ManagedProcess, text: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if text in proxy.stderr():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{proxy.stderr()}")


async def _localhost(port: int) -> list[str]:
    query = dns.message.make_query("localhost.", "A")
    reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)
    return [rd.to_text() for rrset in reply.answer for rd in rrset]


async def test_reload_with_routes_that_cannot_be_built_keeps_the_old_config(
    tmp_path: Path, certs: Certs
) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copy(certs.ca_file, ca_file)
    port = free_port()
    config = tmp_path / "doqproxy.toml"
    base = (
        f'listen = ["127.0.0.1:{port}"]\n'
        f'upstream = "quic://127.0.0.1:{free_port()}"\n'
        f'tls-ca-file = "{ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
        f'state-dir = "{tmp_path}/state"\n'
    )
    config.write_text(base)
    proxy = ProxyProcess(["forward", "--config", str(config)], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert await _localhost(port) == ["127.0.0.1"]  # answered: the SIGHUP handler is set
        # The CA file goes bad (a botched update), and a DoT route is added.
        ca_file.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        config.write_text(
            base
            + f'[[route]]\ndomains = ["corp.test"]\nupstreams = ["tls://127.0.0.1:{free_port()}"]\n'
        )
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload failed, keeping the old configuration")
        assert "Traceback" not in proxy.stderr()
        assert await _localhost(port) == ["127.0.0.1"]
        assert proxy.stop() == 0
    finally:
        proxy.stop()


async def test_sighup_with_a_query_log_that_cannot_be_reopened_still_reloads(
    tmp_path: Path,
) -> None:
    """SIGHUP reopens the query log (rotation) before reloading; when the path could
    not be opened (rotated away, and the new path not creatable), the OSError ended the
    handler: a traceback, no reload, and systemd left waiting in RELOADING."""
    port = free_port()
    query_log = tmp_path / "queries.jsonl"
    proxy = ProxyProcess(
        [
            "forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{free_port()}",
            "--query-log", str(query_log), "--state-dir", str(tmp_path / "state"),
        ],
        port,
        tmp_path / "p.log",
    )  # fmt: skip
    try:
        await asyncio.to_thread(proxy.wait_ready)
        assert await _localhost(port) == ["127.0.0.1"]
        query_log.rename(tmp_path / "queries.jsonl.1")
        query_log.mkdir()  # what is there now cannot be opened for writing
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload: done")
        assert "Traceback" not in proxy.stderr()
        assert "cannot reopen the query log" in proxy.stderr()
        assert await _localhost(port) == ["127.0.0.1"]
        assert proxy.stop() == 0
    finally:
        proxy.stop()


def _catches_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


async def test_sighup_during_start_up_is_applied_once_up_not_fatal(tmp_path: Path) -> None:
    """SIGHUP's default action ends a process: one sent after the configuration was
    read but before the reload handler was in place (listening, warm-up) killed the
    forwarder. Now the forward command catches it from its first step and applies it
    as a reload once the forwarder is up."""
    port = free_port()
    proxy = ProxyProcess(
        [
            "forward", "-v", "-l", f"127.0.0.1:{port}",
            "-u", f"quic://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
        ],
        port,
        tmp_path / "p.log",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not _catches_sighup(proxy.proc.pid):  # the earliest moment it is safe to send
            assert proxy.proc.poll() is None, proxy.stderr()
            assert time.monotonic() < deadline, "SIGHUP is never caught"
            await asyncio.sleep(0.001)
        # Caught before the forwarder is up (before, only its reload handler caught it).
        assert "listening on" not in proxy.stderr(), proxy.stderr()
        proxy.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(proxy.wait_ready)
        await _wait_for_log(proxy, "SIGHUP: reloading the configuration")
        log = proxy.stderr()
        assert log.index("listening on") < log.index("SIGHUP: reloading"), log
        assert await _localhost(port) == ["127.0.0.1"]
        assert proxy.proc.poll() is None and "Traceback" not in proxy.stderr()
    finally:
        proxy.stop()


_SIGHUP_DURING_IMPORTS = """
import builtins, os, signal, sys

real_import = builtins.__import__


def hooked(name, *args, **kwargs):
    if name == "doqproxy.cli":  # the command's heavy imports start here
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGHUP)
    return real_import(name, *args, **kwargs)


builtins.__import__ = hooked
sys.argv = ["doqproxy", *sys.argv[1:]]
from doqproxy.__main__ import run

run()
"""


async def test_sighup_during_the_imports_is_kept(tmp_path: Path) -> None:
    """The same while the command is still importing its modules (click, aioquic,
    dnspython: about 0.4 s): the ``doqproxy`` entry point holds SIGHUP before those."""
    port = free_port()
    argv = [
        sys.executable, "-c", _SIGHUP_DURING_IMPORTS,
        "forward", "-v", "-l", f"127.0.0.1:{port}",
        "-u", f"quic://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    proxy = ManagedProcess(argv, tmp_path / "p.log")
    try:
        await _wait_for_log(proxy, "SIGHUP: reloading the configuration")
        log = proxy.stderr()
        assert log.index("listening on") < log.index("SIGHUP: reloading"), log
        assert await _localhost(port) == ["127.0.0.1"]
        assert proxy.proc.poll() is None and "Traceback" not in proxy.stderr()
    finally:
        proxy.stop()


_SIGHUP_JUST_BEFORE_START = """
import os, signal, sys

from doqproxy.ops import control

real_start = control.Operations.start


def start(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)  # the loop runs, its reload handler is not set yet
    real_start(self, *args, **kwargs)


control.Operations.start = start
sys.argv = ["doqproxy", *sys.argv[1:]]
from doqproxy.__main__ import run

run()
"""


async def test_a_sighup_just_before_the_handler_is_set_reloads_once(tmp_path: Path) -> None:
    """Seen in CI: one SIGHUP that came after the listeners but before the reload
    handler reloaded twice (held from start-up, and delivered again by uvloop's wakeup
    fd, which is set from the loop's start)."""
    port = free_port()
    argv = [
        sys.executable, "-c", _SIGHUP_JUST_BEFORE_START,
        "forward", "-v", "-l", f"127.0.0.1:{port}",
        "-u", f"quic://127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    proxy = ManagedProcess(argv, tmp_path / "p.log")
    try:
        await _wait_for_log(proxy, "SIGHUP: reloading the configuration")
        assert await _localhost(port) == ["127.0.0.1"]
        await asyncio.sleep(1.0)  # a second reload would come within milliseconds
        assert proxy.stderr().count("SIGHUP: reloading the configuration") == 1, proxy.stderr()
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()
