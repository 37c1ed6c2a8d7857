"""Creating listening sockets, with errors that tell the user what to do."""

from __future__ import annotations

import errno
import socket

from doqproxy.net.addresses import HostPort

UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bursts of small queries overflow the default ~200 KB buffer (each datagram
costs about 1 KB of accounting), so UDP listeners ask for more."""


_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; typeshed lacks it


class ListenError(OSError):
    """A listening socket could not be created; the message is for the user."""


def bind(address: HostPort, kind: socket.SocketKind, *, reuse_port: bool = False) -> socket.socket:
    """A bound (and for TCP, listening) non-blocking socket on ``address``."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    proto = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_DGRAM:
            grow_receive_buffer(sock)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address.host, address.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(exc.errno, _explain(exc, address, proto)) from None
    return sock


def _explain(exc: OSError, address: HostPort, proto: str) -> str:
    where = f"{proto} {address}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: address already in use (is another DNS server running?)"
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: permission denied. Ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE; use a higher port (e.g. 5353), grant the capability "
            "(setcap cap_net_bind_service=+ep, or AmbientCapabilities= in systemd), or use "
            "systemd socket activation"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no such local address"
    return f"cannot listen on {where}: {exc.strerror}"


def grow_receive_buffer(sock: socket.socket, size: int = UDP_RECEIVE_BUFFER) -> None:
    """Ask for a larger receive buffer; beyond net.core.rmem_max only with CAP_NET_ADMIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
