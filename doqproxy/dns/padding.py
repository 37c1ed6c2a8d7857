"""Re-padding a query that is already in its upstream form (RFC 8467 block padding)."""

from __future__ import annotations

from doqproxy.dns import wire


def repad(message: bytes, block: int | None) -> bytes:
    """``message`` with its Padding option replaced by padding to ``block`` (or none).

    For a query prepared for one upstream and sent to another: plain DNS gets no
    padding (RFC 8467 pads encrypted transports only).
    """
    question = wire.parse_question(message)
    edns = question.edns
    if edns is None:
        return message  # the resolver adds OPT whenever it pads, so nothing to strip
    options = [opt for opt in edns.options if opt[0] != wire.OPTION_PADDING]
    if block:
        base = len(message) - (edns.end - edns.start) + 11 + sum(4 + len(v) for _, v in options)
        options.append(wire.padding_option(base, block))
    opt = wire.encode_opt(edns.payload, options, flags=edns.flags, version=edns.version)
    return wire.replace_opt(message, edns, opt)
