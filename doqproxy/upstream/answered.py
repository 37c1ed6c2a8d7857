"""Telling the query log which upstream answered, through wrappers that are not groups.

The group records its member in :data:`~doqproxy.upstream.group.answered_by`; a
router or fallback wrapper records its own choice only when nothing below it did.
"""

from __future__ import annotations

from doqproxy.upstream.group import answered_by


def mark() -> int:
    """How many names are recorded so far for this query (0 when nobody listens)."""
    slot = answered_by.get()
    return len(slot) if slot is not None else 0


def note(name: str, since: int) -> None:
    """Record ``name`` unless something was recorded after :func:`mark` returned ``since``."""
    slot = answered_by.get()
    if slot is not None and len(slot) == since:
        slot.append(name)
