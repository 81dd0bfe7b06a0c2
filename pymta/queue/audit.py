"""What `pymta setup --check` finds planted or left behind in a system spool and its secrets directory.

The spool belongs to `pymta`, so a compromised delivery process (or an admin's slip) can leave there what
pymta itself never makes: a symbolic link, a FIFO or a device, a file of root's (pymta never gives one
back: root's commands work in the spool as its owner, pymta(1) PRIVILEGES), drops that no flush picks up,
messages set aside in corrupt/; and a password file in the secrets directory that others may read.

Only looks, as root, and only through descriptors: each directory is opened from the spool's descriptor
without following a link, its names are listed and lstat'ed relative to it; no file is opened, changed or
removed. Each finding is a (problem, fix) pair, for setup to print as a warning.
"""

from __future__ import annotations

import os
import shlex
import stat
import time

# A drop waits for the next flush (at most 5 minutes with the timer or cron line `pymta setup` installs):
# one this old was never picked up.
LEFTOVER_AGE = 3600.0
# Findings named one by one per directory and kind; the rest are counted.
MAX_NAMED = 5

# Directories in which a file of root's is expected: root's own submissions (tmp/, new/) and the users'
# views root writes (status/, owned by each user, or root while being written).
ROOT_MAY_WRITE = ("tmp", "new", "status")

Finding = tuple[str, str]


def spool_findings(spool: str, directories: tuple[str, ...], now: float | None = None) -> list[Finding]:
    """What is planted or left in `spool`'s `directories` (and beside them); [] when it cannot be opened
    (setup reports that already)."""
    now = time.time() if now is None else now
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        spool_fd = os.open(spool, flags)
    except OSError:
        return []
    findings: list[Finding] = []
    try:
        # A file of root's is odd only in a spool that is not root's (user mode as root: all is root's)
        root_is_odd = os.fstat(spool_fd).st_uid != 0
        others = [name for name in os.listdir(spool_fd) if name not in directories]
        findings += _odd_entries(spool, spool_fd, ".", others, None, root_is_odd)
        for name in directories:
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=spool_fd)
            except OSError:
                continue  # missing, or not a directory: the spool step says so
            try:
                findings += _odd_entries(spool, fd, name, os.listdir(fd), now, root_is_odd)
            finally:
                os.close(fd)
    finally:
        os.close(spool_fd)
    return findings


def _odd_entries(
    spool: str, dir_fd: int, name: str, names: list[str], now: float | None, root_is_odd: bool
) -> list[Finding]:
    directory = spool if name == "." else os.path.join(spool, name)
    kinds: dict[str, list[str]] = {"link": [], "special": [], "root": [], "leftover": [], "corrupt": []}
    for entry in sorted(names):
        try:
            info = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        path = os.path.join(directory, entry)
        if stat.S_ISLNK(info.st_mode):
            kinds["link"].append(path)
        elif not stat.S_ISREG(info.st_mode) and not (name == "." and stat.S_ISDIR(info.st_mode)):
            kinds["special"].append(path)
        elif root_is_odd and info.st_uid == 0 and name not in ROOT_MAY_WRITE and stat.S_ISREG(info.st_mode):
            kinds["root"].append(path)
        if (
            name == "new"
            and now is not None
            and stat.S_ISREG(info.st_mode)
            and now - info.st_mtime > LEFTOVER_AGE
        ):
            kinds["leftover"].append(path)
        if name == "corrupt":
            kinds["corrupt"].append(path)
    findings: list[Finding] = []
    for path in _named(kinds["link"]):
        findings.append(
            (f"{path} is a symbolic link (pymta makes none in its spool: someone planted it)", _LOOK)
        )
    for path in _named(kinds["special"]):
        findings.append((f"{path} is not a regular file (pymta makes only regular files there)", _LOOK))
    for path in _named(kinds["root"]):
        findings.append(
            (
                f"{path} belongs to root: a root process wrote into the spool (pymta's own never do), and "
                "the flush, as the spool's owner, cannot use it",
                _LOOK,
            )
        )
    findings += _counted(kinds, "link", directory, "symbolic links")
    findings += _counted(kinds, "special", directory, "files that are not regular files")
    findings += _counted(kinds, "root", directory, "files of root's")
    if kinds["leftover"]:
        count = len(kinds["leftover"])
        findings.append(
            (
                f"{directory}: {count} file{'s' if count != 1 else ''} waiting longer than "
                f"{LEFTOVER_AGE / 3600:.0f} hour to be picked up",
                "check that the flush runs (systemctl status pymta-flush.timer, or the cron line) and "
                "read its log: it says why it leaves a drop; pymta queue lists them",
            )
        )
    if kinds["corrupt"]:
        count = len(kinds["corrupt"])
        findings.append(
            (
                f"{directory}: {count} file{'s' if count != 1 else ''} the flush could not read and set "
                "aside",
                f"look at them (the flush's log says why each was set aside), then remove them: "
                f"ls -l {shlex.quote(directory)}",
            )
        )
    return findings


_LOOK = "stop the flush timer, look at it and remove it; then run pymta setup --check again"


def _named(paths: list[str]) -> list[str]:
    return paths[:MAX_NAMED]


def _counted(kinds: dict[str, list[str]], kind: str, directory: str, what: str) -> list[Finding]:
    more = len(kinds[kind]) - MAX_NAMED
    if more <= 0:
        return []
    return [(f"{directory}: {more} more {what}", _LOOK)]


def secret_findings(directory: str) -> list[Finding]:
    """Files in the secrets directory that others than their owner may read or change, and links."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(directory, flags)
    except OSError:
        return []
    findings: list[Finding] = []
    try:
        for name in sorted(os.listdir(fd)):
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            path = os.path.join(directory, name)
            if stat.S_ISLNK(info.st_mode):
                findings.append((f"{path} is a symbolic link, which pymta refuses as a password file", _LOOK))
            elif stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
                mode = stat.S_IMODE(info.st_mode)
                findings.append(
                    (
                        f"{path} has mode {mode:04o}: others than its owner may read or change the password "
                        "(and the flush refuses it)",
                        f"chmod 600 {shlex.quote(path)}, and change the password if others could read it",
                    )
                )
    finally:
        os.close(fd)
    return findings
