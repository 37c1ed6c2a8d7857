"""Review: a DoQ server's CONNECTION_CLOSE reason phrase is the peer's text.

It ends up in the EDE EXTRA-TEXT, the log, ``doqproxy query``'s error line and
the last-error metric, so control characters (terminal escapes, newlines that
forge log lines) must not pass through, and its length is bounded.
"""

from __future__ import annotations

from doqproxy.upstream.doq_connection import describe_close, peer_text


def test_reason_phrase_control_characters_are_escaped() -> None:
    text = describe_close(0x1, "bye\x1b]0;owned\x07\n2026-11-30 forged log line\x1b[2J")
    assert "bye" in text and "owned" in text
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text), repr(text)


def test_tls_alert_reason_is_escaped_too() -> None:
    text = describe_close(0x100 + 42, "bad\rcert")
    assert text.startswith("TLS handshake failed (alert 42)")
    assert "\r" not in text


def test_reason_phrase_is_bounded() -> None:
    assert len(describe_close(0x1, "x" * 5000)) < 300


def test_peer_text_for_a_close_seen_while_sending() -> None:
    """qh3 reports a close found while sending with the raw reason phrase."""
    assert peer_text("a\x1b[2Jb\n" + "y" * 500) == "a\\x1b[2Jb\\x0a" + "y" * 113
