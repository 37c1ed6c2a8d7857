"""Unit tests for doqproxy.upstream.tickets (no sockets)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import pytest

from doqproxy.upstream import engine
from doqproxy.upstream.tickets import (
    TicketFile,
    default_state_dir,
    ticket_from_json,
    ticket_to_json,
)


def ticket(label: bytes, hours: float = 1.0) -> Any:
    """A ticket of the selected engine's type (qh3 keeps its dates naive UTC)."""
    classes = engine.get()
    now = datetime.datetime.now(datetime.UTC)
    if classes.NAIVE_TICKET_DATES:
        now = now.replace(tzinfo=None)
    return classes.SessionTicket(
        age_add=7,
        cipher_suite=classes.CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(hours=hours),
        not_valid_before=now - datetime.timedelta(minutes=1),
        resumption_secret=b"s" * 32,
        server_name="doq.test",
        ticket=label,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"\x01\x02")],
    )


@pytest.mark.parametrize("quic_engine", engine.installed())
def test_json_round_trip(quic_engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "NAME", quic_engine)
    original = ticket(b"abc")
    assert ticket_from_json(json.loads(json.dumps(ticket_to_json(original)))) == original


def test_each_ticket_is_used_once_and_expired_ones_are_skipped(tmp_path: Path) -> None:
    store = TicketFile(tmp_path)
    store.add("k", ticket(b"old", hours=-1))
    store.add("k", ticket(b"one"))
    store.add("k", ticket(b"two"))
    assert store.count("k") == 2
    assert store.take("k").ticket == b"two"  # type: ignore[union-attr]
    assert store.take("k").ticket == b"one"  # type: ignore[union-attr]
    assert store.take("k") is None


def test_saved_file_reloads_without_expired_tickets(tmp_path: Path) -> None:
    store = TicketFile(tmp_path)
    store.add("k", ticket(b"good"))
    store.add("k", ticket(b"expired", hours=-1))
    store.set_token("k", b"token")
    store.save()
    again = TicketFile(tmp_path)
    assert again.count("k") == 1
    assert again.token("k") == b"token"
    assert os.stat(tmp_path / "tickets.json").st_mode & 0o777 == 0o600


def test_restore_puts_an_unsent_ticket_back_without_writing(tmp_path: Path) -> None:
    store = TicketFile(tmp_path)
    store.add("k", ticket(b"t"))
    mtime = (tmp_path / "tickets.json").stat().st_mtime_ns
    taken = store.take("k")
    assert taken is not None
    store.restore("k", taken)
    assert store.count("k") == 1
    assert (tmp_path / "tickets.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/private/doqproxy:/other"}, 0, "/var/lib/private/doqproxy"),
        ({}, 0, "/var/lib/doqproxy"),
        ({"XDG_STATE_HOME": "/home/u/.state"}, 1000, "/home/u/.state/doqproxy"),
    ],
)
def test_default_state_dir(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], euid: int, expected: str
) -> None:
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert default_state_dir() == Path(expected)


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000, b'{"version": 1, "tickets": {"k": [{"age_add": Infinity}]}}', b"\xff\xfe"],
)
def test_hostile_files_are_ignored(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tickets.json"
    path.write_bytes(content)
    path.chmod(0o600)
    assert TicketFile(tmp_path).count("k") == 0


def test_a_leftover_temp_file_does_not_lend_its_mode(tmp_path: Path) -> None:
    leftover = tmp_path / f".tickets.json.{os.getpid()}.tmp"
    leftover.write_text("old")
    leftover.chmod(0o644)
    store = TicketFile(tmp_path)
    store.add("k", ticket(b"t"))
    assert (tmp_path / "tickets.json").stat().st_mode & 0o777 == 0o600
    assert TicketFile(tmp_path).count("k") == 1
