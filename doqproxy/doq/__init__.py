"""DNS over QUIC (RFC 9250) itself: stream framing and the server's admission rules (pure)."""
