"""Extended DNS Error codes (RFC 8914)."""

from __future__ import annotations

import enum


class Ede(enum.IntEnum):
    """Extended DNS Error codes (RFC 8914, RFC 9250) that doqproxy sends."""

    OTHER = 0
    STALE_ANSWER = 3
    NOT_READY = 14
    PROHIBITED = 18
    NO_REACHABLE_AUTHORITY = 22
    NETWORK_ERROR = 23
    INVALID_DATA = 24
    TOO_EARLY = 26
