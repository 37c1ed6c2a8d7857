"""The cache options, on a stand-in click command."""

from __future__ import annotations

from typing import Any

import click
from click.testing import CliRunner

from doqproxy.cache.policy import CacheSettings
from doqproxy.cli.cache_options import cache_options, cache_settings

seen: list[CacheSettings] = []


@click.command()
@cache_options
def command(**flags: Any) -> None:
    seen.append(cache_settings(flags))


def run(*args: str) -> CacheSettings:
    seen.clear()
    result = CliRunner().invoke(command, list(args))
    assert result.exit_code == 0, result.output
    return seen[0]


def test_defaults_match_the_dataclass() -> None:
    assert run() == CacheSettings()


def test_every_flag() -> None:
    settings = run(
        "--cache-size=10",
        "--cache-max-bytes=100000",
        "--cache-min-ttl=5",
        "--cache-max-ttl=600",
        "--cache-max-negative-ttl=30",
        "--serve-stale-max-age=60",
        "--no-serve-stale",
    )
    assert settings == CacheSettings(
        max_entries=10,
        max_bytes=100000,
        min_ttl=5,
        max_ttl=600,
        max_negative_ttl=30,
        serve_stale=False,
        serve_stale_max_age=60,
    )
    assert not run("--no-cache").enabled


def test_contradictions_are_one_line_errors() -> None:
    result = CliRunner().invoke(command, ["--cache-min-ttl=60", "--cache-max-ttl=30"])
    assert result.exit_code == 2
    assert "--cache-min-ttl" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(command, ["--cache-size=0"])
    assert result.exit_code == 2
