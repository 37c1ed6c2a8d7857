"""Run one fuzz target under atheris: ``python -m fuzz.run_target NAME [libFuzzer flags]``.

The doqproxy modules are instrumented for coverage; the libraries (dnspython,
aioquic, click) are not, so ``cov`` counts edges in our own code.
"""

from __future__ import annotations

import sys


def main() -> None:
    import atheris

    name, flags = sys.argv[1], sys.argv[2:]
    with atheris.instrument_imports(include=["doqproxy"]):
        import doqproxy.cache.policy
        import doqproxy.cli.config
        import doqproxy.cli.forward
        import doqproxy.dns.rewrite
        import doqproxy.dns.validate
        import doqproxy.dns.wire
        import doqproxy.doq.framing
        import doqproxy.upstream.tickets  # noqa: F401
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *flags], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
