"""SPKI pinning (``tls-pin-sha256``): the base64 SHA-256 of a certificate's
SubjectPublicKeyInfo, the same value as HPKP's ``pin-sha256`` and
``openssl x509 -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64``.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from doqproxy.dns.ede import Ede
from doqproxy.upstream.base import UpstreamError


class PinMismatch(UpstreamError):
    """The server's public key is not one of the pinned ones."""

    def __init__(self, server: str, found: str) -> None:
        super().__init__(
            f"TLS public key pin mismatch for {server} (server key sha256 {found})",
            Ede.NETWORK_ERROR,
        )


def spki_sha256(certificate: x509.Certificate | bytes) -> str:
    """The pin of a certificate (object or DER)."""
    if isinstance(certificate, bytes):
        certificate = x509.load_der_x509_certificate(certificate)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def check_pin(
    server: str, certificate: x509.Certificate | bytes | None, pins: tuple[str, ...]
) -> None:
    """Raise :class:`PinMismatch` unless ``certificate`` matches one of ``pins`` (if any)."""
    if not pins:
        return
    if certificate is None:
        raise PinMismatch(server, "none: no certificate")
    found = spki_sha256(certificate)
    if found not in pins:
        raise PinMismatch(server, found)
