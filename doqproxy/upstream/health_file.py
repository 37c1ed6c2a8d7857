"""Each upstream's smoothed RTT and health, kept across restarts (``upstreams.json``).

With it, ``fastest`` picks the right upstream from the first query after a
restart, and an upstream that was in backoff stays skipped for the rest of its
skip time. The file lives next to ``tickets.json`` in the state directory; it
is JSON, written mode 0600 through a temporary file, fsync and rename, and
read with O_NOFOLLOW. Anything wrong with it (garbage, a symlink, a FIFO, a
foreign owner) costs a warning and the defaults, never a failed start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from doqproxy.upstream.health import Health, State

log = logging.getLogger(__name__)

FILE_NAME = "upstreams.json"
FORMAT_VERSION = 1
MAX_BYTES = 1 << 20


class Named(Protocol):
    """What the file needs of a group member."""

    @property
    def name(self) -> str: ...

    health: Health


SRTT_CHANGE = 0.1
"""A relative SRTT change worth writing down at once."""
REFRESH_INTERVAL = 600.0
"""Seconds after which smaller SRTT drift is written too."""


def _significant(old: dict[str, dict[str, Any]] | None, new: dict[str, dict[str, Any]]) -> bool:
    """Whether ``new`` differs from what was written in a way ``fastest`` would notice."""
    if old is None or old.keys() != new.keys():
        return True
    for name, record in new.items():
        before = old[name]
        if any(record[key] != before[key] for key in ("state", "backoffs", "last_error")):
            return True
        a, b = before["srtt"], record["srtt"]
        if (a is None) != (b is None):
            return True
        if a is not None and b is not None and abs(b - a) > SRTT_CHANGE * a + 0.0005:
            return True
    return False


class HealthFile:
    """Reads once at start (:meth:`restore`), writes on :meth:`save` when changed."""

    def __init__(self, directory: Path | None) -> None:
        self.path = None if directory is None else directory / FILE_NAME
        self.save_errors = 0
        self._records: dict[str, dict[str, Any]] = {}
        self._last_written: str | None = None
        self._last_records: dict[str, dict[str, Any]] | None = None
        self._written_at = -math.inf
        if self.path is not None:
            self._records = self._load(self.path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def restore(self, name: str, health: Health, now: float) -> None:
        """Put what the file says about upstream ``name`` into ``health``."""
        record = self._records.get(name)
        if record is None:
            return
        try:
            srtt = record.get("srtt")
            if srtt is not None:
                srtt = float(srtt)
                if not math.isfinite(srtt) or not 0 <= srtt <= 60:
                    raise ValueError(f"srtt {srtt!r} out of range")
            state = State(record.get("state", "up"))
            backoffs = int(record.get("backoffs", 0))
            retry_in = float(record.get("retry_in", 0.0)) - (time.time() - float(record["saved"]))
            last_error = str(record.get("last_error", ""))[:200]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            log.warning("%s: ignoring the entry for %s: %s", self.path, name, exc)
            return
        health.srtt = srtt
        health.unmeasured = 1 << 30  # measured before the restart: refresh on the first query
        health.backoffs = max(0, min(backoffs, 30))
        health.last_error = last_error
        if state is not State.UP:
            health.state = State.BACKOFF
            cap = health.settings.backoff_cap
            health.retry_at = now + max(0.0, min(retry_in, cap))

    def save(self, members: Sequence[Named], now: float, *, force: bool = False) -> None:
        """Write the file if something worth keeping changed; errors are logged, not raised.

        The SRTT moves with every answer, so an SRTT change alone is written only when
        it is more than :data:`SRTT_CHANGE` of the last written value, or after
        :data:`REFRESH_INTERVAL`: a router's flash is not rewritten every few seconds.
        A change of state, backoff or error is written at once, and ``force`` (at
        shutdown) writes whatever changed.
        """
        if self.path is None:
            return
        records: dict[str, dict[str, Any]] = {}
        for member in members:
            health = member.health
            records[member.name] = {
                "srtt": None if health.srtt is None else round(health.srtt, 6),
                "state": str(health.state),
                "backoffs": health.backoffs,
                "retry_in": round(max(0.0, health.retry_at - now), 3)
                if health.state is not State.UP
                else 0.0,
                "last_error": health.last_error[:200],
            }
        body = json.dumps(records, sort_keys=True)
        if body == self._last_written:
            return
        if (
            not force
            and now - self._written_at < REFRESH_INTERVAL
            and not _significant(self._last_records, records)
        ):
            return
        saved = time.time()
        for record in records.values():
            record["saved"] = saved
        data = {"version": FORMAT_VERSION, "saved": saved, "upstreams": records}
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            self.save_errors += 1
            log.warning("cannot save upstream health to %s: %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._last_written = body
        self._last_records = records
        self._written_at = now

    @staticmethod
    def _load(path: Path) -> dict[str, dict[str, Any]]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("ignoring %s (starting without upstream RTTs): %s", path, exc.strerror)
            return {}
        try:
            with os.fdopen(fd, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise ValueError("not a regular file")
                if info.st_uid != os.geteuid():
                    raise ValueError(f"owned by uid {info.st_uid}, not by us")
                if info.st_size > MAX_BYTES:
                    raise ValueError(f"larger than {MAX_BYTES} bytes")
                raw = json.loads(handle.read(MAX_BYTES))
            if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
                raise ValueError("unknown format version")
            upstreams = raw["upstreams"]
            if not isinstance(upstreams, dict):
                raise ValueError("'upstreams' is not an object")
            return {str(k): v for k, v in upstreams.items() if isinstance(v, dict)}
        except Exception as exc:  # whatever is in the file: a warning, never a failed start
            log.warning("ignoring %s (starting without upstream RTTs): %s", path, exc)
            return {}
