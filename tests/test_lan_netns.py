"""Access control with real off-host clients, in two network namespaces the test makes.

Namespace "srv" runs ``doqproxy serve --zone`` (the upstream, on its own
loopback) and ``doqproxy forward`` on 198.51.100.1. Namespace "cli" holds the
other end of a veth pair with 198.51.100.2 (on the forwarder's LAN) and
203.0.113.7 (off it; srv routes 203.0.113.0/24 back over the pair). Both
ranges are documentation prefixes that exist only inside these namespaces.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import SERVER_NAME, Certs, ManagedProcess
from .lan_helpers import wait_for_line

pytestmark = pytest.mark.slow

ZONE = """\
$ORIGIN lan.test.
$TTL 300
@    IN SOA ns hostmaster 1 3600 600 86400 60
     IN NS  ns
ns   IN A   192.0.2.53
www  IN A   192.0.2.80
www2 IN A   192.0.2.81
www3 IN A   192.0.2.82
"""
SERVER = "198.51.100.1"
ON_LAN = "198.51.100.2"
OFF_LAN = "203.0.113.7"
UPSTREAM_PORT = 8853


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass
class Lan:
    srv: str
    cli: str
    srv_link: str

    def run(self, ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def dig(self, source: str, *args: str, server: str = SERVER, port: int = 53) -> str:
        ns = self.srv if source.startswith("127.") else self.cli
        result = self.run(
            ns, "dig", f"@{server}", "-p", str(port), "-b", source, "+tries=1", "+time=2", *args
        )
        return result.stdout

    def metrics(self, port: int = 9153) -> str:
        code = (
            "import urllib.request;"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
        )
        return self.run(self.srv, sys.executable, "-c", code).stdout


def status(dig_output: str) -> str:
    found = re.search(r"status: (\w+)", dig_output)
    return found.group(1) if found else "TIMEOUT"


def counter(text: str, name: str, label: str) -> float:
    found = re.search(rf"^{name}\{{{label}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def sent_upstream(text: str) -> float:
    found = re.search(r"^doqproxy_upstream_queries_sent_total\{[^}]*\} (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("dig") is None:
        pytest.skip("network namespaces need root, iproute2 and dig")
    tag = secrets.token_hex(3)
    lan = Lan(f"doqlan-s-{tag}", f"doqlan-c-{tag}", f"dqs{tag}")
    try:
        _ip("netns", "add", lan.srv)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
    try:
        _ip("netns", "add", lan.cli)
        _ip("link", "add", lan.srv_link, "netns", lan.srv, "type", "veth",
            "peer", "name", f"dqc{tag}", "netns", lan.cli)  # fmt: skip
        for ns in (lan.srv, lan.cli):
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", lan.srv, "addr", "add", f"{SERVER}/24", "dev", lan.srv_link)
        _ip("-n", lan.srv, "link", "set", lan.srv_link, "up")
        _ip("-n", lan.srv, "route", "add", "203.0.113.0/24", "dev", lan.srv_link)
        _ip("-n", lan.cli, "addr", "add", f"{ON_LAN}/24", "dev", f"dqc{tag}")
        _ip("-n", lan.cli, "addr", "add", f"{OFF_LAN}/24", "dev", f"dqc{tag}")
        _ip("-n", lan.cli, "link", "set", f"dqc{tag}", "up")
        yield lan
    finally:
        for ns in (lan.cli, lan.srv):  # deleting a namespace deletes its end of the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


class NsProcess(ManagedProcess):
    def __init__(self, lan: Lan, args: list[str], log_path: Path, ready: str) -> None:
        argv = ["ip", "netns", "exec", lan.srv, sys.executable, "-m", "doqproxy", *args]
        super().__init__(argv, log_path)
        try:
            wait_for_line(self.stderr, ready, timeout=30)
        except AssertionError:
            self.stop()
            raise


@pytest.fixture
def processes() -> Iterator[list[NsProcess]]:
    started: list[NsProcess] = []
    yield started
    for process in reversed(started):
        process.stop()


def forward(lan: Lan, certs: Certs, tmp_path: Path, port: int, *extra: str) -> NsProcess:
    args = [
        "forward", "-l", f"{SERVER}:{port}", "-l", f"127.0.0.1:{port}",
        "-u", f"quic://127.0.0.1:{UPSTREAM_PORT}",
        "--tls-ca-file", certs.ca_file, "--tls-server-name", SERVER_NAME,
        "--state-dir", str(tmp_path / f"state-{port}"), "--no-cache", "-v", *extra,
    ]  # fmt: skip
    return NsProcess(lan, args, tmp_path / f"forward-{port}.log", "listening on")


def test_off_lan_clients_are_refused(
    lan: Lan, certs: Certs, tmp_path: Path, processes: list[NsProcess]
) -> None:
    zone = tmp_path / "lan.test.zone"
    zone.write_text(ZONE)
    upstream = NsProcess(
        lan,
        ["serve", "-l", f"127.0.0.1:{UPSTREAM_PORT}", "--cert", certs.cert_file,
         "--key", certs.key_file, "--zone", str(zone), "-v"],
        tmp_path / "serve.log",
        "listening on quic://",
    )  # fmt: skip
    processes.append(upstream)
    proxy = forward(lan, certs, tmp_path, 53, "--metrics-listen", "127.0.0.1:9153")
    processes.append(proxy)
    log = proxy.stderr()
    assert re.search(
        # The veth's IPv6 link-local subnet is attached too.
        r"WARNING .*clients allowed from 127\.0\.0\.0/8, ::1/128, 198\.51\.100\.0/24, "
        r"fe80::/64; "
        r"UDP rate limit 100 queries/s per /24 and /56",
        log,
    ), log

    # On the LAN: answered over UDP and TCP.
    assert "192.0.2.80" in lan.dig(ON_LAN, "www.lan.test")
    assert "192.0.2.80" in lan.dig(ON_LAN, "www.lan.test", "+tcp")
    sent = sent_upstream(lan.metrics())
    assert sent == 2
    # Off the LAN: dropped over UDP, REFUSED over TCP, never forwarded.
    assert status(lan.dig(OFF_LAN, "www2.lan.test")) == "TIMEOUT"
    assert status(lan.dig(OFF_LAN, "www2.lan.test", "+tcp")) == "REFUSED"
    assert sent_upstream(lan.metrics()) == sent
    # Cache snooping: RD=0 is refused from the LAN, allowed from loopback.
    assert status(lan.dig(ON_LAN, "www.lan.test", "+nordflag")) == "REFUSED"
    assert status(lan.dig("127.0.0.1", "www.lan.test", "+nordflag", server="127.0.0.1")) == (
        "NOERROR"
    )
    metrics = lan.metrics()
    assert counter(metrics, "doqproxy_refused_total", 'reason="acl"') == 2
    assert counter(metrics, "doqproxy_refused_total", 'reason="snoop"') == 1

    # --refused-action refuse, and an explicit --allow replaces the LAN default.
    explicit = forward(
        lan, certs, tmp_path, 5300, "--allow", "203.0.113.0/24", "--refused-action", "refuse"
    )
    processes.append(explicit)
    assert "192.0.2.81" in lan.dig(OFF_LAN, "www2.lan.test", port=5300)
    assert status(lan.dig(ON_LAN, "www3.lan.test", port=5300)) == "REFUSED"

    # EDE text names the upstream: loopback clients see it, LAN clients only the code,
    # unless --ede-detail full.
    detailed = forward(lan, certs, tmp_path, 5301, "--ede-detail", "full")
    processes.append(detailed)
    upstream.stop()
    on_lan = lan.dig(ON_LAN, "www3.lan.test")
    assert status(on_lan) == "SERVFAIL" and "EDE" in on_lan, on_lan
    assert f"127.0.0.1:{UPSTREAM_PORT}" not in on_lan
    local = lan.dig("127.0.0.1", "www3.lan.test", server="127.0.0.1")
    assert f"127.0.0.1:{UPSTREAM_PORT}" in local, local
    full = lan.dig(ON_LAN, "www3.lan.test", port=5301)
    assert f"127.0.0.1:{UPSTREAM_PORT}" in full, full


def test_sighup_reads_the_interfaces_again(
    lan: Lan, certs: Certs, tmp_path: Path, processes: list[NsProcess]
) -> None:
    proxy = forward(lan, certs, tmp_path, 53)
    processes.append(proxy)
    # No upstream runs: an allowed client gets SERVFAIL, a refused one nothing.
    assert status(lan.dig(OFF_LAN, "www.lan.test")) == "TIMEOUT"
    assert status(lan.dig(ON_LAN, "www.lan.test")) == "SERVFAIL"
    # The LAN gains a subnet; after SIGHUP its clients are answered.
    _ip("-n", lan.srv, "route", "del", "203.0.113.0/24", "dev", lan.srv_link)
    _ip("-n", lan.srv, "addr", "add", "203.0.113.1/24", "dev", lan.srv_link)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for_line(proxy.stderr, "203.0.113.0/24", timeout=15)
    time.sleep(0.2)
    assert status(lan.dig(OFF_LAN, "www.lan.test")) == "SERVFAIL"


def test_lan_clients_are_rate_limited_by_default(
    lan: Lan, certs: Certs, tmp_path: Path, processes: list[NsProcess]
) -> None:
    """100 queries a second per /24 when the listener is reachable from the LAN:
    a burst of 400 from one LAN client gets about 100 answers and, for every second
    query over the limit, an empty TC=1 reply."""
    processes.append(forward(lan, certs, tmp_path, 53, "--metrics-listen", "127.0.0.1:9153"))
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import dns.flags
from tests.lan_helpers import make_query, udp_burst
queries = [make_query("www.lan.test.", msg_id=i) for i in range(400)]
replies = udp_burst(53, queries, source={ON_LAN!r}, host={SERVER!r}, quiet=4.0)
print(len(replies), sum(1 for r in replies if r.flags & dns.flags.TC))
"""
    result = lan.run(lan.cli, sys.executable, "-c", code, timeout=120)
    assert result.returncode == 0, result.stderr
    total, slipped = map(int, result.stdout.split())
    full = total - slipped
    # No upstream runs, so the full replies are SERVFAIL: they spend the error bucket
    # (20 a second) as well as the query bucket, which is what bounds them here.
    assert 1 <= full <= 60, (total, slipped)
    assert 100 <= slipped <= 200, (total, slipped)
    metrics = lan.metrics()
    assert counter(metrics, "doqproxy_ratelimited_total", 'action="slip"') == slipped
    assert counter(metrics, "doqproxy_refused_total", 'reason="ratelimit"') >= 250
