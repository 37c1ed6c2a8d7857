"""Review: ``doqproxy top``'s fetch against a lying endpoint: redirects and a slow drip.

A forwarder's ``/metrics`` never redirects, so a redirect (to anywhere, here to
another loopback server with real forwarder metrics) is an error; and a body
dripped one byte at a time must not hold ``top`` past its timeout.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from doqproxy.top import scrape

METRICS = (Path(__file__).parent / "top_scrapes" / "forward-0.1.0.txt").read_bytes()

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


def serve(handler: Handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            handler(self)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), One)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


@pytest.fixture
def servers() -> Iterator[Callable[[Handler], str]]:
    started: list[http.server.ThreadingHTTPServer] = []

    def start(handler: Handler) -> str:
        server, url = serve(handler)
        started.append(server)
        return url

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def metrics(request: http.server.BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Length", str(len(METRICS)))
    request.end_headers()
    request.wfile.write(METRICS)


def test_redirect_is_not_followed(servers: Callable[[Handler], str]) -> None:
    elsewhere = servers(metrics)
    scrape.parse(scrape.fetch(elsewhere, 10.0), at=0.0, wall=0.0)  # the target itself is fine

    def redirect(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(302)
        request.send_header("Location", elsewhere)
        request.send_header("Content-Length", "0")
        request.end_headers()

    with pytest.raises(scrape.ScrapeError, match="302"):
        scrape.fetch(servers(redirect), 10.0)


def test_slow_drip_ends_at_the_timeout(servers: Callable[[Handler], str]) -> None:
    def drip(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.end_headers()
        try:
            for _ in range(120):  # a byte every 0.5 s: one minute in all
                request.wfile.write(b"#")
                request.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    url = servers(drip)
    started = time.monotonic()
    with pytest.raises(scrape.ScrapeError, match="no answer within"):
        scrape.fetch(url, 2.0)
    assert time.monotonic() - started < 30.0  # generous; the drip lasts 60 s


def test_error_text_from_the_peer_has_no_control_characters() -> None:
    """http.client puts a bad status line into its exception as it came."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x1b]0;owned\x07\x1b[2J 200 OK\r\n\r\n")

        thread = threading.Thread(target=answer_once)
        thread.start()
        try:
            with pytest.raises(scrape.ScrapeError) as caught:
                scrape.fetch(f"http://127.0.0.1:{port}/metrics", 10.0)
        finally:
            thread.join(10.0)
    assert "owned" in str(caught.value)
    assert not any(ord(c) < 0x20 for c in str(caught.value)), repr(str(caught.value))
