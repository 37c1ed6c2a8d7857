"""The ``doqproxy`` command line. Each sub-command lives in a sibling module."""

from __future__ import annotations

import click

from .check_config import check_config
from .forward import forward
from .query import query
from .serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="doqproxy")
def main() -> None:
    """A local DNS stub proxy that forwards plain DNS over DNS-over-QUIC (RFC 9250)."""


main.add_command(forward)
main.add_command(check_config)
main.add_command(query)
main.add_command(serve)
