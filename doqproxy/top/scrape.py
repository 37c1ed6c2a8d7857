"""One scrape of a forwarder's ``/metrics``: fetch it (stdlib HTTP) and parse it.

Everything except :func:`fetch` is pure, so tests feed it captured text.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from doqproxy.net.addresses import AddressError, parse_listen

DEFAULT_URL = "http://127.0.0.1:9153/metrics"
"""Where ``doqproxy top`` looks when neither ``--metrics`` nor the config file says."""

DEFAULT_PORT = 9153

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name."""

MAX_BODY = 16 << 20
"""A bigger ``/metrics`` body is not a forwarder's (one with 64 upstreams is under 1 MB)."""

MAX_VALUE = float(1 << 53)
"""A larger sample (or NaN, ±Inf) is not a forwarder's: it is left out, not summed."""

_COUNTER_TYPES = ("counter", "histogram", "summary")
_FORWARD_FAMILIES = (
    "doqproxy_build_info",
    "doqproxy_queries_total",
    "doqproxy_resolver_received_total",
)


class ScrapeError(Exception):
    """The endpoint could not be read, or is not a doqproxy forwarder's; one line of text."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(printable(message))  # often the peer's own words (a bad status line)
        self.answered = answered
        """Something answered, but not with a forwarder's metrics."""


@dataclass(frozen=True, slots=True)
class Scrape:
    """The samples of one scrape, by sample name (``..._total``, ``..._bucket``) and labels."""

    at: float
    """When it was taken, on the monotonic clock of the caller."""
    wall: float
    """When it was taken, in seconds since the epoch."""
    values: Mapping[str, Mapping[Labels, float]]
    counters: frozenset[str]
    """Sample names that only go up (until the forwarder restarts)."""

    def series(self, name: str) -> Mapping[Labels, float]:
        """Every series of sample ``name`` (empty when the family is absent)."""
        return self.values.get(name, {})

    def has(self, name: str) -> bool:
        return name in self.values

    def value(self, name: str) -> float | None:
        """The sum over the series of ``name``, or ``None`` when it is absent."""
        series = self.values.get(name)
        return None if series is None else sum(series.values())

    def by_label(self, name: str, label: str, **where: str) -> dict[str, float]:
        """Sums of ``name`` grouped by ``label``, over the series matching ``where``."""
        out: dict[str, float] = {}
        for labels, value in self.series(name).items():
            found = dict(labels)
            if all(found.get(k) == v for k, v in where.items()) and label in found:
                out[found[label]] = out.get(found[label], 0.0) + value
        return out


def parse(text: str, *, at: float, wall: float) -> Scrape:
    """Parse Prometheus text exposition (raises :class:`ScrapeError`)."""
    values: dict[str, dict[Labels, float]] = {}
    counters: set[str] = set()
    try:
        for family in text_string_to_metric_families(text):
            # A family with no samples is still "present": rows grow when it fills.
            if family.type == "counter":
                values.setdefault(family.name + "_total", {})
            for sample in family.samples:
                value = float(sample.value)
                if not abs(value) <= MAX_VALUE:  # NaN, ±Inf, or a sum that would overflow
                    continue
                labels = tuple(sorted((k, printable(v)) for k, v in sample.labels.items()))
                values.setdefault(sample.name, {})[labels] = value
                if family.type in _COUNTER_TYPES:
                    counters.add(sample.name)
            if family.type == "counter":
                counters.add(family.name + "_total")
    except (ValueError, IndexError, KeyError) as exc:
        detail = str(exc).splitlines()[0][:60] if str(exc) else type(exc).__name__
        raise ScrapeError(f"not Prometheus text ({detail})", answered=True) from None
    if not any(name in values for name in _FORWARD_FAMILIES):
        raise ScrapeError("no doqproxy forward metrics there (another exporter?)", answered=True)
    return Scrape(at, wall, values, frozenset(counters))


def printable(value: str) -> str:
    """``value`` with control characters shown as ``\\xNN``: label text is the endpoint's
    choice and must not drive the terminal."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A forwarder's ``/metrics`` never redirects: a 30x is an error, not a new target."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def fetch(url: str, timeout: float) -> str:
    """GET ``url`` and return the body (raises :class:`ScrapeError` with the reason).

    ``timeout`` bounds the whole reply, not each read: a body dripped a byte at a
    time must not hold ``top``."""
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(url, timeout=timeout) as reply:
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_BODY:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk: bytes = reply.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            body = b"".join(chunks)
            if (
                reply.length and size <= MAX_BODY
            ):  # read1 returns b"" at EOF even when Content-Length promised more
                raise http.client.IncompleteRead(body, reply.length)
    except urllib.error.HTTPError as exc:
        raise ScrapeError(f"HTTP {exc.code} {exc.reason}", answered=True) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, OSError) and reason.strerror:
            raise ScrapeError(reason.strerror.lower()) from None
        raise ScrapeError(str(reason)) from None
    except TimeoutError:
        raise ScrapeError(f"no answer within {timeout:g}s") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # A forwarder killed mid-reply: reset, RemoteDisconnected, IncompleteRead.
        raise ScrapeError(str(exc) or type(exc).__name__) from None
    if len(body) > MAX_BODY:
        raise ScrapeError(f"reply larger than {MAX_BODY >> 20} MiB", answered=True)
    return body.decode("utf-8", "replace")


def url_for(text: str) -> str:
    """The metrics URL for ``--metrics`` or ``metrics-listen``: a URL is kept (``/metrics``
    added when it has no path); ``ADDR[:PORT]`` becomes ``http://ADDR:PORT/metrics``, with a
    wildcard address asked on loopback (raises :class:`ScrapeError`)."""
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in ("http", "https"):
            raise ScrapeError(f"{text!r}: only http:// and https:// URLs")
        return text if "/" in rest else text + "/metrics"
    try:
        address = parse_listen(text, DEFAULT_PORT)
    except AddressError as exc:
        raise ScrapeError(str(exc).replace("listen address", "metrics address")) from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{address.port}/metrics"


def listen_hint(url: str) -> str:
    """The ``--metrics-listen`` value that would serve ``url``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or DEFAULT_PORT
    except ValueError:
        return f"127.0.0.1:{DEFAULT_PORT}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
