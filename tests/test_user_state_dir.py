"""``forward --user``: the state dir is made usable by the target user before root is
given up (tickets then persist); a directory the admin chose and the user does not own
is refused with one line instead of silently losing the tickets."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream
from .nobody import NobodyPython

StartProxy = Callable[..., ProxyProcess]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


@pytest.fixture
def shared(certs: Certs) -> Iterator[Path]:
    """A directory nobody can traverse, holding a readable copy of the CA."""
    root = Path(tempfile.mkdtemp(prefix="doqproxy-state-"))
    root.chmod(0o755)
    shutil.copy(certs.ca_file, root / "ca.pem")
    (root / "ca.pem").chmod(0o644)
    yield root
    shutil.rmtree(root)


async def _ask(proxy: ProxyProcess) -> None:
    query = dns.message.make_query("a.test.", "A")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=10)
    assert response.answer


async def test_missing_state_dir_is_created_for_the_user(
    upstream: DoqTestUpstream, start_proxy: StartProxy, shared: Path, nobody_python: NobodyPython
) -> None:
    nobody = pwd.getpwnam("nobody")
    state = shared / "var" / "doqproxy"
    proxy = start_proxy(
        upstream.port, "--user", "nobody", "--state-dir", str(state),
        ca_file=str(shared / "ca.pem"), python=nobody_python,
    )  # fmt: skip
    await _ask(proxy)
    assert proxy.stop() == 0
    info = state.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, 0o700)
    tickets = state / "tickets.json"
    assert tickets.exists(), proxy.stderr()
    assert tickets.stat().st_uid == nobody.pw_uid
    assert "WARNING" not in proxy.stderr()


async def test_foreign_state_dir_is_refused_in_one_line(
    upstream: DoqTestUpstream, shared: Path, nobody_python: NobodyPython, tmp_path: Path
) -> None:
    state = shared / "roots"
    state.mkdir(mode=0o700)
    port = free_port()
    args = [
        "forward", "-l", f"127.0.0.1:{port}", "-u", f"quic://127.0.0.1:{upstream.port}",
        "--tls-ca-file", str(shared / "ca.pem"), "--tls-server-name", SERVER_NAME,
        "--user", "nobody", "--state-dir", str(state),
    ]  # fmt: skip
    proxy = ProxyProcess(args, port, tmp_path / "proxy.log", nobody_python)
    for _ in range(300):
        if proxy.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert proxy.stop() == 1
    lines = proxy.stderr().strip().splitlines()
    assert "owned by uid 0" in lines[-1] and str(state) in lines[-1], lines
    assert state.stat().st_uid == 0, "an admin's directory is never handed over"
