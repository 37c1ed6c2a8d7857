"""A second ``doqproxy serve`` on a taken port fails at once, unless both ask for
``--reuseport`` (several processes sharing the port on purpose, as CoreDNS does)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from .serve_helpers import (
    ServeCerts,
    ServeProcess,
    serve_certs,
    serve_command,
    start_serve,
    zone_file,
)

__all__ = ["serve_certs", "start_serve", "zone_file"]  # fixtures used by name

pytestmark = pytest.mark.slow


def _second(
    certs: ServeCerts, zone: str, port: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(
            "-l", f"127.0.0.1:{port}", "--cert", certs.cert_file, "--key", certs.key_file,
            "--zone", zone, *extra,
        ),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_taken_port_is_an_error(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    first = start_serve(
        "--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file
    )
    result = _second(serve_certs, zone_file, first.port)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0], result.stderr
    # Even a second process asking for --reuseport cannot join one that did not.
    result = _second(serve_certs, zone_file, first.port, "--reuseport")
    assert result.returncode == 1 and "already in use" in result.stderr


def test_reuseport_shares_on_purpose(
    start_serve: Callable[..., ServeProcess], serve_certs: ServeCerts, zone_file: str
) -> None:
    common = ("--cert", serve_certs.cert_file, "--key", serve_certs.key_file, "--zone", zone_file)
    first = start_serve(*common, "--reuseport")
    second = start_serve(*common, "--reuseport", "-l", f"127.0.0.1:{first.port}")
    assert second.port == first.port
