"""Domain names as lower-case wire bytes, the form every routing lookup uses."""

from __future__ import annotations

from collections.abc import Iterator


class DomainError(ValueError):
    """A domain name that cannot be used; the message says why."""


def to_wire(text: str) -> bytes:
    """``"Corp.Example"`` or ``"corp.example."`` → lower-case wire form; ``"."`` is the root."""
    stripped = text.strip().lower()
    if stripped == ".":
        return b"\x00"
    name = stripped[:-1] if stripped.endswith(".") else stripped
    if not name:
        raise DomainError("empty domain name (the root is '.')")
    labels = name.split(".")
    out = bytearray()
    for label in labels:
        try:
            raw = label.encode("idna") if not label.isascii() else label.encode()
        except UnicodeError:
            raise DomainError(f"domain {text!r}: {label!r} is not a valid name label") from None
        if not raw:
            raise DomainError(f"domain {text!r}: empty label")
        if len(raw) > 63:
            raise DomainError(f"domain {text!r}: label longer than 63 octets")
        out += bytes((len(raw),)) + raw
    out += b"\x00"
    if len(out) > 255:
        raise DomainError(f"domain {text!r}: longer than 255 octets")
    return bytes(out)


def to_text(name: bytes) -> str:
    """Wire form → ``"corp.example."`` (the root is ``"."``)."""
    labels = []
    pos = 0
    while name[pos]:
        length = name[pos]
        labels.append(name[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    return ".".join(labels) + "." if labels else "."


def suffixes(name: bytes) -> Iterator[tuple[int, bytes]]:
    """Each suffix of a wire name at a label boundary with its offset, longest first;
    the root (``b"\\x00"``) comes last."""
    pos = 0
    while True:
        yield pos, name[pos:]
        length = name[pos]
        if not length:
            return
        pos += 1 + length


def is_subdomain(name: bytes, zone: bytes) -> bool:
    """Whether ``name`` is ``zone`` or below it (both lower-case wire form)."""
    if not name.endswith(zone):
        return False
    return any(suffix == zone for _, suffix in suffixes(name))
