"""Parsing of listen addresses and upstream URLs given on the command line."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEME_PORTS = {"quic": 853, "udp": 53, "tcp": 53, "tls": 853}


class AddressError(ValueError):
    """A listen address or URL that cannot be used; the message says how to fix it."""


@dataclass(slots=True, frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        return is_ip_literal(self.host)


@dataclass(slots=True, frozen=True)
class UpstreamUrl:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        return is_ip_literal(self.host)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise AddressError(f"{what}: port {text!r} is not a number from 0 to 65535")
    return int(text)


def parse_listen(text: str, default_port: int = 53) -> HostPort:
    """Parse ``ADDR[:PORT]``, with IPv6 as ``[::1]:5353``. ADDR must be an IP literal."""
    host, port = text, str(default_port)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"listen address {text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise AddressError(f"listen address {text!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not is_ip_literal(host):
        raise AddressError(
            f"listen address {text!r}: {host!r} is not an IP address (use e.g. 127.0.0.1:5353 "
            "or [::1]:5353)"
        )
    return HostPort(host, _port(port, f"listen address {text!r}"))


def parse_upstream(text: str, schemes: tuple[str, ...] = ("quic",)) -> UpstreamUrl:
    """Parse ``SCHEME://HOST[:PORT]`` for one of ``schemes``."""
    if "://" not in text:
        raise AddressError(
            f"upstream {text!r}: expected a URL like {schemes[0]}://dns.example"
            f"[:{SCHEME_PORTS[schemes[0]]}]"
        )
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # "Invalid IPv6 URL" for stray brackets (found by fuzzing)
        raise AddressError(f"upstream {text!r}: {exc}") from None
    if parts.scheme not in schemes:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise AddressError(f"upstream {text!r}: unknown scheme {parts.scheme!r}, use {wanted}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise AddressError(f"upstream {text!r}: only {parts.scheme}://HOST[:PORT] is accepted")
    try:
        port = parts.port
    except ValueError:
        raise AddressError(f"upstream {text!r}: the port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise AddressError(f"upstream {text!r}: no host")
    if not host.isascii():
        # An internationalised name: TLS (SNI, the certificate) and DNS use its A-label.
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError(f"upstream {text!r}: {host!r} is not a valid host name") from None
    return UpstreamUrl(parts.scheme, host, port or SCHEME_PORTS[parts.scheme])
