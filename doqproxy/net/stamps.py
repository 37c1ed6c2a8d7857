"""DNS stamps (``sdns://``), the format of public resolver lists (DNSCrypt stamp spec).

Pure parsing and encoding of the stamp types doqproxy can use:

- plain DNS (0x00): ``props || LP(addr)``
- DNS over TLS (0x03) and DNS over QUIC (0x04):
  ``props || LP(addr) || VLP(hash...) || LP(hostname[:port]) || VLP(bootstrap_ip...)``

``props`` is a 64-bit little-endian flag field (DNSSEC, no logs, no filter);
``LP(x)`` is a length octet and ``x``; in ``VLP`` every length but the last has
the 0x80 bit set. The whole is URL-safe base64 without padding. Other stamp types
(DNSCrypt, DoH, relays) are recognised and refused with a message saying so.

The PyPI ``dnsstamps`` package was considered: it has no type hints, raises bare
``Exception`` and skips hashes whose octets happen to be valid UTF-8, so this small
parser is used instead.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

PLAIN = 0x00
DNSCRYPT = 0x01
DOH = 0x02
DOT = 0x03
DOQ = 0x04
_NAMES = {PLAIN: "plain DNS", DNSCRYPT: "DNSCrypt", DOH: "DNS-over-HTTPS", DOT: "DNS-over-TLS",
          DOQ: "DNS-over-QUIC", 0x05: "oblivious DoH target", 0x81: "DNSCrypt relay",
          0x85: "oblivious DoH relay"}  # fmt: skip

PROP_DNSSEC = 1
PROP_NO_LOGS = 2
PROP_NO_FILTER = 4


class StampError(ValueError):
    """A stamp that cannot be used; the message says why, on one line."""


@dataclass(slots=True, frozen=True)
class Stamp:
    """The fields of a plain, DoT or DoQ stamp."""

    protocol: int
    props: int = 0
    address: str = ""
    """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``; may be empty for DoT/DoQ."""
    hashes: tuple[bytes, ...] = ()
    """SHA-256 digests of TBS certificates in the chain (not checked by doqproxy)."""
    hostname: str = ""
    """``NAME`` or ``NAME:PORT``: the TLS server name (DoT/DoQ)."""
    bootstrap: tuple[str, ...] = ()


class _Reader:
    def __init__(self, data: bytes, text: str) -> None:
        self.data = data
        self.pos = 0
        self.text = text

    def fail(self, what: str) -> StampError:
        return StampError(f"stamp {_short(self.text)}: {what}")

    def take(self, count: int, what: str) -> bytes:
        if self.pos + count > len(self.data):
            raise self.fail(f"truncated ({what})")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def lp(self, what: str) -> bytes:
        return self.take(self.take(1, what)[0], what)

    def vlp(self, what: str) -> list[bytes]:
        items = []
        while True:
            length = self.take(1, what)[0]
            items.append(self.take(length & 0x7F, what))
            if not length & 0x80:
                return [item for item in items if item]

    def text_lp(self, what: str) -> str:
        try:
            return self.lp(what).decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not ASCII") from None


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def parse_stamp(text: str) -> Stamp:
    """Decode ``sdns://...`` (raises :class:`StampError`)."""
    if not text.startswith("sdns://"):
        raise StampError(f"stamp {_short(text)}: does not start with sdns://")
    body = text[len("sdns://") :].strip()
    try:
        data = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise StampError(f"stamp {_short(text)}: not URL-safe base64") from None
    reader = _Reader(data, text)
    protocol = reader.take(1, "protocol")[0]
    if protocol not in (PLAIN, DOT, DOQ):
        kind = _NAMES.get(protocol, f"unknown type 0x{protocol:02x}")
        raise reader.fail(f"a {kind} stamp; doqproxy uses DoQ, DoT and plain DNS stamps")
    (props,) = struct.unpack("<Q", reader.take(8, "properties"))
    address = reader.text_lp("address")
    if protocol == PLAIN:
        if not address:
            raise reader.fail("no server address")
        stamp = Stamp(protocol, props, address)
    else:
        hashes = tuple(reader.vlp("certificate hashes"))
        hostname = reader.text_lp("host name")
        bootstrap: tuple[str, ...] = ()
        if reader.pos < len(data):
            bootstrap = tuple(b.decode("ascii", "replace") for b in reader.vlp("bootstrap"))
        if not hostname:
            raise reader.fail("no host name")
        stamp = Stamp(protocol, props, address, hashes, hostname, bootstrap)
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} unexpected octets at the end")
    return stamp


def _lp(value: bytes) -> bytes:
    if len(value) > 0x7F:
        raise StampError("a stamp field is longer than 127 octets")
    return bytes((len(value),)) + value


def _vlp(values: tuple[bytes, ...]) -> bytes:
    if not values:
        return b"\x00"
    out = b""
    for index, value in enumerate(values):
        more = 0x80 if index < len(values) - 1 else 0
        out += bytes((len(_lp(value)) - 1 | more,)) + value
    return out


def encode_stamp(stamp: Stamp) -> str:
    """The ``sdns://`` text of ``stamp`` (inverse of :func:`parse_stamp`)."""
    out = bytes((stamp.protocol,)) + struct.pack("<Q", stamp.props) + _lp(stamp.address.encode())
    if stamp.protocol != PLAIN:
        out += _vlp(stamp.hashes) + _lp(stamp.hostname.encode())
        if stamp.bootstrap:
            out += _vlp(tuple(b.encode() for b in stamp.bootstrap))
    return "sdns://" + base64.urlsafe_b64encode(out).decode().rstrip("=")


def split_host_port(text: str, default: int) -> tuple[str, int]:
    """``NAME``, ``NAME:PORT``, ``IP``, ``IP:PORT``, ``[IPv6]`` or ``[IPv6]:PORT``."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and (not port.isdigit() or not 0 < int(port) <= 65535):
        raise StampError(f"port {port!r} in {text!r} is not a number from 1 to 65535")
    return host, int(port) if port else default
