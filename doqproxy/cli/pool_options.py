"""The upstream-pool and 0-RTT command-line options of ``doqproxy forward``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from doqproxy.cli.types import FiniteFloatRange
from doqproxy.upstream import engine
from doqproxy.upstream.pool import PoolSettings
from doqproxy.upstream.tickets import default_state_dir

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = PoolSettings()

POOL_FLAGS = (
    "max_connections_per_upstream",
    "max_streams_per_connection",
    "max_queued_queries",
    "upstream_idle_timeout",
    "keepalive",
    "max_connection_age",
    "no_0rtt",
    "quic_engine",
    "state_dir",
)
"""The keyword arguments :func:`pool_options` adds to a command."""


def pool_options(command: F) -> F:
    """Add the connection-pool, 0-RTT and state-directory options to a click command."""
    options = [
        click.option(
            "--max-connections-per-upstream",
            type=click.IntRange(min=1, max=64),
            default=_DEFAULTS.max_connections,
            show_default=True,
            help="QUIC connections kept to the upstream; more open only under load.",
        ),
        click.option(
            "--max-streams-per-connection",
            type=click.IntRange(min=1, max=10_000),
            default=_DEFAULTS.max_streams,
            show_default=True,
            help="In-flight queries per connection (never more than the server allows).",
        ),
        click.option(
            "--max-queued-queries",
            type=click.IntRange(min=0),
            default=_DEFAULTS.max_queue,
            show_default=True,
            help="Queries that may wait when every connection is full; beyond, SERVFAIL.",
        ),
        click.option(
            "--upstream-idle-timeout",
            type=FiniteFloatRange(min=3.0),
            default=_DEFAULTS.idle_timeout,
            show_default=True,
            help="QUIC idle timeout; idle connections are closed cleanly just before it.",
        ),
        click.option(
            "--keepalive",
            type=FiniteFloatRange(min=1.0),
            default=None,
            metavar="SECONDS",
            help="PING idle connections this often to keep them open (off by default).",
        ),
        click.option(
            "--max-connection-age",
            type=FiniteFloatRange(min=1.0),
            default=None,
            metavar="SECONDS",
            help="Retire connections this old: no new queries, closed once idle (off by default).",
        ),
        click.option(
            "--no-0rtt",
            is_flag=True,
            help="Never send queries as 0-RTT early data (sessions are still resumed).",
        ),
        click.option(
            "--quic-engine",
            type=click.Choice(engine.ENGINES),
            default=engine.NAME,
            show_default=True,
            help="QUIC implementation for the upstream connections; qh3 (pip install qh3) "
            "uses less CPU per query.",
        ),
        click.option(
            "--state-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where session tickets persist across restarts. Default: $STATE_DIRECTORY, "
            "else /var/lib/doqproxy as root, else $XDG_STATE_HOME/doqproxy.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pool_settings(params: dict[str, Any], *, padding: bool) -> tuple[PoolSettings, Path]:
    """Build :class:`PoolSettings` and the state directory from the options' values;
    the QUIC engine is selected (and imported) here, before privileges are dropped."""
    try:
        engine.select(params["quic_engine"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--quic-engine") from None
    settings = PoolSettings(
        max_connections=params["max_connections_per_upstream"],
        max_streams=params["max_streams_per_connection"],
        max_queue=params["max_queued_queries"],
        idle_timeout=params["upstream_idle_timeout"],
        keepalive=params["keepalive"],
        max_age=params["max_connection_age"],
        zero_rtt=not params["no_0rtt"],
        quic_engine=params["quic_engine"],
        pad_block=_DEFAULTS.pad_block if padding else None,
    )
    return settings, params["state_dir"] or _started_default()


_DEFAULT_DIRS: dict[tuple[str | None, ...], Path] = {}


def _started_default() -> Path:
    """The default state directory as the process first saw it: it depends on the
    effective user, and a reload after ``--user`` must not make it the new user's (a
    state directory cannot change without a restart, and saying so on every SIGHUP
    would be wrong). The environment it reads stays part of the key."""
    key = tuple(os.environ.get(name) for name in ("STATE_DIRECTORY", "XDG_STATE_HOME", "HOME"))
    found = _DEFAULT_DIRS.get(key)
    if found is None:
        found = _DEFAULT_DIRS[key] = default_state_dir()
    return found
