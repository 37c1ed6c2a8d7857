"""Session tickets for ``doqproxy query --state-dir``, kept in a JSON file.

A stop-gap until the forwarder's persistent ticket store (issue 4) exists; then
``doqproxy query`` should share that format. Tickets are JSON, never pickle
(bytes as base64, dates as ISO 8601). The file holds ``resumption_secret``,
which is enough to derive 0-RTT keys, so it is written 0600 via a temporary
file and a rename. Each ticket is used once: reusing one gives a full handshake.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from aioquic.tls import CipherSuite, SessionTicket

log = logging.getLogger(__name__)

FILE_NAME = "query-tickets.json"
KEEP = 4


def ticket_to_json(ticket: SessionTicket) -> dict[str, Any]:
    return {
        "age_add": ticket.age_add,
        "cipher_suite": int(ticket.cipher_suite),
        "not_valid_after": ticket.not_valid_after.isoformat(),
        "not_valid_before": ticket.not_valid_before.isoformat(),
        "resumption_secret": base64.b64encode(ticket.resumption_secret).decode(),
        "server_name": ticket.server_name,
        "ticket": base64.b64encode(ticket.ticket).decode(),
        "max_early_data_size": ticket.max_early_data_size,
        "other_extensions": [
            [kind, base64.b64encode(value).decode()] for kind, value in ticket.other_extensions
        ],
    }


def ticket_from_json(data: dict[str, Any]) -> SessionTicket:
    return SessionTicket(
        age_add=int(data["age_add"]),
        cipher_suite=CipherSuite(int(data["cipher_suite"])),
        not_valid_after=datetime.datetime.fromisoformat(data["not_valid_after"]),
        not_valid_before=datetime.datetime.fromisoformat(data["not_valid_before"]),
        resumption_secret=base64.b64decode(data["resumption_secret"]),
        server_name=str(data["server_name"]),
        ticket=base64.b64decode(data["ticket"]),
        max_early_data_size=data.get("max_early_data_size"),
        other_extensions=[
            (int(kind), base64.b64decode(value)) for kind, value in data["other_extensions"]
        ],
    )


class ProbeTicketFile:
    """Tickets per upstream key, loaded from and saved to ``DIR/query-tickets.json``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FILE_NAME
        self._tickets: dict[str, list[SessionTicket]] = {}
        self._dirty = False
        try:
            raw = json.loads(self.path.read_text())
            for key, items in raw.items():
                self._tickets[key] = [ticket_from_json(item) for item in items]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged file costs a full handshake, nothing more.
            log.warning("ignoring %s: %s", self.path, exc)

    def take(self, key: str) -> SessionTicket | None:
        tickets = self._tickets.get(key, [])
        while tickets:
            ticket = tickets.pop()
            self._dirty = True
            if ticket.is_valid:
                return ticket
        return None

    def add(self, key: str, ticket: SessionTicket) -> None:
        tickets = self._tickets.setdefault(key, [])
        tickets.append(ticket)
        del tickets[:-KEEP]
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        data = {key: [ticket_to_json(t) for t in items] for key, items in self._tickets.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._dirty = False
