"""``doqproxy query``: ask a DoQ server one question and show how it went."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click
import dns.flags
import dns.message
import dns.rcode

from doqproxy.cli.forward import check_ca_file
from doqproxy.cli.types import FiniteFloatRange
from doqproxy.net.addresses import AddressError, UpstreamUrl
from doqproxy.net.stamps import StampError
from doqproxy.ops import process
from doqproxy.upstream import engine
from doqproxy.upstream.probe import ProbeError, ProbeResult, ProbeSettings, probe
from doqproxy.upstream.targets import parse_target


@click.command()
@click.argument("name")
@click.argument("qtype", default="A", metavar="[TYPE]")
@click.option(
    "-u",
    "--upstream",
    required=True,
    metavar="quic://HOST[:PORT]|sdns://...",
    help="The DoQ server; the port defaults to 853. A DNS stamp (sdns://) works too.",
)
@click.option("--tls-ca-file", metavar="PATH", help="Trust these CAs instead of the system store.")
@click.option("--tls-server-name", metavar="NAME", help="Name to verify in the certificate.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Keep session tickets here, so the next run can resume the session.",
)
@click.option(
    "--0rtt",
    "zero_rtt",
    is_flag=True,
    help="Send the query as 0-RTT early data when a stored ticket allows (needs --state-dir).",
)
@click.option("--dnssec", is_flag=True, help="Set the DO bit.")
@click.option(
    "--timeout",
    type=FiniteFloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds before giving up.",
)
@click.option(
    "--quic-engine",
    type=click.Choice(engine.ENGINES),
    default=engine.NAME,
    show_default=True,
    help="QUIC implementation to use (qh3 needs pip install qh3).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", count=True, help="Log to stderr; -vvv includes QUIC packets.")
def query(
    name: str,
    qtype: str,
    upstream: str,
    tls_ca_file: str | None,
    tls_server_name: str | None,
    state_dir: Path | None,
    zero_rtt: bool,
    dnssec: bool,
    timeout: float,
    quic_engine: str,
    as_json: bool,
    verbose: int,
) -> None:
    """Ask a DNS-over-QUIC server one question; show the answer, timings and TLS details.

    Exits 1 with a one-line reason on SERVFAIL, a timeout or a TLS error.

    \b
    Examples:
      doqproxy query example.com AAAA -u quic://dns.adguard-dns.com
      doqproxy query example.com -u quic://dns.adguard-dns.com --state-dir ~/.cache/doqproxy --0rtt
    """
    process.setup_logging(verbose)
    try:
        engine.select(quic_engine)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--quic-engine") from None
    if verbose < 2:
        # The failure is reported in one line below; aioquic's own log line would repeat it.
        logging.getLogger("quic").setLevel(logging.CRITICAL)
    if zero_rtt and state_dir is None:
        raise click.UsageError("--0rtt needs --state-dir, where the session tickets are kept")
    try:
        target = parse_target(upstream, ("quic",))
    except (AddressError, StampError) as exc:
        raise click.ClickException(str(exc)) from None
    url = target.url
    if target.addresses:  # a stamp: connect to its address, verify its host name
        tls_server_name = tls_server_name or url.host
        url = UpstreamUrl(url.scheme, target.addresses[0], url.port)
    if tls_ca_file is not None:
        check_ca_file(tls_ca_file)
    settings = ProbeSettings(
        qname=name,
        qtype=qtype.upper(),
        upstream=url,
        tls_ca_file=tls_ca_file,
        tls_server_name=tls_server_name,
        state_dir=state_dir,
        zero_rtt=zero_rtt,
        timeout=timeout,
        dnssec=dnssec,
    )
    try:
        result = process.run(lambda: probe(settings))
    except ProbeError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"{exc.strerror or exc}") from None
    click.echo(json.dumps(to_json(result), indent=2) if as_json else to_text(result, settings))
    if result.response.rcode() == dns.rcode.SERVFAIL:
        reason = "; ".join(f"EDE {e.code}: {e.text}" for e in result.response.extended_errors())
        raise click.ClickException(f"SERVFAIL from {url}" + (f" ({reason})" if reason else ""))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def to_text(result: ProbeResult, settings: ProbeSettings) -> str:
    """dig-like presentation of the answer, then the connection details."""
    response = result.response
    flags = dns.flags.to_text(response.flags).lower()
    counts = (
        f"QUERY: {len(response.question)}, ANSWER: {len(response.answer)}, "
        f"AUTHORITY: {len(response.authority)}, "
        f"ADDITIONAL: {len(response.additional) + (response.edns >= 0)}"
    )
    lines = [
        f"; <<>> doqproxy query <<>> {settings.qname} {settings.qtype} @{settings.upstream}",
        f";; ->>HEADER<<- opcode: QUERY, status: {result.rcode}, id: {response.id}",
        f";; flags: {flags}; {counts}",
    ]
    if response.edns >= 0:
        lines += ["", ";; OPT PSEUDOSECTION:", f"; EDNS: version: {response.edns}, "
                  f"flags: {'do' if response.ednsflags & dns.flags.DO else ''}; "
                  f"udp: {response.payload}"]  # fmt: skip
        for error in response.extended_errors():
            lines.append(f"; EDE: {error.code}: ({error.text or ''})")
    sections = (
        ("QUESTION", response.question),
        ("ANSWER", response.answer),
        ("AUTHORITY", response.authority),
        ("ADDITIONAL", response.additional),
    )
    for title, rrsets in sections:
        if not rrsets:
            continue
        lines += ["", f";; {title} SECTION:"]
        for rrset in rrsets:
            text = rrset.to_text(omit_final_dot=False)
            lines += [(";" + line) if title == "QUESTION" else line for line in text.splitlines()]
    host, port = result.address
    lines += [
        "",
        f";; SERVER: {host}#{port} ({settings.upstream}, TLS name {result.server_name})",
        f";; MSG SIZE rcvd: {result.wire_size}",
        f";; TIMING: connect {_ms(result.connect)}, handshake {_ms(result.handshake)}, "
        f"first byte {_ms(result.first_byte)}, total {_ms(result.total)}",
        f";; TLS: {result.tls_version or '-'}, {result.cipher or '-'}, ALPN {result.alpn or '-'}",
        f";; SESSION: ticket offered {_yes(result.ticket_offered)}, "
        f"resumed {_yes(result.session_resumed)}, early data sent {_yes(result.early_data_sent)}, "
        f"accepted {_yes(result.early_data_accepted)}",
    ]
    lines += [f";; NOTE: {note}" for note in result.notes]
    return "\n".join(lines)


def _section(rrsets: list[Any]) -> list[str]:
    return [line for rrset in rrsets for line in rrset.to_text().splitlines()]


def to_json(result: ProbeResult) -> dict[str, Any]:
    """The same facts as :func:`to_text`, for scripts. Times are in milliseconds."""
    response = result.response

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "server": {"address": result.address[0], "port": result.address[1]},
        "server_name": result.server_name,
        "rcode": result.rcode,
        "flags": dns.flags.to_text(response.flags).split(),
        "question": _section(response.question),
        "answer": _section(response.answer),
        "authority": _section(response.authority),
        "additional": _section(response.additional),
        "ede": [{"code": e.code, "text": e.text} for e in response.extended_errors()],
        "size": result.wire_size,
        "timing_ms": {
            "connect": ms(result.connect),
            "handshake": ms(result.handshake),
            "first_byte": ms(result.first_byte),
            "total": ms(result.total),
        },
        "tls": {"version": result.tls_version, "cipher": result.cipher, "alpn": result.alpn},
        "session": {
            "ticket_offered": result.ticket_offered,
            "resumed": result.session_resumed,
            "early_data_sent": result.early_data_sent,
            "early_data_accepted": result.early_data_accepted,
            "tickets_saved": result.tickets_saved,
        },
        "notes": result.notes,
    }
