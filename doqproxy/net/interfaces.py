"""The host's interface addresses and their subnets, read from the kernel over rtnetlink.

Used to work out which clients are "on the LAN" (like dnsmasq's ``--local-service``).
One RTM_GETADDR dump gives every address of every interface, both families,
secondary IPv4 addresses included, with no external tool and no new dependency.
:func:`parse_addr_dump` is the pure part: it reads the kernel's reply bytes.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

_NLMSG_HDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # length, type
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_NETLINK_ROUTE = 0


@dataclass(slots=True, frozen=True)
class InterfaceAddress:
    """One address configured on one interface."""

    index: int
    """The interface index (``socket.if_nameindex``)."""
    interface: IpInterface
    """The address with its prefix length: ``.network`` is the attached subnet."""


class InterfaceError(OSError):
    """The kernel's address list could not be read."""


def _align(length: int) -> int:
    return (length + 3) & ~3


def parse_addr_dump(data: bytes) -> tuple[list[InterfaceAddress], bool]:
    """The addresses in a chunk of RTM_GETADDR dump replies, and whether the dump ended.

    Raises :class:`InterfaceError` for a netlink error message or a malformed chunk.
    """
    found: list[InterfaceAddress] = []
    pos = 0
    while pos + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, pos)
        if length < _NLMSG_HDR.size or pos + length > len(data):
            raise InterfaceError("malformed netlink message")
        body = data[pos + _NLMSG_HDR.size : pos + length]
        pos += _align(length)
        if kind == _NLMSG_DONE:
            return found, True
        if kind == _NLMSG_ERROR:
            (errno,) = struct.unpack_from("=i", body) if len(body) >= 4 else (-1,)
            if errno == 0:
                continue
            raise InterfaceError(-errno, os.strerror(-errno) if errno < 0 else "netlink error")
        if kind != _RTM_NEWADDR or len(body) < _IFADDRMSG.size:
            continue
        family, prefixlen, _iflags, _scope, index = _IFADDRMSG.unpack_from(body)
        attrs: dict[int, bytes] = {}
        apos = _IFADDRMSG.size
        while apos + _RTATTR.size <= len(body):
            alen, atype = _RTATTR.unpack_from(body, apos)
            if alen < _RTATTR.size or apos + alen > len(body):
                break
            attrs[atype] = body[apos + _RTATTR.size : apos + alen]
            apos += _align(alen)
        # On a point-to-point link IFA_ADDRESS is the peer; IFA_LOCAL is ours.
        raw = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
        if family == socket.AF_INET and raw is not None and len(raw) == 4:
            found.append(InterfaceAddress(index, ipaddress.IPv4Interface((raw, prefixlen))))
        elif family == socket.AF_INET6 and raw is not None and len(raw) == 16:
            found.append(InterfaceAddress(index, ipaddress.IPv6Interface((raw, prefixlen))))
    return found, False


def interface_addresses() -> list[InterfaceAddress]:
    """Every address on every interface of this host (network namespace).

    Raises :class:`InterfaceError` when netlink is not available (not Linux) or fails.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
    except (OSError, AttributeError) as exc:
        raise InterfaceError(f"cannot open a netlink socket: {exc}") from None
    with sock:
        sock.settimeout(2.0)
        request = _NLMSG_HDR.pack(
            _NLMSG_HDR.size + _IFADDRMSG.size,
            _RTM_GETADDR,
            _NLM_F_REQUEST | _NLM_F_DUMP,
            1,
            0,
        ) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        try:
            sock.sendto(request, (0, 0))
            found: list[InterfaceAddress] = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise InterfaceError("netlink: the dump ended early")
                addresses, done = parse_addr_dump(chunk)
                found.extend(addresses)
                if done:
                    return found
        except InterfaceError:
            raise
        except OSError as exc:
            raise InterfaceError(f"netlink: {exc}") from None
