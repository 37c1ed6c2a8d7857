"""Configuration sources for ``doqproxy forward``: command line, environment, TOML file.

Every option of the command is also a key in the file (spelled like the long
flag without the dashes: ``--tls-ca-file`` is ``tls-ca-file``) and an
environment variable (``DOQPROXY_TLS_CA_FILE``). The keys and their types come
from the click parameters themselves, so a new flag is a new key with no
further work. Precedence is click's own: command line, then environment, then
the file (as the context's ``default_map``), then the built-in defaults.

:class:`ConfigCommand` adds ``--config`` to a command and remembers the raw
arguments, so that SIGHUP (:func:`reloader`) and ``doqproxy check-config``
(:func:`parse`) can build the settings again exactly as at start-up. The
command's body hands its finished settings to :func:`deliver` before it does
anything with side effects; when a caller asked for them, it stops there.
"""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Callable
from typing import Any, BinaryIO

import click
from click.core import ParameterSource

from doqproxy.upstream.spec import table_to_text

DEFAULT_PATH = "/etc/doqproxy/doqproxy.toml"
ENV_PREFIX = "DOQPROXY"
_ARGV = "doqproxy.argv"
_PATH = "doqproxy.config_path"
_SINK = "doqproxy.settings_sink"


class ConfigError(click.ClickException):
    """The configuration file is unusable; the message names the file and the key."""


def key_of(param: click.Parameter) -> str:
    return (param.name or "").replace("_", "-")


def file_params(command: click.Command) -> dict[str, click.Option]:
    """The options a file may set, by key."""
    return {
        key_of(p): p
        for p in command.params
        if isinstance(p, click.Option) and p.expose_value and p.name not in ("help", "config")
    }


def _expected(param: click.Option) -> tuple[tuple[type, ...], str]:
    if param.multiple:
        return (list,), "a list of strings"
    if param.count:
        return (int,), "an integer"
    if param.is_flag:
        return (bool,), "true or false"
    kind = param.type
    if isinstance(kind, click.types.IntParamType):
        return (int,), "an integer"
    if isinstance(kind, click.types.FloatParamType):
        return (int, float), "a number"
    return (str,), "a string"


def _toml_type(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)  # fmt: skip


def _open_config(path: str) -> BinaryIO:
    """``path`` opened for reading, refused if it is a FIFO or a socket: opening a
    FIFO waits for a writer, which would stall a SIGHUP reload's event loop."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise ConfigError(f"{path}: not a regular file (a FIFO or a socket)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str, command: click.Command, ctx: click.Context) -> dict[str, Any]:
    """Validated values from ``path``, by parameter name (raises :class:`ConfigError`)."""
    try:
        with _open_config(path) as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give --config PATH, or create it)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # found by fuzz/targets.py
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 at byte {exc.start}") from None
    raw = _flatten_upstream(path, raw)
    raw = _flatten_routes(path, raw)
    params = file_params(command)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        param = params.get(key)
        if param is None:
            raise ConfigError(f"{path}: unknown key {key!r}{_suggest(key, params)}")
        types, wanted = _expected(param)
        if param.multiple and isinstance(value, str):
            value = [value]  # one upstream = "..." is a list of one
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(
                f"{path}: {key} must be {wanted}, not a {_toml_type(value)} ({value!r})"
            )
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: {key} must be a list of strings")
        try:
            values[str(param.name)] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise ConfigError(f"{path}: {key} = {value!r}: {exc.message}") from None
    return values


def _flatten_upstream(path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``[[upstream]]`` tables become entries of the ``upstream`` list, each
    ``url?key=value...`` (see :mod:`doqproxy.upstream.spec`)."""
    tables = raw.get("upstream")
    if not isinstance(tables, list) or not any(isinstance(t, dict) for t in tables):
        return raw
    flat = {k: v for k, v in raw.items() if k != "upstream"}
    texts = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: upstream mixes [[upstream]] tables and strings")
        table = dict(table)
        _per_host_keys(path, table, flat)
        try:
            texts.append(table_to_text(table))
        except ValueError as exc:
            raise ConfigError(f"{path}: [[upstream]] number {number}: {exc}") from None
    return {**flat, "upstream": texts}


def _per_host_keys(path: str, table: dict[str, Any], flat: dict[str, Any]) -> None:
    """``addresses`` and ``tls-pin-sha256`` in an ``[[upstream]]`` table become
    ``upstream-address`` / ``tls-pin-sha256`` entries for the table's host."""
    from doqproxy.cli.route_options import per_host_entries

    for key, flat_key in (("addresses", "upstream-address"), ("tls-pin-sha256", "tls-pin-sha256")):
        if key in table:
            entry = per_host_entries(path, key, table.get("url"), table.pop(key))
            existing = flat.get(flat_key, [])
            flat[flat_key] = [*existing, entry] if isinstance(existing, list) else existing


def _flatten_routes(path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``[[route]]`` tables become ``route`` entries (see cli/route_options.py)."""
    from doqproxy.cli.route_options import flatten_route_tables

    return flatten_route_tables(path, raw)


def _suggest(key: str, params: dict[str, click.Option]) -> str:
    close = difflib.get_close_matches(key.replace("_", "-"), list(params), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return hint + " (doqproxy check-config prints every key)"


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    path = value
    if path is None and os.path.exists(DEFAULT_PATH):
        path = DEFAULT_PATH
    ctx.meta[_PATH] = path
    if path is None or ctx.resilient_parsing:
        return
    values = read_file(path, ctx.command, ctx)
    ctx.default_map = {**(ctx.default_map or {}), **values}


class ConfigCommand(click.Command):
    """A click command with ``--config``, DOQPROXY_* variables and re-parsing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = dict(kwargs.pop("context_settings", None) or {})
        settings.setdefault("auto_envvar_prefix", ENV_PREFIX)
        kwargs["context_settings"] = settings
        super().__init__(*args, **kwargs)
        self.params.insert(
            0,
            click.Option(
                ["--config"],
                metavar="PATH",
                is_eager=True,
                expose_value=False,
                callback=_load_config,
                help=f"TOML configuration file. Default: {DEFAULT_PATH} if it exists.",
            ),
        )

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)
        try:
            return super().parse_args(ctx, args)
        except click.MissingParameter as exc:
            raise click.UsageError(_missing(ctx, exc.param), ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            hint = "" if isinstance(exc, click.UsageError) else _origin_hint(ctx, exc.message)
            if not hint:
                raise
            raise click.ClickException(exc.message + hint) from None


def _missing(ctx: click.Context, param: click.Parameter | None) -> str:
    if param is None or not isinstance(param, click.Option):
        return "a required option is missing"
    flag = max(param.opts, key=len)
    env = f"{ENV_PREFIX}_{(param.name or '').upper()}"
    where = ctx.meta.get(_PATH) or DEFAULT_PATH
    return (
        f"missing {flag}: give it on the command line, as {env}, or as {key_of(param)} in {where}"
    )


def _origin_hint(ctx: click.Context, message: str) -> str:
    """Say where a bad value came from when it was not the command line."""
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if value in (None, (), False) or source not in (
            ParameterSource.DEFAULT_MAP,
            ParameterSource.ENVIRONMENT,
        ):
            continue
        texts = [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
        if any(text and text in message for text in texts):
            if source is ParameterSource.ENVIRONMENT:
                return f" (from {ENV_PREFIX}_{name.upper()})"
            return f" (from {name.replace('_', '-')} in {ctx.meta.get(_PATH)})"
    return ""


def deliver(settings: object) -> bool:
    """Called by the command body once its settings are complete: ``True`` means
    somebody (check-config, a reload) only wanted the settings, so stop here."""
    ctx = click.get_current_context(silent=True)
    sink = ctx.meta.get(_SINK) if ctx is not None else None
    if sink is None:
        return False
    sink.append(settings)
    return True


def parse(command: click.Command, args: list[str]) -> tuple[Any, click.Context]:
    """Run ``command``'s parsing and validation on ``args`` without running it."""
    ctx = command.make_context(command.name, list(args))
    sink: list[Any] = []
    ctx.meta[_SINK] = sink
    with ctx:
        command.invoke(ctx)
    if not sink:
        raise click.ClickException("the command did not produce settings")
    return sink[0], ctx


def reloader() -> Callable[[], Any] | None:
    """For SIGHUP: a function that builds the settings again from the same arguments
    (the file and the environment are read afresh)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or _ARGV not in ctx.meta:
        return None
    command, args = ctx.command, list(ctx.meta[_ARGV])

    def load() -> Any:
        try:
            return parse(command, args)[0]
        except click.ClickException as exc:
            raise ValueError(exc.format_message()) from None

    return load


def effective(ctx: click.Context) -> str:
    """The values in force, as TOML, each with where it came from."""
    lines = [f"# doqproxy {ctx.command.name}: effective configuration"]
    path = ctx.meta.get(_PATH)
    lines.append(f"# config file: {path or 'none'}")
    for key, param in file_params(ctx.command).items():
        name = str(param.name)
        value = ctx.params.get(name)
        source = ctx.get_parameter_source(name)
        origin = {
            ParameterSource.COMMANDLINE: "command line",
            ParameterSource.ENVIRONMENT: f"{ENV_PREFIX}_{name.upper()}",
            ParameterSource.DEFAULT_MAP: "config file",
        }.get(source or ParameterSource.DEFAULT, "default")
        if value is None:
            lines.append(f"# {key} is not set")
            continue
        lines.append(f"{key} = {_toml(value)}  # {origin}")
    return "\n".join(lines)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
