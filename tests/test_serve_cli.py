"""``doqproxy serve`` refuses bad input with one line on stderr and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from .serve_helpers import ServeCerts, make_certs, serve_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServeCerts:
    return make_certs(tmp_path_factory.mktemp("cli-certs"))


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli-zone") / "ok.zone"
    path.write_text(
        "$ORIGIN ok.test.\n@ 300 IN SOA ns h 1 2 3 4 5\n@ 300 IN NS ns\nns 300 IN A 192.0.2.1\n"
    )
    return str(path)


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(*args), capture_output=True, text=True, timeout=30, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_certificate_file(certs: ServeCerts, zone: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    result = run_serve(
        "-l", "127.0.0.1:0", "--cert", missing, "--key", certs.key_file, "--zone", zone
    )
    assert_one_line_error(result, "nope.pem")


def test_key_that_is_not_pem(certs: ServeCerts, zone: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    result = run_serve(
        "-l", "127.0.0.1:0", "--cert", certs.cert_file, "--key", str(garbage), "--zone", zone
    )
    assert_one_line_error(result, "PEM")


@pytest.mark.parametrize(
    ("upstream", "needle"),
    [
        ("quic://127.0.0.1", "unknown scheme"),
        ("127.0.0.1:53", "expected a URL"),
        ("udp://127.0.0.1:99999", "port"),
        ("udp://127.0.0.1:[[x", "Invalid IPv6 URL"),  # found by fuzz/targets.py
    ],
)
def test_bad_upstream_url(certs: ServeCerts, upstream: str, needle: str) -> None:
    result = run_serve(
        "-l", "127.0.0.1:0", "--cert", certs.cert_file, "--key", certs.key_file, "-u", upstream
    )
    assert_one_line_error(result, needle)


def test_both_or_neither_backend(certs: ServeCerts, zone: str) -> None:
    base = ["-l", "127.0.0.1:0", "--cert", certs.cert_file, "--key", certs.key_file]
    both = run_serve(*base, "--zone", zone, "--upstream", "udp://127.0.0.1:53")
    assert_one_line_error(both, "exactly one")
    neither = run_serve(*base)
    assert_one_line_error(neither, "exactly one")


def test_bad_zone_files(certs: ServeCerts, tmp_path: Path) -> None:
    base = ["-l", "127.0.0.1:0", "--cert", certs.cert_file, "--key", certs.key_file]
    broken = tmp_path / "broken.zone"
    broken.write_text(
        "$ORIGIN broken.test.\n@ 300 IN SOA ns h 1 2 3 4 5\nwww IN A not-an-address\n"
    )
    assert_one_line_error(run_serve(*base, "--zone", str(broken)), "broken.zone")
    no_origin = tmp_path / "no-origin.zone"
    no_origin.write_text("@ 300 IN SOA ns h 1 2 3 4 5\n")
    assert_one_line_error(run_serve(*base, "--zone", str(no_origin)), "--origin")
    assert_one_line_error(run_serve(*base, "--zone", str(tmp_path / "absent.zone")), "absent.zone")


def test_bad_listen_address(certs: ServeCerts, zone: str) -> None:
    result = run_serve(
        "-l", "localhost:853", "--cert", certs.cert_file, "--key", certs.key_file, "--zone", zone
    )
    assert_one_line_error(result, "not an IP address")


def test_address_in_use(certs: ServeCerts, zone: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))  # without SO_REUSEPORT, so serve cannot share it
        port = taken.getsockname()[1]
        result = run_serve(
            "-l", f"127.0.0.1:{port}", "--cert", certs.cert_file, "--key", certs.key_file,
            "--zone", zone,
        )  # fmt: skip
    assert_one_line_error(result, "already in use", str(port))
