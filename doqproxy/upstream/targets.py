"""What an upstream given as a URL or a DNS stamp points at: scheme, name, port, addresses."""

from __future__ import annotations

from dataclasses import dataclass

from doqproxy.net import stamps
from doqproxy.net.addresses import AddressError, UpstreamUrl, is_ip_literal, parse_upstream

_STAMP_SCHEMES = {stamps.PLAIN: "udp", stamps.DOT: "tls", stamps.DOQ: "quic"}


@dataclass(slots=True, frozen=True)
class Target:
    """An upstream to connect to.

    ``url.host`` is the name verified in the certificate (or an IP literal);
    ``addresses`` are IPs to connect to instead of resolving it (from a stamp).
    """

    url: UpstreamUrl
    addresses: tuple[str, ...] = ()
    text: str = ""
    """As the user gave it."""

    @property
    def scheme(self) -> str:
        return self.url.scheme


def parse_target(text: str, schemes: tuple[str, ...]) -> Target:
    """Parse ``SCHEME://HOST[:PORT]`` or ``sdns://...`` (raises :class:`AddressError`
    or :class:`~doqproxy.net.stamps.StampError`, one line each)."""
    if text.startswith("sdns://"):
        return _from_stamp(text, schemes)
    return Target(parse_upstream(text, schemes), text=text)


def _from_stamp(text: str, schemes: tuple[str, ...]) -> Target:
    stamp = stamps.parse_stamp(text)
    scheme = _STAMP_SCHEMES[stamp.protocol]
    if scheme not in schemes:
        raise AddressError(f"upstream {text[:40]}: a {scheme}:// stamp is not accepted here")
    default = 53 if scheme == "udp" else 853
    address, address_port = stamps.split_host_port(stamp.address, default) if stamp.address else (
        "", default)  # fmt: skip
    if address and not is_ip_literal(address):
        raise stamps.StampError(f"stamp {text[:40]}: address {address!r} is not an IP address")
    if scheme == "udp":
        return Target(UpstreamUrl(scheme, address, address_port), text=text)
    host, port = stamps.split_host_port(stamp.hostname, address_port)
    return Target(UpstreamUrl(scheme, host, port), (address,) if address else (), text=text)
