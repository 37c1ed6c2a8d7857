"""``--user NAME``: give up root once the privileged ports are bound."""

from __future__ import annotations

import grp
import importlib
import logging
import os
import pwd

log = logging.getLogger(__name__)

PRELOAD = ("concurrent.futures.thread", "encodings.idna", "stringprep")
"""Standard-library modules imported lazily at run time (getaddrinfo and to_thread use
the default executor; IDNA for upstream names). They are imported before the switch,
because the new user may not be allowed to read the interpreter's directory."""


class PrivilegeError(Exception):
    """Dropping privileges failed; the message says what to do."""


def drop_privileges(user: str) -> tuple[int, int]:
    """Switch to ``user`` (name or numeric uid) and its primary group, with no
    supplementary groups. Returns the new (uid, gid).

    Must run as root, after binding and before any thread starts (setuid only
    changes the calling thread's credentials in some libcs' view of the world).
    """
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user (see /etc/passwd)") from None
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid:
            return entry.pw_uid, entry.pw_gid
        raise PrivilegeError(
            f"--user {user}: only root can switch users; start as root, or under systemd use "
            "User= or DynamicUser= instead"
        )
    for module in PRELOAD:
        importlib.import_module(module)
    try:
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise PrivilegeError(f"--user {user}: cannot switch: {exc.strerror}") from None
    try:
        os.setuid(0)
    except OSError:
        pass
    else:
        raise PrivilegeError(f"--user {user}: could regain root after dropping it; refusing to run")
    return entry.pw_uid, entry.pw_gid


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def warn_if_root() -> bool:
    """Log a WARNING when the process still runs as root (after any ``--user``); say if so."""
    if os.geteuid() != 0:
        return False
    log.warning(
        "running as root: a bug in doqproxy or a library would have the whole machine; "
        "use --user NAME (or systemd User=/DynamicUser=)"
    )
    return True
