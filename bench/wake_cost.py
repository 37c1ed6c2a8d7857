"""What one event-loop wake-up costs on this machine: the process's CPU per timer that
finds the loop asleep, with nothing else to do.

A forwarder that is not saturated sleeps between datagrams, and each sleep ends in a
wake-up whose cost (the context switch, and on a VM the exit to the hypervisor and
back, and caches the other processes have cooled) lands on the process's CPU time.
On the shared 2-core test VM an empty wake-up costs 30-45 µs, as much as a third
of a whole miss, so the miss path's CPU per query depends on how many wake-ups it
takes (see BENCHMARKS.md, "qh3 integration"). The same loop turned without sleeping
(a zero delay) shows the loop's own cost per turn for comparison.

``python -m bench.wake_cost [--wakes N]`` prints one JSON line per delay.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from typing import Any

from doqproxy.ops import process

DELAYS = (0.0, 0.002, 0.003)
"""Seconds between wake-ups; 0 turns the loop without ever sleeping."""


async def measure(wakes: int, delay: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if count >= wakes:
            done.set_result(None)
        elif delay:
            loop.call_later(delay, tick)
        else:
            loop.call_soon(tick)

    cpu, wall = time.process_time(), time.monotonic()
    loop.call_soon(tick)
    await done
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return {
        "delay_ms": delay * 1000,
        "wakes": wakes,
        "cpu_us_per_wake": round(cpu / wakes * 1e6, 1),
        "wall_us_per_wake": round(wall / wakes * 1e6, 1),
        "event_loop": process.event_loop_name(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wakes", type=int, default=2000, help="wake-ups per delay")
    args = parser.parse_args(argv)
    for delay in DELAYS:
        result = process.run(functools.partial(measure, args.wakes, delay))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
