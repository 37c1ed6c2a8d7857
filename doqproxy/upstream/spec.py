"""One configured upstream: its URL plus per-upstream options.

On the command line an upstream is ``-u URL`` where per-upstream options ride
in the query string: ``quic://9.9.9.9?tls-server-name=dns.quad9.net``. In
the TOML file, ``[[upstream]]`` tables say the same with keys (``url``,
``tls-server-name``, ...); :func:`table_to_text` turns a table into that text,
so the file and the command line go through one parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

from doqproxy.net.addresses import AddressError, UpstreamUrl
from doqproxy.upstream.targets import parse_target

OPTION_KEYS = ("tls-server-name", "tls-ca-file")
"""Per-upstream keys, in ``[[upstream]]`` tables and in a URL's query string."""


@dataclass(slots=True, frozen=True)
class UpstreamSpec:
    """An upstream as configured; the options override the global TLS flags."""

    url: UpstreamUrl
    tls_server_name: str | None = None
    tls_ca_file: str | None = None
    addresses: tuple[str, ...] = ()
    """Addresses a DNS stamp carries, used instead of looking the name up."""
    text: str = ""
    """As the user gave it (a stamp stays a stamp in logs and check-config)."""

    def __str__(self) -> str:
        options = {
            key: value
            for key, value in (
                ("tls-server-name", self.tls_server_name),
                ("tls-ca-file", self.tls_ca_file),
            )
            if value is not None
        }
        query = urlencode(options, quote_via=quote, safe="/")
        return f"{self.url}?{query}" if query else str(self.url)


def parse_spec(text: str, schemes: tuple[str, ...] = ("quic",)) -> UpstreamSpec:
    """Parse ``SCHEME://HOST[:PORT][?key=value&...]`` or a DNS stamp ``sdns://...``
    (raises AddressError or StampError, one line each)."""
    base, _, query = text.partition("?")
    target = parse_target(base, schemes)
    url = target.url
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise AddressError(f"upstream {text!r}: cannot read the options after '?'") from None
    for key, value in pairs:
        if key not in OPTION_KEYS:
            known = ", ".join(OPTION_KEYS)
            raise AddressError(f"upstream {text!r}: unknown option {key!r} (known: {known})")
        if key in options:
            raise AddressError(f"upstream {text!r}: {key} is given twice")
        if not value:
            raise AddressError(f"upstream {text!r}: {key} is empty")
        options[key] = value
    return UpstreamSpec(
        url,
        tls_server_name=options.get("tls-server-name"),
        tls_ca_file=options.get("tls-ca-file"),
        addresses=target.addresses,
        text=text,
    )


def table_to_text(table: dict[str, object]) -> str:
    """An ``[[upstream]]`` table as upstream text; raises ValueError naming a bad key."""
    options: dict[str, str] = {}
    for key, value in table.items():
        if key != "url" and key not in OPTION_KEYS:
            known = ", ".join(("url", *OPTION_KEYS))
            raise ValueError(f"unknown key {key!r} (known: {known})")
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string")
        if key != "url":
            options[key] = value
    url = table.get("url")
    if not isinstance(url, str):
        raise ValueError('needs url = "quic://HOST[:PORT]"')
    if "?" in url:
        raise ValueError("put options in the table, not in url")
    query = urlencode(options, quote_via=quote, safe="/")
    return f"{url}?{query}" if query else url
