"""Opening an `:include:` file of the aliases file (`pymta.config.aliases`) with the rights of its owner.

An include file is read only when it is a regular file, not a symbolic link as the last part of its path, no
bigger than `MAX_INCLUDE_SIZE`, and not writable by everyone.

Include files are read with the rights of their owner (as Postfix's local(8) does), the include rule:
- A file named by the aliases file (root's) and owned by root, or by the user running pymta, is read with
  the flush's own rights. A file owned by anybody else is read with that user's rights, and so is every
  file it includes, however deep: rights only ever go down, never up.
- pymta cannot become that user (the delivery process runs as `pymta`), so it checks what the kernel
  would: every directory on the path must be searchable by that user and the file readable, by owner,
  group and other mode bits (not ACLs). It opens the path one component at a time from "/" and checks the
  directory or file it actually opened, so nothing can be swapped between the check and the read.
- A directory or symbolic link on the way that belongs to such a user hands the rest of the way to that
  user's rights too: they could have put anything below it. A directory that everyone may write, without
  the sticky bit, is refused.
- A file whose owner gives the rights must have exactly one link: with a second one, its owner need not be
  whoever put it where it is named.
So a user to whom the admin delegated a list can include only what that user could read anyway.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat

from pymta.fsutil import READ_FLAGS, open_directory, read_all
from pymta.records import record

# Bytes: an include file is a list of addresses; a bigger one is not what the admin meant to include.
MAX_INCLUDE_SIZE = 1024 * 1024
# Symbolic links followed on the way to one include file: Linux's own limit (MAXSYMLINKS).
MAX_SYMLINKS = 40

_SEARCH, _READ = 0o1, 0o4  # the x and r mode bits


@record(frozen=True, slots=True)
class Reader:
    """A user whose rights an include file is read with (the include rule in the module docstring)."""

    uid: int
    name: str
    groups: frozenset[int]

    def may(self, info: os.stat_result, want: int) -> bool:
        """Whether this user may `want` (_READ, _SEARCH) the file `info` is of, by its mode bits: the owner's
        bits for its owner, else the group's for a member, else the others'."""
        if info.st_uid == self.uid:
            bits = info.st_mode >> 6
        elif info.st_gid in self.groups:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        return bits & want == want


class RefusedError(Exception):
    """An include file that cannot be used: why, to follow ":include:PATH " (the aliases reader reports it
    as a problem of the line that names the file)."""


def owner_rights(uid: int) -> Reader | None:
    """The rights a file owned by `uid` gives: None (the flush's own) for root and the user running pymta."""
    if uid in (0, os.geteuid()):
        return None
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise RefusedError(f"belongs to uid {uid}, which has no account, so its rights are unknown") from None
    return Reader(uid, entry.pw_name, frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)))


def _refused_for(reader: Reader) -> RefusedError:
    return RefusedError(
        f"cannot be read by {reader.name}, whose rights it is read with (an include file is read with the"
        " rights of the user who owns it, the file that includes it, or a directory or link on its way)"
    )


def open_include(path: str, reader: Reader | None) -> tuple[int, Reader | None]:
    """The include file `path` opened for reading, and the rights its own includes are read with.

    Opens one component at a time from "/", following symbolic links on the way itself (never the last
    one), so that every check is made on exactly what was opened: with the flush's own rights (`reader`
    None), a directory or symbolic link on the way that belongs to another user hands the rest of the way
    to that user's rights (they could have put anything below it); with a user's rights, each directory
    looked up in must be searchable by them, and the file readable. Raises RefusedError."""
    pending = [part for part in path.split("/") if part not in ("", ".")]
    links = 0
    directory = open_directory("/")
    try:
        while True:
            reader = _enter_directory(os.fstat(directory), reader)
            if not pending:
                raise RefusedError("is not a regular file")
            name = pending.pop(0)
            if not pending:
                return _open_last(directory, name, reader)
            try:
                found = open_directory(name, directory)
            except OSError as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):  # a symbolic link, or no directory
                    raise RefusedError(f"cannot be read ({error.strerror})") from None
            else:
                os.close(directory)
                directory = found
                continue
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if not stat.S_ISLNK(info.st_mode):
                raise RefusedError(f"cannot be read ({os.strerror(errno.ENOTDIR)})")
            links += 1
            if links > MAX_SYMLINKS:
                raise RefusedError(f"cannot be read ({os.strerror(errno.ELOOP)})")
            if reader is None:
                reader = owner_rights(info.st_uid)
            try:
                target = os.readlink(name, dir_fd=directory)
            except OSError as error:
                raise RefusedError(f"cannot be read ({error.strerror})") from None
            pending[:0] = [part for part in target.split("/") if part not in ("", ".")]
            if target.startswith("/"):
                os.close(directory)
                directory = open_directory("/")
    finally:
        os.close(directory)


def _enter_directory(info: os.stat_result, reader: Reader | None) -> Reader | None:
    """The rights to go on with inside a directory on an include file's way (`open_include`); refuses one
    that everyone may write without the sticky bit (anyone could have swapped what lies in it)."""
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise RefusedError("lies in a directory that everyone may write (chmod o-w, or +t, that directory)")
    if reader is None:
        reader = owner_rights(info.st_uid)
    if reader is not None and not reader.may(info, _SEARCH):
        raise _refused_for(reader)
    return reader


def _open_last(directory: int, name: str, reader: Reader | None) -> tuple[int, Reader | None]:
    """The last part of an include file's path, opened in `directory` and checked (see open_include)."""
    try:
        fd = os.open(name, READ_FLAGS | os.O_NOFOLLOW, dir_fd=directory)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RefusedError(
                "is a symbolic link, which pymta does not follow: name the real file"
            ) from None
        raise RefusedError(f"cannot be read ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RefusedError("is not a regular file")
        if reader is not None:
            if not reader.may(info, _READ):
                raise _refused_for(reader)
        else:
            reader = owner_rights(info.st_uid)
            if reader is not None and info.st_nlink != 1:
                raise RefusedError(
                    f"belongs to {reader.name} and has {info.st_nlink} links; a file whose owner's rights"
                    " it is read with must have one link (another could have been made by someone else)"
                )
    except BaseException:
        os.close(fd)
        raise
    return fd, reader


def read(path: str, reader: Reader | None) -> tuple[bytes, Reader | None]:
    """The include file `path` read with the rights of `reader` (None: the flush's own, then its owner's),
    and the rights its own includes are read with. Raises RefusedError saying why it cannot be used."""
    try:
        fd, rights = open_include(path, reader)
    except OSError as error:
        raise RefusedError(f"cannot be read ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if info.st_mode & stat.S_IWOTH:
            raise RefusedError(f"is writable by everyone, so anyone could redirect mail (chmod o-w {path})")
        data = b""
        if info.st_size <= MAX_INCLUDE_SIZE:  # and no more than that is read: it could grow meanwhile
            data = read_all(fd, limit=MAX_INCLUDE_SIZE + 1)
        if info.st_size > MAX_INCLUDE_SIZE or len(data) > MAX_INCLUDE_SIZE:
            raise RefusedError(f"is bigger than {MAX_INCLUDE_SIZE} bytes")
    except OSError as error:
        raise RefusedError(f"cannot be read ({error.strerror})") from None
    finally:
        os.close(fd)
    return data, rights
