"""File-system helpers of `pymta setup`: who should own a path, and making and checking directories, files
and links without ever following a link that was swapped in (every change goes through a descriptor, or is a
rename). `node_changes` and friends turn what is wrong with a path into `Change`s for the plan engine.
"""

from __future__ import annotations

import grp
import os
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass

from pymta.privileges import user_name
from pymta.setup.plan import Change

PARENT_MODE = 0o755  # directories setup creates above what it installs


@dataclass(frozen=True)
class Owner:
    """Who should own a path: uid and gid, or None when they are not known yet (the user is created later)."""

    uid: int | None
    gid: int | None
    label: str  # user:group, for messages and chown commands

    def matches(self, info: os.stat_result) -> bool:
        return self.uid is not None and (info.st_uid, info.st_gid) == (self.uid, self.gid)


def owner_of(uid: int, gid: int) -> Owner:
    return Owner(uid, gid, f"{user_name(uid)}:{group_name(gid)}")


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def describe_owner(info: os.stat_result) -> str:
    return f"{user_name(info.st_uid)}:{group_name(info.st_gid)}"


def _open_node(path: str, directory: bool) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    return os.open(path, flags | (os.O_DIRECTORY if directory else 0))


def set_attributes(path: str, mode: int, owner: Owner, directory: bool) -> None:
    """Give `path` its owner and mode through a descriptor, so a link swapped in is never followed."""
    fd = _open_node(path, directory)
    try:
        info = os.fstat(fd)
        if not directory and not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if owner.uid is not None and owner.gid is not None and not owner.matches(info):
            os.fchown(fd, owner.uid, owner.gid)
        if stat.S_IMODE(info.st_mode) != mode or not owner.matches(info):
            os.fchmod(fd, mode)  # after chown, which may clear mode bits
    finally:
        os.close(fd)


def make_parents(path: str) -> None:
    """Create the missing directories above `path`, 0755 whatever the umask."""
    missing = []
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        os.mkdir(directory, PARENT_MODE)
        os.chmod(directory, PARENT_MODE)


def _make_dir(path: str, mode: int, owner: Owner) -> None:
    make_parents(path)
    os.mkdir(path, 0o700)
    set_attributes(path, mode, owner, directory=True)


def _fresh_tmp_beside(path: str) -> str:
    """The name to build `path` under before it is renamed into place: its parents made, a leftover of an
    interrupted run removed."""
    make_parents(path)
    tmp_path = f"{path}.pymta-setup"
    try:
        os.unlink(tmp_path)
    except FileNotFoundError:
        pass
    return tmp_path


def write_file(path: str, text: str, mode: int, owner: Owner, replace: bool = True) -> None:
    """Write `text` to `path` atomically: a new file beside it, then rename (or, when not `replace`, link,
    which fails rather than replace a file that appeared meanwhile)."""
    tmp_path = _fresh_tmp_beside(path)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, text.encode("utf-8"))
            if owner.uid is not None and owner.gid is not None:
                os.fchown(fd, owner.uid, owner.gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp_path, path)
        else:
            os.link(tmp_path, path)
            os.unlink(tmp_path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise


def symlink(target: str, path: str) -> None:
    """Make `path` a link to `target`, replacing a link that is there (atomically)."""
    tmp_path = _fresh_tmp_beside(path)
    os.symlink(target, tmp_path)
    os.replace(tmp_path, path)


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def kind_of(info: os.stat_result) -> str:
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    if stat.S_ISREG(info.st_mode):
        return "a regular file"
    return "a special file"


def node_changes(
    path: str, mode: int, owner: Owner, directory: bool, create: Callable[[], None]
) -> list[Change]:
    """What is wrong with the directory or file `path` that should have `mode` and `owner`."""
    want = "directory" if directory else "file"
    info = lstat_or_none(path)
    if info is None:
        return [
            Change(
                "create",
                f"{path} ({want}, mode {mode:04o}, owner {owner.label})",
                f"{path} is missing",
                (
                    f"install -d -m {mode:04o} -o {owner.label.replace(':', ' -g ')} {shlex.quote(path)}"
                    if directory
                    else "pymta setup"
                ),
                create,
            )
        ]
    right_type = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not right_type:
        return [
            Change(
                "fix",
                f"{path}: replace {kind_of(info)} by a {want}",
                f"{path} is {kind_of(info)}, not a {want}",
                f"move {shlex.quote(path)} away, then run pymta setup",
            )
        ]
    changes = []
    if not owner.matches(info):
        changes.append(
            Change(
                "fix",
                f"{path}: owner {describe_owner(info)} -> {owner.label}",
                f"{path} is owned by {describe_owner(info)}, should be {owner.label}",
                f"chown {owner.label} {shlex.quote(path)}",
                lambda: set_attributes(path, mode, owner, directory),
            )
        )
    current = stat.S_IMODE(info.st_mode)
    if current != mode:
        changes.append(
            Change(
                "fix",
                f"{path}: mode {current:04o} -> {mode:04o}",
                f"{path} has mode {current:04o}, should be {mode:04o}",
                f"chmod {mode:04o} {shlex.quote(path)}",
                lambda: set_attributes(path, mode, owner, directory),
            )
        )
    return changes


def dir_changes(path: str, mode: int, owner: Owner) -> list[Change]:
    return node_changes(path, mode, owner, True, lambda: _make_dir(path, mode, owner))


def file_changes(path: str, text: str, mode: int, owner: Owner, describe: str) -> list[Change]:
    """A file setup owns: its content is rewritten when it differs."""
    changes = node_changes(path, mode, owner, False, lambda: write_file(path, text, mode, owner))
    if changes and changes[0].kind == "create":
        return [
            Change(
                "create",
                f"{path} ({describe}, mode {mode:04o})",
                f"{path} is missing",
                "pymta setup",
                changes[0].action,
            )
        ]
    if any(change.action is None for change in changes):
        return changes
    with open(path, encoding="utf-8", errors="replace") as handle:
        current = handle.read()
    if current != text:
        return [
            Change(
                "fix",
                f"{path}: rewritten ({describe}; it differed from what this pymta installs)",
                f"{path} differs from what this pymta installs ({describe})",
                "pymta setup (put local changes in a drop-in or another file: setup rewrites this one)",
                lambda: write_file(path, text, mode, owner),
            )
        ]
    return changes


def is_pymta_script(path: str) -> bool:
    """Whether `path` (followed) is one of pymta's console scripts, of this or another environment."""
    try:
        with open(path, "rb") as handle:
            return b"from pymta." in handle.read(4096)
    except OSError:
        return False
