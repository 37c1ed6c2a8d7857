"""Client session tickets and address-validation tokens, kept across restarts.

With a saved ticket, the first query after a restart goes out as 0-RTT early
data instead of waiting a round trip for the handshake. The file is JSON (bytes
as base64, dates as ISO 8601), never pickle. It holds ``resumption_secret``,
which is enough to derive the 0-RTT keys, so it is written mode 0600 through a
temporary file, fsync and rename, and a file that is owned by another user or
that anyone else may read is ignored.

Entries are keyed by upstream (server name, address, port). Each ticket is used
once (reusing one gets a full handshake), several are kept, and expired ones
are dropped. A damaged or unreadable file costs a full handshake and a warning,
never a failure to start.

A server may send tickets in a flood (one review saw 2,000 in a burst, each then
costing an fsync on the event loop). So at most :data:`KEEP_PER_UPSTREAM` are
kept per upstream and :data:`MAX_UPSTREAMS` upstreams per file, and inside an
event loop a new ticket only schedules a save :data:`SAVE_DELAY` seconds later;
the owner calls :meth:`TicketFile.save` at shutdown.

The file is opened with O_NOFOLLOW|O_NONBLOCK and must be a regular file: a FIFO
planted there would otherwise block start-up forever. :func:`check_state_dir`
refuses a directory that another user owns or that others may write to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from doqproxy.upstream import engine

log = logging.getLogger(__name__)

FILE_NAME = "tickets.json"
FORMAT_VERSION = 1
KEEP_PER_UPSTREAM = 8
MAX_UPSTREAMS = 64
"""Upstream keys kept from a loaded file; a forwarder has a handful."""
SAVE_DELAY = 5.0
"""Seconds between a new ticket and the save it triggers (inside an event loop)."""
MAX_FILE_SIZE = 1 << 20
"""A bigger tickets.json is not ours: 64 upstreams x 8 tickets is about 300 KB."""


class StateDirError(Exception):
    """The state directory is not safe to use; the message says why in one line."""


def check_state_dir(directory: Path) -> None:
    """Raise :class:`StateDirError` unless ``directory`` is missing or is a directory
    owned by us (the effective uid) that no other user may write to."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return  # created mode 0700 with the first save
    except OSError as exc:
        raise StateDirError(f"state dir {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state dir {directory}: not a directory")
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"state dir {directory}: owned by uid {info.st_uid}, not by us (uid {os.geteuid()}); "
            "use a directory of our own (systemd: StateDirectory=)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateDirError(
            f"state dir {directory}: others may write to it (mode {info.st_mode & 0o7777:o}); "
            f"chmod go-w {directory}, or use a directory of our own"
        )


def upstream_key(server_name: str, host: str, port: int) -> str:
    return f"{server_name}|{host}|{port}"


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd), else /var/lib/doqproxy for root, else XDG state."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/doqproxy")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(xdg) / "doqproxy"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _aware(moment: datetime.datetime) -> datetime.datetime:
    """qh3 keeps ticket dates as naive UTC, aioquic as aware UTC: compare them aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


def ticket_to_json(ticket: Any) -> dict[str, Any]:
    return {
        "age_add": ticket.age_add,
        "cipher_suite": int(ticket.cipher_suite),
        "not_valid_after": _aware(ticket.not_valid_after).isoformat(),
        "not_valid_before": _aware(ticket.not_valid_before).isoformat(),
        "resumption_secret": _b64(ticket.resumption_secret),
        "server_name": ticket.server_name,
        "ticket": _b64(ticket.ticket),
        "max_early_data_size": ticket.max_early_data_size,
        "other_extensions": [[kind, _b64(value)] for kind, value in ticket.other_extensions],
    }


def ticket_from_json(data: dict[str, Any]) -> Any:
    classes = engine.get()  # the selected engine's ticket type (aioquic's and qh3's match)

    def when(text: str) -> datetime.datetime:
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise ValueError("ticket date without a time zone")
        if classes.NAIVE_TICKET_DATES:
            return moment.astimezone(datetime.UTC).replace(tzinfo=None)
        return moment

    max_early = data.get("max_early_data_size")
    return classes.SessionTicket(
        age_add=int(data["age_add"]),
        cipher_suite=classes.CipherSuite(int(data["cipher_suite"])),
        not_valid_after=when(data["not_valid_after"]),
        not_valid_before=when(data["not_valid_before"]),
        resumption_secret=base64.b64decode(data["resumption_secret"], validate=True),
        server_name=str(data["server_name"]),
        ticket=base64.b64decode(data["ticket"], validate=True),
        max_early_data_size=None if max_early is None else int(max_early),
        other_extensions=[
            (int(kind), base64.b64decode(value, validate=True))
            for kind, value in data["other_extensions"]
        ],
    )


class TicketFile:
    """Tickets and NEW_TOKEN tokens per upstream, optionally backed by a file.

    With ``directory=None`` it only keeps them in memory (resumption still works
    within one process). :meth:`add` saves at once outside an event loop, and
    ``save_delay`` seconds later inside one; :meth:`take` marks the store dirty
    and :meth:`save` writes it (call it at shutdown).
    """

    def __init__(
        self,
        directory: Path | None,
        keep: int = KEEP_PER_UPSTREAM,
        *,
        save_delay: float = SAVE_DELAY,
    ) -> None:
        self.path = None if directory is None else directory / FILE_NAME
        self.keep = keep
        self.save_delay = save_delay
        self._tickets: dict[str, list[Any]] = {}
        self._tokens: dict[str, bytes] = {}
        self._dirty = False
        self._pending: asyncio.TimerHandle | None = None
        self.save_errors = 0
        self.saves = 0
        """Files written; a ticket storm must not make this grow with it."""
        if self.path is not None:
            self._load(self.path)

    # --- tickets and tokens --------------------------------------------------

    def add(self, key: str, ticket: Any) -> None:
        tickets = self._tickets.setdefault(key, [])
        tickets.append(ticket)
        del tickets[: -self.keep]
        self._dirty = True
        self._save_soon()

    def take(self, key: str) -> Any:
        """The newest valid ticket for ``key``, removed so it is used only once."""
        tickets = self._tickets.get(key, [])
        while tickets:
            ticket = tickets.pop()
            self._dirty = True
            if ticket.is_valid:
                return ticket
        return None

    def restore(self, key: str, ticket: Any) -> None:
        """Put back a ticket that was taken but never sent (saved with the next write)."""
        tickets = self._tickets.setdefault(key, [])
        tickets.append(ticket)
        del tickets[: -self.keep]
        self._dirty = True

    def count(self, key: str) -> int:
        return sum(ticket.is_valid for ticket in self._tickets.get(key, []))

    def set_token(self, key: str, token: bytes) -> None:
        self._tokens[key] = token
        self._dirty = True

    def token(self, key: str) -> bytes:
        return self._tokens.get(key, b"")

    # --- the file -------------------------------------------------------------

    def _save_soon(self) -> None:
        if self.path is None or self._pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        self._pending = loop.call_later(self.save_delay, self.save)

    def _load(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("ignoring %s (the next connection does a full handshake): %s", path, exc)
            return
        try:
            with open(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    log.warning("ignoring %s: not a regular file", path)
                    return
                if info.st_size > MAX_FILE_SIZE:
                    log.warning("ignoring %s: %d bytes, too big", path, info.st_size)
                    return
                if info.st_uid != os.geteuid():
                    log.warning(
                        "ignoring %s: owned by uid %d, not by us (uid %d)",
                        path, info.st_uid, os.geteuid(),
                    )  # fmt: skip
                    return
                if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    mode = info.st_mode & 0o777
                    log.warning("ignoring %s: readable by others (mode %o)", path, mode)
                    return
                raw = handle.read(MAX_FILE_SIZE + 1)
            self.load_bytes(raw)
        except Exception as exc:  # whatever is in the file: a warning, never a failed start
            self._tickets.clear()
            self._tokens.clear()
            log.warning("ignoring %s (the next connection does a full handshake): %s", path, exc)

    def load_bytes(self, raw: bytes) -> None:
        """Add the tickets and tokens of a file's content.

        Raises :class:`ValueError` (only) when the content is not a tickets file;
        what was added before the error is kept, so callers clear on failure.
        """
        try:
            self._parse(raw)
        except (KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            raise ValueError(f"not a tickets file: {type(exc).__name__}: {exc}") from None

    def _parse(self, raw: bytes) -> None:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError("not a version 1 tickets file")
        for key, items in list(data["tickets"].items())[-MAX_UPSTREAMS:]:
            tickets = [ticket_from_json(item) for item in items[-self.keep :]]
            self._tickets[str(key)] = [t for t in tickets if t.is_valid]
        for key, token in list(data.get("tokens", {}).items())[-MAX_UPSTREAMS:]:
            self._tokens[str(key)] = base64.b64decode(token, validate=True)

    def save(self) -> None:
        """Write the file atomically if anything changed; errors are logged, not raised."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self.path is None or not self._dirty:
            return
        now = datetime.datetime.now(datetime.UTC)
        data = {
            "version": FORMAT_VERSION,
            "tickets": {
                key: [ticket_to_json(t) for t in items if _aware(t.not_valid_after) > now]
                for key, items in self._tickets.items()
                if items
            },
            "tokens": {key: _b64(token) for key, token in self._tokens.items()},
        }
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # a leftover must not lend us its owner or mode
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            self.saves += 1
        except OSError as exc:
            self.save_errors += 1
            log.warning("cannot save session tickets to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._dirty = False
