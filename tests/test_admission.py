"""doqproxy.doq.admission: which new QUIC connections a server takes on (no sockets)."""

from __future__ import annotations

from doqproxy.doq.admission import Admission, AdmissionLimits, Verdict, client_prefix


def test_prefixes() -> None:
    assert client_prefix("192.0.2.77", 24, 56) == "192.0.2.0/24"
    assert client_prefix("::ffff:192.0.2.77", 24, 56) == "192.0.2.0/24"
    assert client_prefix("2001:db8:1:2ff::1", 24, 56) == "2001:db8:1:200::/56"
    assert client_prefix("fe80::1%eth0", 24, 64) == "fe80::/64"


def test_half_open_handshakes_do_not_count_against_max_connections() -> None:
    admission = Admission(
        AdmissionLimits(max_connections=2, max_handshakes=3, retry_threshold=None)
    )
    for n in range(3):
        assert admission.decide(f"10.0.{n}.1", validated=False)[0] is Verdict.ACCEPT
        admission.opened(f"10.0.{n}.1")
    assert admission.decide("10.0.9.1", validated=False) == (Verdict.REFUSE, "too many handshakes")
    admission.handshake_done()
    admission.handshake_done()
    assert admission.established == 2 and admission.half_open == 1
    assert admission.decide("10.0.9.1", validated=True) == (Verdict.REFUSE, "too many connections")
    admission.closed("10.0.0.1", established=True)
    assert admission.decide("10.0.9.1", validated=False)[0] is Verdict.ACCEPT


def test_retry_past_the_threshold_unless_validated() -> None:
    admission = Admission(AdmissionLimits(max_handshakes=10, retry_threshold=2))
    for n in range(2):
        admission.opened(f"10.0.{n}.1")
    assert admission.decide("10.1.0.1", validated=False) == (Verdict.RETRY, "address not validated")
    assert admission.decide("10.1.0.1", validated=True)[0] is Verdict.ACCEPT
    assert admission.retries == 1
    always = Admission(AdmissionLimits(retry_threshold=0))
    assert always.decide("10.1.0.1", validated=False)[0] is Verdict.RETRY


def test_per_address_and_per_prefix_caps() -> None:
    admission = Admission(
        AdmissionLimits(max_per_address=2, max_per_prefix=3, retry_threshold=None)
    )
    for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        assert admission.decide(host, validated=False)[0] is Verdict.ACCEPT
        admission.opened(host)
    assert admission.decide("10.0.0.1", validated=False)[1] == (
        "too many connections from this address"
    )
    assert admission.decide("10.0.0.3", validated=False)[1] == (
        "too many connections from this network"
    )
    assert admission.decide("10.0.1.1", validated=False)[0] is Verdict.ACCEPT
    admission.closed("10.0.0.2", established=False)
    assert admission.count("10.0.0.2") == (0, 2)
    assert admission.decide("10.0.0.3", validated=False)[0] is Verdict.ACCEPT
    assert admission.refused["too many connections from this network"] == 1
