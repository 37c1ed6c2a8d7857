"""The answer-cache command-line options, shared by the sub-commands that cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from doqproxy.cache.policy import CacheSettings

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = CacheSettings()

CACHE_FLAGS = (
    "cache_size",
    "cache_max_bytes",
    "cache_min_ttl",
    "cache_max_ttl",
    "cache_max_negative_ttl",
    "no_cache",
    "serve_stale_max_age",
    "no_serve_stale",
)
"""The keyword arguments :func:`cache_options` adds to a command."""


def cache_options(command: F) -> F:
    """Add the ``--cache-*`` and serve-stale options to a click command."""
    seconds = click.IntRange(min=0)
    options = [
        click.option(
            "--cache-size",
            type=click.IntRange(min=1),
            default=_DEFAULTS.max_entries,
            show_default=True,
            help="Most answers kept in the cache.",
        ),
        click.option(
            "--cache-max-bytes",
            type=click.IntRange(min=1),
            default=_DEFAULTS.max_bytes,
            show_default=True,
            help="Most memory the cache may use, in bytes (estimated per entry).",
        ),
        click.option(
            "--cache-min-ttl",
            type=seconds,
            default=_DEFAULTS.min_ttl,
            show_default=True,
            help="Keep and serve positive answers for at least this many seconds.",
        ),
        click.option(
            "--cache-max-ttl",
            type=seconds,
            default=_DEFAULTS.max_ttl,
            show_default=True,
            help="Keep and serve answers for at most this many seconds.",
        ),
        click.option(
            "--cache-max-negative-ttl",
            type=seconds,
            default=_DEFAULTS.max_negative_ttl,
            show_default=True,
            help="Cap for NXDOMAIN and NODATA answers (RFC 2308).",
        ),
        click.option("--no-cache", is_flag=True, help="Do not cache answers."),
        click.option(
            "--serve-stale-max-age",
            type=seconds,
            default=_DEFAULTS.serve_stale_max_age,
            show_default=True,
            help="Seconds past expiry an answer may be served when the upstream fails (RFC 8767).",
        ),
        click.option(
            "--no-serve-stale", is_flag=True, help="Never answer from expired cache entries."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def cache_settings(flags: dict[str, Any]) -> CacheSettings:
    """The :class:`CacheSettings` for the values of the :func:`cache_options` flags.

    ``flags`` may hold other options too; only :data:`CACHE_FLAGS` are read.
    Raises :class:`click.BadParameter` for contradictory values.
    """
    if flags["cache_min_ttl"] > flags["cache_max_ttl"]:
        raise click.BadParameter("must not exceed --cache-max-ttl", param_hint="'--cache-min-ttl'")
    return CacheSettings(
        enabled=not flags["no_cache"],
        max_entries=flags["cache_size"],
        max_bytes=flags["cache_max_bytes"],
        min_ttl=flags["cache_min_ttl"],
        max_ttl=flags["cache_max_ttl"],
        max_negative_ttl=flags["cache_max_negative_ttl"],
        serve_stale=not flags["no_serve_stale"],
        serve_stale_max_age=flags["serve_stale_max_age"],
    )
