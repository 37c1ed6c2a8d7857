"""The ``doqproxy`` command line. Each sub-command lives in a sibling module.

Sub-commands are imported only when they run, so ``doqproxy forward`` does not
carry ``serve``'s zone parser or ``query``'s printer in memory.
"""

from __future__ import annotations

import importlib

import click

_COMMANDS = {
    "forward": ("forward", "forward"),
    "serve": ("serve", "serve"),
    "query": ("query", "query"),
    "check-config": ("check_config", "check_config"),
    "top": ("top", "top"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="doqproxy")
def main() -> None:
    """A local DNS stub proxy that forwards plain DNS over DNS-over-QUIC (RFC 9250)."""
