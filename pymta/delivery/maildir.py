"""Writing into a Maildir (`local` decides where mail goes and as whom).

Maildir: the message is written to tmp/ (O_EXCL, O_NOFOLLOW, 0600), fsynced, linked into new/ under a
unique name (time.MusecPpidQn.host, as Python's mailbox.Maildir names them) and new/ is fsynced; all of
it through descriptors of tmp/ and new/ opened without following a link and checked to be the user's, so
swapping one for a link after the check leads nowhere. With `mailbox: maildir` a missing Maildir is created
(0700).
"""

from __future__ import annotations

import itertools
import os
import pwd
import socket
import time

from pymta.delivery import writing
from pymta.delivery.writing import DeferredError, Pieces, failure_text
from pymta.mail.text import UnreadableText
from pymta.queue.directory import unlink_at

_maildir_counter = itertools.count(1)


def _unique_name() -> str:
    """A Maildir file name no other delivery uses: time, microseconds, pid, a counter and the host name."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_maildir_counter)}.{host}"


def deliver_maildir(maildir: str, data: Pieces, entry: pwd.struct_passwd, *, create: bool) -> str:
    """Write `data` into the Maildir's new/ (through tmp/); the file's path in new/.

    Everything goes through descriptors of the checked directories (the user's own, not links), so the
    user, whose directories they are, cannot point a write elsewhere by swapping tmp/ or new/ for a link
    after the checks: a child with the mail spool's group would have written into /var/mail."""
    if create:
        make_maildir(maildir, entry)
    fds: dict[str, int] = {}
    try:
        fds[""] = _open_maildir_part(maildir, maildir, entry, None)
        for sub in ("tmp", "new", "cur"):
            fds[sub] = _open_maildir_part(maildir, os.path.join(maildir, sub), entry, fds[""])
        return _write_maildir(maildir, data, entry, fds["tmp"], fds["new"])
    finally:
        for fd in fds.values():
            os.close(fd)


def _open_maildir_part(maildir: str, directory: str, entry: pwd.struct_passwd, parent: int | None) -> int:
    """A descriptor of `directory` (the Maildir itself, which may be a link, or a part of it opened from
    `parent` without following one), checked to be a directory of the user."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        if parent is None:
            fd = os.open(directory, flags)
        else:
            fd = os.open(os.path.basename(directory), flags | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        raise DeferredError(
            f"{directory} is missing: {maildir} is not a whole Maildir (cur, new, tmp)"
        ) from None
    except OSError:
        raise DeferredError(
            f"{directory} is not a directory of {entry.pw_name}; the admin should fix it"
        ) from None
    if os.fstat(fd).st_uid != entry.pw_uid:
        os.close(fd)
        raise DeferredError(f"{directory} is not a directory of {entry.pw_name}; the admin should fix it")
    return fd


def _write_maildir(maildir: str, data: Pieces, entry: pwd.struct_passwd, tmp_fd: int, new_fd: int) -> str:
    for _ in range(10):
        name = _unique_name()
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=tmp_fd,
            )
        except FileExistsError:
            continue
        try:
            try:
                writing.begin_writing()
                os.fchmod(fd, 0o600)
                if writing.euid() == 0:
                    os.fchown(fd, entry.pw_uid, entry.pw_gid)
                writing.write_pieces(fd, data())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        except FileExistsError:
            unlink_at(tmp_fd, name)
            continue
        except (OSError, UnreadableText) as error:
            unlink_at(tmp_fd, name)
            raise DeferredError(f"writing into {maildir} failed: {failure_text(error)}") from None
        os.unlink(name, dir_fd=tmp_fd)
        os.fsync(new_fd)
        return os.path.join(maildir, "new", name)
    raise DeferredError(f"no unique file name in {maildir}/tmp after 10 tries")


def make_maildir(maildir: str, entry: pwd.struct_passwd) -> None:
    """Create what is missing of the Maildir and its cur, new and tmp: 0700 whatever the umask."""
    for sub in ("", "tmp", "new", "cur"):
        directory = os.path.join(maildir, sub) if sub else maildir
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise DeferredError(
                f"cannot create {directory}: its parent (the home directory?) is missing"
            ) from None
        # Through a descriptor: a symbolic link swapped in for the new directory is not followed.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
            if writing.euid() == 0:
                os.fchown(fd, entry.pw_uid, entry.pw_gid)
        finally:
            os.close(fd)
