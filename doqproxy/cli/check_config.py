"""``doqproxy check-config``: validate the configuration and print what is in force."""

from __future__ import annotations

import click

from doqproxy.cli import config
from doqproxy.cli.forward import forward


@click.command("check-config")
@click.option(
    "--config",
    "path",
    metavar="PATH",
    help=f"The file to check. Default: {config.DEFAULT_PATH} if it exists.",
)
def check_config(path: str | None) -> None:
    """Validate the forward configuration (file, DOQPROXY_* variables, defaults) and print
    the effective values with their sources. Exits non-zero on an error.

    \b
    Example:
      doqproxy check-config --config /etc/doqproxy/doqproxy.toml
    """
    args = ["--config", path] if path else []
    try:
        _, ctx = config.parse(forward, args)
    except click.UsageError as exc:
        raise click.ClickException(exc.format_message()) from None
    click.echo(config.effective(ctx))
    click.echo("# configuration OK")
