"""``doqproxy top``: a live view of a running forwarder, read from ``--metrics-listen``."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from types import FrameType

import click

from doqproxy.cli import config
from doqproxy.cli.types import FiniteFloatRange
from doqproxy.top import model, scrape
from doqproxy.top import text as plain

FETCH_TIMEOUT = 3.0
"""Seconds one scrape may take before the forwarder counts as unreachable."""


@click.command()
@click.option(
    "--metrics",
    "url",
    metavar="URL|ADDR:PORT",
    envvar="DOQPROXY_TOP_METRICS",
    show_envvar=True,
    help="The forwarder's metrics endpoint. Default: metrics-listen from the config file "
    f"(or DOQPROXY_METRICS_LISTEN), else {scrape.DEFAULT_URL}.",
)
@click.option(
    "--config",
    "config_path",
    metavar="PATH",
    help=f"The forwarder's TOML file, read for metrics-listen. Default: {config.DEFAULT_PATH}.",
)
@click.option("--once", is_flag=True, help="Print one snapshot as text and exit (takes ~1 s).")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON and exit.")
@click.option(
    "--interval",
    envvar="DOQPROXY_TOP_INTERVAL",
    show_envvar=True,
    type=FiniteFloatRange(min=0.2, max=60),
    default=1.0,
    show_default=True,
    help="Seconds between redraws (and between --once's two scrapes).",
)
def top(
    url: str | None, config_path: str | None, once: bool, as_json: bool, interval: float
) -> None:
    """Show a running forwarder's queries, cache, failures and upstreams, live.

    Rates are differences between two scrapes of the forwarder's metrics, so it
    must run with --metrics-listen. q or Ctrl-C quits. --once and --json print
    one snapshot (two scrapes, --interval apart) and do not need rich.

    \b
    Example:
      doqproxy forward -u quic://dns.adguard-dns.com --metrics-listen 127.0.0.1:9153 &
      doqproxy top
    """
    target = metrics_url(url, config_path)
    monitor = model.Monitor(target)

    def take() -> scrape.Scrape:
        body = scrape.fetch(target, FETCH_TIMEOUT)
        return scrape.parse(body, at=time.monotonic(), wall=time.time())

    if not (once or as_json):
        try:
            from doqproxy.top import view
        except ImportError:
            raise click.ClickException(
                "the live view needs rich: pip install 'doqproxy[top]' "
                "(or use --once / --json, which do not)"
            ) from None
        if not sys.stdout.isatty():
            raise click.ClickException("the live view needs a terminal; use --once or --json")
    try:
        first = monitor.update(_scrape_or_exit(take, target))
        if once or as_json:
            time.sleep(interval)
            snap = monitor.update(_scrape_or_exit(take, target))
            click.echo(json.dumps(snap.to_json(), indent=2) if as_json else plain.render(snap))
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        view.run(monitor, take, first, interval)
    except KeyboardInterrupt:
        pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Unwinds like Ctrl-C, so the terminal is restored on the way out.
    raise KeyboardInterrupt


def _scrape_or_exit(take: Callable[[], scrape.Scrape], target: str) -> scrape.Scrape:
    try:
        return take()
    except scrape.ScrapeError as exc:
        if exc.answered:
            raise click.ClickException(f"{target}: {exc}") from None
        listen = scrape.listen_hint(target)
        raise click.ClickException(
            f"cannot read {target}: {exc}; is the forwarder running with --metrics-listen {listen}?"
        ) from None


def metrics_url(url: str | None, config_path: str | None) -> str:
    """``--metrics``, else forward's own setting (environment, then file), else the default."""
    try:
        if url:
            return scrape.url_for(url)
        listen = os.environ.get(f"{config.ENV_PREFIX}_METRICS_LISTEN") or _from_file(config_path)
        return scrape.url_for(listen) if listen else scrape.DEFAULT_URL
    except scrape.ScrapeError as exc:
        raise click.ClickException(str(exc)) from None


def _from_file(path: str | None) -> str | None:
    if path is None:
        if not os.path.exists(config.DEFAULT_PATH):
            return None
        path = config.DEFAULT_PATH
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise click.ClickException(f"{path}: no such file") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.ClickException(f"{path}: not valid TOML: {exc}") from None
    value = raw.get("metrics-listen")
    if value is not None and not isinstance(value, str):
        raise click.ClickException(f"{path}: metrics-listen must be a string")
    return value
