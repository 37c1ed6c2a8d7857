"""Who may use the forwarder: the access list, its LAN default, and the reflection guard.

Pure logic: the interface addresses come in as values (read by
:mod:`doqproxy.net.interfaces`), so every rule here is tested without sockets.

With no ``--allow``, clients are limited to loopback plus the subnets attached
to the interfaces of the listen addresses, like dnsmasq's ``--local-service``;
a wildcard listen address means every subnet attached to the host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from doqproxy.net.interfaces import InterfaceAddress

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK_NETWORKS: tuple[IpNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

# UDP source ports we never answer. A query "from" one of these is almost always
# spoofed, and our reply would land on a service that answers any datagram (a
# loop: the two services bounce packets at each other for ever) or that
# amplifies what it receives (a reflection attack on a third party).
REFLECTION_PORTS: frozenset[int] = frozenset(
    {
        0,  # not a valid source port at all; only forged packets carry it
        7,  # echo: echoes our reply back, which we would answer again (a loop)
        13,  # daytime: answers any datagram with the time (a loop)
        17,  # qotd: answers any datagram with a quote (a loop)
        19,  # chargen: answers any datagram with up to 512 octets (the classic loop)
        37,  # time: answers any datagram with 4 octets (a loop)
        111,  # portmapper/rpcbind: amplifier, reflection target
        123,  # NTP: monlist/readvar amplification; NTP servers never query DNS from 123
        137,  # NetBIOS name service: answers stray datagrams
        138,  # NetBIOS datagram service
        161,  # SNMP agents: reflection/amplification target
        162,  # SNMP traps
        389,  # CLDAP: a large amplifier
        520,  # RIP: routers would parse our reply as routing data
        1434,  # MS-SQL browser: amplifier
        1900,  # SSDP/UPnP: amplifier found in every home router
        3283,  # Apple Remote Desktop: amplifier
        3702,  # WS-Discovery: amplifier
        5353,  # mDNS: a unicast reply to 5353 would be injected into mDNS caches
        5683,  # CoAP: amplifier
        10001,  # Ubiquiti discovery: amplifier
        11211,  # memcached: the biggest known amplifier
    }
)
# Port 53 is deliberately absent: resolvers and forwarders may send queries from
# port 53 (old BIND "query-source port 53", some CPE forwarders), and a DNS server
# that receives our reply treats it as a response (QR=1) and never answers it, so
# there is no loop to break. 853/443 are TCP/QUIC services and do not answer UDP DNS.


class AccessError(ValueError):
    """An ``--allow`` value that is not a network."""


@dataclass(slots=True, frozen=True)
class AccessList:
    """The networks whose clients get answers; ``open`` answers everyone."""

    networks: tuple[IpNetwork, ...]
    open: bool = False

    def allows(self, address: IpAddress) -> bool:
        return self.open or any(address in network for network in self.networks)

    def describe(self) -> str:
        if self.open:
            return "any address (open resolver)"
        return ", ".join(str(network) for network in self.networks)


def parse_allow(values: Iterable[str]) -> tuple[tuple[IpNetwork, ...], bool]:
    """``--allow`` values as networks, and whether ``any`` was among them.

    A host address is taken as a /32 or /128; host bits set in a prefix are
    ignored (``192.168.1.7/24`` means ``192.168.1.0/24``).
    """
    networks: list[IpNetwork] = []
    any_seen = False
    for value in values:
        text = value.strip()
        if text.lower() == "any":
            any_seen = True
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise AccessError(
                f"--allow {value!r}: not a network (use CIDR like 192.168.1.0/24, "
                "an address, or 'any')"
            ) from None
    return tuple(networks), any_seen


def client_address(host: str) -> IpAddress:
    """The client's address, with an IPv4-mapped IPv6 address as plain IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def listener_reaches_lan(listen_hosts: Sequence[str]) -> bool:
    """Whether a listener on any of these addresses can be reached from other hosts."""
    for host in listen_hosts:
        if is_wildcard(host):
            return True
        try:
            if not client_address(host).is_loopback:
                return True
        except ValueError:
            return True  # a name: assume the worst
    return False


def local_networks(
    listen_hosts: Sequence[str], addresses: Sequence[InterfaceAddress]
) -> tuple[IpNetwork, ...]:
    """Loopback plus the subnets attached to the interfaces of ``listen_hosts``.

    A wildcard host stands for every interface. An address that is on no
    interface (a non-local bind) adds nothing but loopback.
    """
    indexes: set[int] = set()
    for host in listen_hosts:
        if is_wildcard(host):
            indexes.update(item.index for item in addresses)
            continue
        try:
            wanted = client_address(host)
        except ValueError:
            continue
        indexes.update(item.index for item in addresses if item.interface.ip == wanted)
    networks: list[IpNetwork] = list(LOOPBACK_NETWORKS)
    for item in addresses:
        network = item.interface.network
        if item.index in indexes and network not in networks:
            networks.append(network)
    return tuple(networks)


def default_access(
    allow: Sequence[str], listen_hosts: Sequence[str], addresses: Sequence[InterfaceAddress]
) -> AccessList:
    """The access list for ``--allow`` values, or the LAN default when there are none."""
    networks, any_seen = parse_allow(allow)
    if any_seen:
        return AccessList(networks, open=True)
    if networks:
        merged = list(LOOPBACK_NETWORKS)
        merged += [network for network in networks if network not in merged]
        return AccessList(tuple(merged))
    return AccessList(local_networks(listen_hosts, addresses))
