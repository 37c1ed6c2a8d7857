"""doqproxy: plain DNS over UDP and TCP in, DNS-over-QUIC (RFC 9250) out."""

__version__ = "0.1.0"
