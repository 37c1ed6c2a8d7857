"""``make bench``: doqproxy measured against Unbound and dnsmasq, in one run, on loopback.

Run it as ``python -m bench`` from the repository root; ``--help`` lists the options.
"""
