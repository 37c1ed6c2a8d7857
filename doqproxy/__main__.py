"""``python -m doqproxy`` and the ``doqproxy`` command."""

import sys

from doqproxy.ops import early


def run() -> None:
    if early.is_forward(sys.argv[1:]):
        early.hold_sighup()  # before the imports below, which take a while
    from doqproxy.cli import main

    main()


if __name__ == "__main__":
    run()
