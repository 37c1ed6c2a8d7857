"""``make bench`` in its tiny mode (about a second per case), so the harness cannot rot.

Only the structure is checked: every figure present and positive, the report printed,
nothing left behind. There are no performance assertions.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import peers

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as handle:
                args = handle.read().decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args.replace("\0", " "))
    return found


@pytest.mark.timeout(170)
def test_bench_quick_mode(tmp_path: Path) -> None:
    if peers.missing_tools() and not _can_install():
        pytest.skip(f"missing {', '.join(peers.missing_tools())} and cannot apt-get install")
    output = tmp_path / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=160,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"benchmark tools unavailable: {done.stderr.strip()[-500:]}")
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(output.read_text())

    assert results["mode"] == "quick"
    for key in ("python", "aioquic", "unbound", "dnsmasq", "dnsperf"):
        assert results["versions"][key] not in ("", "?"), key
    assert results["machine"]["nproc"] >= 1

    hit = results["cache_hit"]
    for peer in ("doqproxy", "unbound", "dnsmasq"):
        entry = hit[peer]
        assert entry["valid"], (peer, entry["rcodes"], entry["lost"])
        assert entry["paced"]["valid"], (peer, entry["paced"]["rcodes"])
        for figure in (entry["qps"], entry["avg_ms"], entry["paced"]["p99_ms"]):
            assert _positive(figure), (peer, entry)
        assert entry["rounds_qps"] and all(_positive(q) for q in entry["rounds_qps"])
    assert _positive(hit["ratio_unbound"]) and _positive(hit["ratio_dnsmasq"])

    miss = results["miss_path"]
    assert miss["forward"]["valid"]
    assert _positive(miss["forward"]["qps"])
    for bare in (miss["bare_client"], miss["bare_client_4"]):
        assert bare["valid"] and _positive(bare["qps"]), bare
    assert _positive(miss["ratio"]) and _positive(miss["ratio_4"])
    if miss["profile"] is not None:
        assert miss["profile"]["samples"] > 0

    link = results["link"]
    assert link["runs"] == 2
    for case in ("full_handshake_ms", "restart_0rtt_ms", "warm_miss_ms"):
        assert _positive(link[case]["median"]), case
        assert link[case]["median"] >= link["rtt_ms"], case  # a round trip is the floor
    assert _positive(link["floor_bare_client_median_ms"])

    failover = results["failover"]
    for phase in ("before", "during", "after"):
        assert failover[phase]["queries"] > 0 and _positive(failover[phase]["p99_ms"]), phase
    assert failover["servfail_total"] >= 0 and "Several upstreams" in done.stdout

    engines = results["engines"]
    for case in ("pipeline", "pipeline_cache"):
        assert _positive(engines[case]["cpu_us_per_query"]), case
    assert engines["pipeline_cache"]["cache"] is True

    memory = results["memory"]
    assert memory["answers"]["valid"]
    assert _positive(memory["rss_mb"])

    assert len(results["goals"]) >= 6
    for goal in results["goals"]:
        if "above the" in goal["name"]:  # a difference: zero or below is a fine result
            value = goal["value"]
            assert isinstance(value, int | float) and not isinstance(value, bool), goal
        else:
            assert _positive(goal["value"]), goal
        assert goal["name"] in done.stdout
    assert "| goal | measured | target | met |" in done.stdout
    workdir = results["workdir"]
    assert not os.path.exists(workdir), "temp dir left behind"
    assert not _processes_mentioning(workdir), "processes left behind"
