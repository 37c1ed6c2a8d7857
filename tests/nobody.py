"""Running doqproxy as ``nobody`` wherever the checkout lives.

A fresh clone often sits under a 0700 home directory, where ``nobody`` can read
neither the checkout nor its ``.venv``. :func:`nobody_python` finds a Python
command that ``nobody`` can run doqproxy with: the test interpreter itself when
that works, otherwise the base interpreter with a world-readable copy of the
venv's packages and of ``doqproxy/`` in a temporary directory. When even that is
out of reach the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
NOBODY = ["setpriv", "--reuid=nobody", "--regid=65534", "--clear-groups"]
_PROBE = "import doqproxy.cli, doqproxy.forwarder, aioquic, dns.message, click"


@dataclass(frozen=True)
class NobodyPython:
    """A command prefix that runs Python with doqproxy importable by ``nobody``."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    copy: Path | None = None

    def command(self, *args: str) -> list[str]:
        return [*self.argv, "-m", "doqproxy", *args]

    def environ(self) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1", **self.env)


def _works(argv: list[str], env: dict[str, str]) -> bool:
    try:
        result = subprocess.run(
            [*NOBODY, *argv, "-c", _PROBE],
            env=dict(os.environ, **env),
            capture_output=True,
            cwd="/",
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _readable_copy() -> Path:
    root = Path(tempfile.mkdtemp(prefix="doqproxy-nobody-"))
    site = root / "site"
    purelib = Path(sysconfig.get_paths()["purelib"])
    shutil.copytree(
        purelib,
        site,
        symlinks=True,
        ignore=shutil.ignore_patterns("__editable__*", "doqproxy*", "__pycache__"),
    )
    shutil.copytree(
        CHECKOUT / "doqproxy", site / "doqproxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o755)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o644 | (os.stat(path).st_mode & 0o111))
    return root


def find_nobody_python() -> NobodyPython:
    """The Python command for ``nobody``, or :func:`pytest.skip` with the reason."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    if _works([sys.executable], {}):
        return NobodyPython((sys.executable,))
    base = getattr(sys, "_base_executable", None) or sys.executable
    copy = _readable_copy()
    env = {"PYTHONPATH": str(copy / "site"), "PYTHONNOUSERSITE": "1"}
    if _works([base], env):
        return NobodyPython((base,), env, copy)
    shutil.rmtree(copy, ignore_errors=True)
    pytest.skip(
        f"nobody cannot run doqproxy: neither {sys.executable} nor {base} with a readable "
        "copy of the packages is usable by nobody (is the Python installation itself "
        "under a private directory?)"
    )
