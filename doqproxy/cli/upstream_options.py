"""The upstream list, strategy and hedging options of ``doqproxy forward``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from doqproxy.cli.types import FiniteFloatRange
from doqproxy.net.addresses import AddressError
from doqproxy.net.stamps import StampError
from doqproxy.upstream.selection import SelectionSettings, Strategy
from doqproxy.upstream.spec import UpstreamSpec, parse_spec

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = SelectionSettings()

UPSTREAM_FLAGS = (
    "upstream",
    "upstream_strategy",
    "parallel_upstreams",
    "hedge_delay_min",
    "hedge_delay_max",
    "no_hedging",
)
"""The keyword arguments :func:`upstream_options` adds to a command."""


def upstream_options(command: F) -> F:
    """Add ``-u`` (repeatable) and the strategy and hedging options to a click command."""
    options = [
        click.option(
            "-u",
            "--upstream",
            multiple=True,
            required=True,
            metavar="quic://HOST[:PORT][?OPTIONS]",
            help="A DoQ server; repeatable. HOST is a name or an IP literal, the port defaults "
            "to 853. Per-upstream options after '?': tls-server-name=NAME, tls-ca-file=PATH.",
        ),
        click.option(
            "--upstream-strategy",
            type=click.Choice([s.value for s in Strategy]),
            default=_DEFAULTS.strategy.value,
            show_default=True,
            help="With several upstreams: fastest (smoothed RTT), failover (the order given), "
            "parallel (race the best N), round-robin.",
        ),
        click.option(
            "--parallel-upstreams",
            type=click.IntRange(min=2, max=16),
            default=_DEFAULTS.parallel,
            show_default=True,
            help="Upstreams raced at once by --upstream-strategy parallel.",
        ),
        click.option(
            "--hedge-delay-min",
            type=FiniteFloatRange(min=0.001, max=10.0),
            default=_DEFAULTS.hedge_min,
            show_default=True,
            metavar="SECONDS",
            help="Hedging: ask the next upstream too after 3 x the chosen one's smoothed RTT, "
            "but never sooner than this...",
        ),
        click.option(
            "--hedge-delay-max",
            type=FiniteFloatRange(min=0.001, max=10.0),
            default=_DEFAULTS.hedge_max,
            show_default=True,
            metavar="SECONDS",
            help="...and never later than this.",
        ),
        click.option(
            "--no-hedging",
            is_flag=True,
            help="Never ask a second upstream while the first may still answer.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def upstream_settings(
    params: dict[str, Any], check_ca_file: Callable[[str], None]
) -> tuple[tuple[UpstreamSpec, ...], SelectionSettings]:
    """The upstreams and how to use them, from the options' values (raises ClickException)."""
    specs: list[UpstreamSpec] = []
    seen: dict[str, str] = {}
    for text in params["upstream"]:
        try:
            spec = parse_spec(text)
        except (AddressError, StampError) as exc:
            raise click.ClickException(str(exc)) from None
        key = str(spec.url)
        if key in seen:
            raise click.ClickException(
                f"upstream {text!r} is given twice (also as {seen[key]!r}); give each once"
            )
        seen[key] = text
        if spec.tls_ca_file is not None:
            check_ca_file(spec.tls_ca_file)
        specs.append(spec)
    low, high = params["hedge_delay_min"], params["hedge_delay_max"]
    if low > high:
        raise click.ClickException(
            f"--hedge-delay-min {low:g} is more than --hedge-delay-max {high:g}"
        )
    selection = SelectionSettings(
        strategy=Strategy(params["upstream_strategy"]),
        parallel=params["parallel_upstreams"],
        hedge=not params["no_hedging"],
        hedge_min=low,
        hedge_max=high,
    )
    return tuple(specs), selection
