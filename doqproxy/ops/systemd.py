"""systemd integration: socket activation and the sd_notify protocol, without libsystemd.

Both protocols are a few lines each and stable (see sd_listen_fds(3) and
sd_notify(3)); the Python bindings (``systemd-python``, ``sdnotify``) would add
a C build dependency or an unmaintained package for less code than this
module. Everything here is a no-op when systemd did not set the variables, so
the same binary runs by hand, under systemd, or in a container.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
"""The first file descriptor systemd passes (SD_LISTEN_FDS_START)."""


class ActivationError(Exception):
    """The sockets systemd passed cannot be used; the message says why."""


@dataclass(slots=True, frozen=True)
class Activated:
    """The sockets passed by systemd, split by type."""

    udp: tuple[socket.socket, ...]
    tcp: tuple[socket.socket, ...]
    names: tuple[str, ...]

    def describe(self) -> str:
        parts = []
        for sock in (*self.udp, *self.tcp):
            kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
            host, port = sock.getsockname()[:2]
            parts.append(f"{kind} [{host}]:{port}" if ":" in host else f"{kind} {host}:{port}")
        return ", ".join(parts)


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> Activated | None:
    """Adopt the sockets passed through LISTEN_FDS/LISTEN_PID, or ``None`` if there are none.

    Like ``sd_listen_fds(unset_environment=1)``: the variables are removed so
    that child processes do not think the sockets are theirs.
    """
    env = os.environ if environ is None else environ
    count_text = env.pop("LISTEN_FDS", None)
    pid_text = env.pop("LISTEN_PID", None)
    names_text = env.pop("LISTEN_FDNAMES", "")
    if count_text is None:
        return None
    if pid_text != str(os.getpid()):
        log.debug("LISTEN_FDS is for pid %s, not us; ignoring it", pid_text)
        return None
    try:
        count = int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if count <= 0:
        return None
    names = tuple(names_text.split(":")) if names_text else ()
    udp: list[socket.socket] = []
    tcp: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"passed fd {fd} is not a socket: {exc.strerror}") from None
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ActivationError(f"passed fd {fd} is not an IP socket (family {sock.family!r})")
        if sock.type == socket.SOCK_DGRAM:
            udp.append(sock)
        elif sock.type == socket.SOCK_STREAM:
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ActivationError(
                    f"passed fd {fd} is a TCP socket that is not listening (use ListenStream=, "
                    "and Accept=no)"
                )
            tcp.append(sock)
        else:
            raise ActivationError(f"passed fd {fd} has unsupported socket type {sock.type!r}")
    return Activated(tuple(udp), tuple(tcp), names)


class Notifier:
    """Sends sd_notify(3) messages to $NOTIFY_SOCKET; does nothing when it is unset."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        watchdog_usec = env.pop("WATCHDOG_USEC", "")
        watchdog_pid = env.pop("WATCHDOG_PID", "")
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # Linux abstract namespace
        elif address.startswith("/"):
            self._address = address
        self.watchdog_interval: float | None = None
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or ``None``."""
        for_us = not watchdog_pid or watchdog_pid == str(os.getpid())
        if for_us and watchdog_usec.isdigit() and int(watchdog_usec) > 0:
            self.watchdog_interval = int(watchdog_usec) / 2_000_000

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram. Errors are logged, never raised."""
        if self._address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify %s: %s", fields, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(f"STATUS={status}")
        return self.send(*fields)

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
