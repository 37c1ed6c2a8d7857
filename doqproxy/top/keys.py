"""Single keys from the terminal without Enter (cbreak), restored however the view ends."""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from types import TracebackType
from typing import IO, Any


class Keys:
    """A context manager: cbreak mode on a terminal ``stream``, the old mode back on exit.

    Signals still work in cbreak mode, so Ctrl-C raises KeyboardInterrupt as usual.
    When ``stream`` is not a terminal, :meth:`wait_for_quit` just waits.
    """

    def __init__(self, stream: IO[Any] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdin
        self.fd: int | None = None
        self._saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        try:
            fd = self.stream.fileno()
        except (OSError, ValueError):
            return self
        if os.isatty(fd):
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd, termios.TCSANOW)
            self.fd = fd
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the terminal back as it was (safe to call twice)."""
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        self.fd = None

    def wait_for_quit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; ``True`` as soon as ``q`` is pressed."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if self.fd is None:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return False
            data = os.read(self.fd, 64)
            if not data:  # the terminal went away
                self.restore()
                continue
            if b"q" in data or b"Q" in data:
                return True
