"""Run inside a network namespace of its own (``unshare -n``): a slow qdisc on its
loopback holds replies, so the drained reader's ``sendto`` meets EAGAIN for real.

Prints one JSON line: replies the client got, and the front end's counters.
Usage: ``python -m tests.udp_drain_netns LOOP MAX_QUEUED COUNT``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import dns.message

from .test_udp_drain import client, collect, make_front, run


def main() -> None:
    loop_name, max_queued, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # 1 Mbit/s: 125 kB/s, so the 850-octet replies leave far slower than they are made.
    subprocess.run(
        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "1600",
         "limit", "10000000"],
        check=True,
    )  # fmt: skip
    result: dict[str, int] = {}

    async def serve() -> None:
        front, port = make_front(max_queued=max_queued)
        front.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        front.start()
        asker = client()
        try:
            for i in range(count):
                message = dns.message.make_query("big.drain.test.", "TXT", use_edns=0)
                message.id = i
                asker.sendto(message.to_wire(), ("127.0.0.1", port))
            replies: list[bytes] = []
            for _ in range(200):  # up to 20 s
                replies += await collect(asker, count - len(replies), wait=0.1)
                if len(replies) + front.dropped_replies >= count and not front.queued:
                    break
            await asyncio.sleep(0.5)  # anything still on its way
            replies += await collect(asker, count, wait=0.1)
            ids = {dns.message.from_wire(r).id for r in replies}
            result.update(
                answered=len(replies),
                distinct=len(ids),
                deferred=front.deferred,
                dropped=front.dropped_replies,
                queued_left=len(front.queued),
            )
        finally:
            asker.close()
            front.close()

    run(loop_name, serve)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
