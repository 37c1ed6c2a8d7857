"""The LAN options from the command line, the environment and the TOML file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from doqproxy.cli import main
from doqproxy.cli.config import parse
from doqproxy.cli.forward import forward


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DOQPROXY_"):
            monkeypatch.delenv(name)


def test_allow_and_limits_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "doqproxy.toml"
    path.write_text(
        'upstream = "quic://192.0.2.7"\n'
        'allow = ["192.168.1.0/24", "fd00:1::/64"]\n'
        'refused-action = "refuse"\nratelimit = 50.0\nratelimit-slip = 3\n'
        'ede-detail = "full"\nmax-in-flight = 300\nno-refuse-any = true\n'
        "tcp-write-budget = 1048576\ntcp-max-connection-age = 60.0\n"
    )
    settings, _ = parse(forward, ["--config", str(path)])
    access = settings.access
    assert access.allow == ("192.168.1.0/24", "fd00:1::/64")
    assert (access.refused_action, access.ratelimit, access.ratelimit_slip) == ("refuse", 50.0, 3)
    assert (access.ede_detail, access.max_in_flight, access.refuse_any) == ("full", 300, False)
    assert settings.tcp.write_budget == 1048576 and settings.tcp.max_age == 60.0


def test_allow_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOQPROXY_ALLOW", "10.0.0.0/8 any")
    settings, _ = parse(forward, ["-u", "quic://192.0.2.7"])
    assert settings.access.allow == ("10.0.0.0/8", "any")
    assert settings.access.ratelimit is None  # automatic


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allow", "10.0.0.0/33"], "--allow '10.0.0.0/33': not a network"),
        (["--refused-action", "ignore"], "'ignore' is not one of 'drop', 'refuse'"),
        (["--ratelimit", "-1"], "-1"),
    ],
)
def test_bad_values_are_one_line_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["forward", "-u", "quic://192.0.2.7", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_check_config_shows_the_lan_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOQPROXY_UPSTREAM", "quic://192.0.2.7")
    monkeypatch.setenv("DOQPROXY_ALLOW", "192.168.1.0/24")
    result = CliRunner().invoke(main, ["check-config"])
    assert result.exit_code == 0, result.output
    assert 'allow = ["192.168.1.0/24"]  # DOQPROXY_ALLOW' in result.output
    assert "# ratelimit is not set" in result.output
    assert 'refused-action = "drop"  # default' in result.output
