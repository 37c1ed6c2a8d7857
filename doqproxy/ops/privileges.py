"""``--user NAME``: give up root once the privileged ports are bound."""

from __future__ import annotations

import grp
import importlib
import logging
import os
import pwd
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRELOAD = (
    "concurrent.futures.thread",
    "encodings.idna",
    "stringprep",
    "dns.exception",
    "dns.message",
    "dns.rdatatype",
)
"""Modules imported lazily at run time (getaddrinfo and to_thread use the default
executor; IDNA for upstream names; dnspython's message module for ``--bootstrap``
lookups). They are imported before the switch, because the new user may not be
allowed to read the interpreter's directory."""


class PrivilegeError(Exception):
    """Dropping privileges failed; the message says what to do."""


def lookup_user(user: str) -> pwd.struct_passwd:
    """The passwd entry for a user name or numeric uid (raises :class:`PrivilegeError`)."""
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user {user}: no such user (see /etc/passwd)") from None


def prepare_state_dir(path: Path, user: str, *, default: bool) -> str | None:
    """Make ``path`` usable by ``user`` before root is given up, as systemd's
    StateDirectory= does. Returns a one-line warning when that is not possible.

    A missing directory is created (mode 0700) and given to the user. An existing
    one is handed over only when it is doqproxy's own default and still root's;
    any other directory is left as the admin made it, and the state-dir check
    that runs as the user (:func:`doqproxy.upstream.tickets.check_state_dir`)
    refuses it with one line if the user does not own it.
    """
    entry = lookup_user(user)
    uid, gid = entry.pw_uid, entry.pw_gid
    try:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            info = os.stat(path, follow_symlinks=False)
            if default and info.st_uid == 0 and stat.S_ISDIR(info.st_mode):
                os.chown(path, uid, gid, follow_symlinks=False)
                os.chmod(path, 0o700)
        else:
            os.chown(path, uid, gid)
    except OSError as exc:
        return f"cannot prepare state dir {path} for {user}: {exc.strerror or exc}"
    return None


def drop_privileges(user: str) -> tuple[int, int]:
    """Switch to ``user`` (name or numeric uid) and its primary group, with no
    supplementary groups. Returns the new (uid, gid).

    Must run as root, after binding and before any thread starts (setuid only
    changes the calling thread's credentials in some libcs' view of the world).
    """
    entry = lookup_user(user)
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
