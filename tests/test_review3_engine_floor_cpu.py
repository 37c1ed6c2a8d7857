"""Review finding: ``bench.engine_floor`` reports "CPU µs per query" but timed the
client's calls with ``time.perf_counter``, a wall clock: on the shared, loaded machine
the benchmarks run on, time the process spent preempted was counted as the engine's
CPU (qh3's floor read 29 µs with three busy loops running, 13 µs of CPU). Here the
client's packet building also waits 20 ms per turn without using the CPU, as a
preempted process would; none of that may show up as CPU. No speed is asserted."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench import engine_floor
from doqproxy import devcerts

PAUSE = 0.02
BATCH = 4


class Preempted:
    """A client connection whose packet building waits ``PAUSE`` seconds off the CPU."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def datagrams_to_send(self, now: float) -> Any:
        time.sleep(PAUSE)
        return self._connection.datagrams_to_send(now=now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def test_the_engine_floor_counts_cpu_not_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = devcerts.make_certificates(tmp_path, engine_floor.SERVER_NAME, label="floor")
    connections = engine_floor._connections

    def preempted(engine: str, certs: tuple[Path, Path, Path]) -> tuple[Any, Any, Any]:
        client, server, events = connections(engine, certs)
        return Preempted(client), server, events

    monkeypatch.setattr(engine_floor, "_connections", preempted)
    result = engine_floor.measure("aioquic", BATCH, 200, certs)
    waited_per_query = 1e6 * PAUSE / BATCH  # 5,000 µs
    assert result["cpu_us_per_query"] < waited_per_query / 2, result
