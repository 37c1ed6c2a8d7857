"""A user-space UDP relay that adds a fixed delay each way (the kernel here has no netem),
and optionally loses datagrams at random.

``python -m bench.relay --listen 127.0.0.1:P --upstream 127.0.0.1:Q --delay-ms 25 [--loss 5]``
prints ``ready PORT`` once it listens. With ``--loss PCT`` each datagram, either way, is
dropped with that probability (the soak test uses 5%). Each client address gets its own
upstream socket, so a QUIC connection keeps its 4-tuple as the server sees it.

Setting :attr:`Relay.blackhole` (SIGUSR1 for the command; SIGUSR2 clears it)
drops every datagram both ways, like a server that went silent.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from collections.abc import Callable
from typing import cast

Address = tuple[str, int]
EARLY = 0.002  # seconds
SPIN = 0.0005


class Upstream(asyncio.DatagramProtocol):
    """The socket for one client: what comes back goes to that client, delayed."""

    def __init__(self, relay: Relay, client: Address) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if not self.relay.blackhole:
            self.relay.later(self.relay.to_client, data, self.client)


class Relay(asyncio.DatagramProtocol):
    def __init__(
        self, upstream: Address, delay: float, loss: float = 0.0, *, precise: bool = True
    ) -> None:
        self.upstream = upstream
        self.delay = delay
        self.loss = loss
        self.precise = precise
        """Spin for the last ~2 ms of each delay (exact, but it blocks the loop, so it
        only suits a few packets at a time); otherwise trust the timer (up to ~1 ms late)."""
        self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: dict[Address, asyncio.Future[Upstream]] = {}
        self.blackhole = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def later(self, send: Callable[[bytes, Address], None], data: bytes, addr: Address) -> None:
        if self.loss and random.random() < self.loss:
            self.dropped += 1
            return
        if self.delay <= 0:
            send(data, addr)
            return
        if not self.precise:
            asyncio.get_running_loop().call_later(self.delay, send, data, addr)
            return
        # The event loop's timers fire up to a millisecond late (epoll's timeout is in
        # whole ms), which would add ~1 ms per round trip; wake early and sleep the rest.
        due = time.perf_counter() + self.delay
        asyncio.get_running_loop().call_later(
            max(0.0, self.delay - EARLY), self._fire, due, send, data, addr
        )

    @staticmethod
    def _fire(
        due: float, send: Callable[[bytes, Address], None], data: bytes, addr: Address
    ) -> None:
        remaining = due - time.perf_counter()
        if remaining > SPIN:
            time.sleep(remaining - SPIN)  # a sleep can overshoot by a few hundred µs here
        while time.perf_counter() < due:
            pass
        send(data, addr)

    def to_client(self, data: bytes, addr: Address) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.blackhole:
            return
        future = self.clients.get(addr)
        if future is None:
            future = asyncio.ensure_future(self._open(addr))
            self.clients[addr] = future
        self.later(self._to_upstream, data, addr)

    def _to_upstream(self, data: bytes, addr: Address) -> None:
        future = self.clients[addr]
        if future.done():
            transport = future.result().transport
            if transport is not None:
                transport.sendto(data)
        else:
            future.add_done_callback(lambda f: self._to_upstream(data, addr))

    async def _open(self, client: Address) -> Upstream:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: Upstream(self, client), remote_addr=self.upstream
        )
        return protocol


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main_async(
    listen: Address, upstream: Address, delay: float, loss: float = 0.0, precise: bool = True
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    relay = Relay(upstream, delay, loss, precise=precise)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(relay, "blackhole", True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(relay, "blackhole", False))
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=listen)
    print("ready", transport.get_extra_info("sockname")[1], flush=True)
    await stop.wait()
    transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="delay each way")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of datagrams lost")
    parser.add_argument(
        "--coarse", action="store_true", help="no spinning: for hundreds of packets a second"
    )
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    loss = args.loss / 100
    listen, upstream = parse_address(args.listen), parse_address(args.upstream)
    asyncio.run(main_async(listen, upstream, delay, loss, not args.coarse))


if __name__ == "__main__":
    main()
