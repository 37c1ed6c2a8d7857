"""``doqproxy forward`` with each ``--udp-reader`` (``auto``, the default, ``drain``
or ``protocol``) on either event loop: dnsperf's burst of cache hits is answered
in full, and SIGTERM still shuts down cleanly."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from doqproxy.frontend.udp_drain import choose_reader

from .conftest import ProxyProcess
from .doq_fixture import DoqTestUpstream

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("dnsperf"), reason="needs dnsperf"),
]
StartProxy = Callable[..., ProxyProcess]
NAMES = 64


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("reader", ["auto", "drain", "protocol"])
async def test_dnsperf_burst_is_answered(
    upstream: DoqTestUpstream,
    start_proxy: StartProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reader: str,
    loop_name: str,
) -> None:
    pytest.importorskip(loop_name)
    monkeypatch.setenv("DOQPROXY_EVENT_LOOP", loop_name)
    proxy = start_proxy(upstream.port, "--udp-reader", reader, "-v", cache=True)
    names = tmp_path / "names"
    names.write_text("".join(f"n{i}.test. A\n" for i in range(NAMES)))
    perf = ["dnsperf", "-s", "127.0.0.1", "-p", str(proxy.port), "-d", str(names), "-c", "4",
            "-T", "1", "-q", "100", "-t", "10"]  # fmt: skip
    # The first pass fills the cache through the upstream; the next ones are hits.
    for passes in (1, 20):
        # Not subprocess.run: the upstream runs on this test's event loop.
        child = await asyncio.create_subprocess_exec(
            *perf, "-n", str(passes), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        stdout, stderr = await asyncio.wait_for(child.communicate(), 120)
        assert child.returncode == 0, stderr.decode()
        out = stdout.decode()
        sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        assert sent == NAMES * passes
        assert re.search(rf"Queries completed:\s+{sent} ", out), out
        assert re.search(rf"NOERROR {sent} \(100\.00%\)", out), out
    assert f"event loop: {loop_name}" in proxy.stderr()
    used = choose_reader(reader, loop_name)
    assert f"UDP reader: {used} (--udp-reader {reader})" in proxy.stderr()
    assert proxy.stop() == 0
    assert "Traceback" not in proxy.stderr()
