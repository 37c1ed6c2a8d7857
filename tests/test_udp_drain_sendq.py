"""A reply the kernel will not take yet (EAGAIN) waits for a writable socket instead
of being lost; past the queue's bound the oldest is dropped and counted.

Each case runs in a network namespace of its own (``unshare -n``) whose loopback has
a 1 Mbit/s token-bucket qdisc: replies wait in it, charged to the sending socket,
so a small SO_SNDBUF fills and ``sendto`` really says EAGAIN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc"),
        reason="needs root, unshare and tc",
    ),
]
ROOT = Path(__file__).resolve().parent.parent


def run_in_netns(loop_name: str, max_queued: int, count: int) -> dict[str, int]:
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.udp_drain_netns", loop_name,
         str(max_queued), str(count)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_replies_that_would_block_are_sent_later(loop_name: str) -> None:
    result = run_in_netns(loop_name, 1024, 60)
    assert result["deferred"] > 0, "the qdisc should have made sendto block"
    assert result["answered"] == result["distinct"] == 60
    assert result["dropped"] == 0 and result["queued_left"] == 0


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_full_queue_drops_the_oldest_and_counts_it(loop_name: str) -> None:
    result = run_in_netns(loop_name, 5, 60)
    assert result["dropped"] > 0
    assert result["answered"] == result["distinct"] == 60 - result["dropped"]
