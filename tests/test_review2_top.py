"""Review: ``doqproxy top`` against a hostile metrics endpoint.

Label values (upstream names, last errors, build info) are text the endpoint
chooses: terminal control sequences must not reach the terminal, rich markup in
them must not break the live screen, and an endless body must not eat memory.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from doqproxy.top import model, scrape, text

HOSTILE_NAME = "evil\x1b]0;owned\x07\x1b[2J[/][bold]x"
BODY = "".join(
    (
        "# TYPE doqproxy_build_info gauge\n"
        'doqproxy_build_info{version="1\x1b[31m",event_loop="asyncio",quic_engine="aioquic"} 1.0\n'
        "# TYPE doqproxy_queries_total counter\n"
        'doqproxy_queries_total{transport="udp",qtype="A",rcode="NOERROR"} 3.0\n'
        "# TYPE doqproxy_upstream_last_error_info gauge\n"
        'doqproxy_upstream_last_error_info{upstream="',
        HOSTILE_NAME,
        '",error="boom\x1b[5m\\n[/]"} 1.0\n'
        "# TYPE doqproxy_upstream_connections gauge\n"
        'doqproxy_upstream_connections{upstream="',
        HOSTILE_NAME,
        '"} 1.0\n',
    )
)


def snapshot() -> model.Snapshot:
    taken = scrape.parse(BODY, at=1.0, wall=1000.0)
    return model.Monitor("http://127.0.0.1:9153/metrics").update(taken)


def test_plain_text_has_no_control_characters() -> None:
    out = text.render(snapshot())
    assert "evil" in out and "boom" in out
    assert not any((ord(c) < 0x20 and c != "\n") or c == "\x7f" for c in out), repr(out)


@pytest.fixture
def endless_server() -> Iterator[str]:
    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            chunk = b"#" * 65536 + b"\n"
            try:
                for _ in range(2048):  # 128 MiB, far past any real /metrics
                    self.wfile.write(chunk)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_huge_body_is_refused_not_read(endless_server: str) -> None:
    with pytest.raises(scrape.ScrapeError, match="larger than"):
        scrape.fetch(endless_server, timeout=30.0)


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf", "1e308"])
def test_non_finite_values_do_not_crash(bad: str) -> None:
    base = (Path(__file__).parent / "top_scrapes" / "forward-two-upstreams.txt").read_text()
    lines = []
    for line in base.splitlines():
        if line and not line.startswith("#"):
            line = f"{line.rpartition(' ')[0]} {bad}"
        lines.append(line)
    body = "\n".join(lines) + "\n"
    monitor = model.Monitor("http://127.0.0.1:9153/metrics")
    monitor.update(scrape.parse(base, at=0.0, wall=1.8e9))
    assert "upstream" in text.render(monitor.update(scrape.parse(body, at=1.0, wall=1.8e9 + 1)))
    fresh = model.Monitor("http://127.0.0.1:9153/metrics")
    assert "upstream" in text.render(fresh.update(scrape.parse(body, at=0.0, wall=1.8e9)))
