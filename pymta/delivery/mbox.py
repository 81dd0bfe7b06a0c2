"""Appending to an mbox, locked the way mail(1), mutt and Python's `mailbox` lock it (`local` decides
where mail goes and as whom).

mbox: the message follows a `From SENDER DATE` line (asctime, local time; MAILER-DAEMON for the null sender;
whitespace as '_' and characters beyond ASCII as '?', so every reader can parse it; Return-Path keeps the
address as it is) and ends with a blank line. Body lines starting with `From ` get a `>` (mboxo, as
Python's mailbox.mbox, Postfix and mail.local write them); a line already reading `>From ` is left alone,
because no common reader (mail, mutt, Python) removes a quoting `>`, so mboxrd's extra `>` would show.
The mbox is locked as those readers lock it: an fcntl (lockf) lock and a `USER.lock` dotlock, both retried
until `LOCK_TIMEOUT`, then the delivery is deferred ("mailbox locked"), and so is further mail for that
user in the same delivery run, at once (`local.LOCKED_MEMORY`). A dotlock older than
`STALE_DOTLOCK_AGE` is removed (a crashed writer's). Where the directory does not let us create a dotlock
(EACCES, EROFS), the fcntl lock alone is used, as Python's mailbox does.

The mbox is opened with O_NOFOLLOW and created (O_EXCL, mode 0600, owned by the user) when missing. One that
is a symlink, not a regular file, hard-linked, owned by someone else or writable by anyone is not written:
the delivery is deferred with a reason that says what to fix (for one someone else made: chown and chmod 600,
since whoever made it may have left it open), so no mail is lost while the admin looks. A write that fails
part-way (disk full, quota, file size limit) truncates the mbox back to its size before, so it is exactly
as it was, and defers. After the write the file is fsynced.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from itertools import chain

from pymta.delivery import writing
from pymta.delivery.writing import (
    DeferredError,
    LockedError,
    Pieces,
    UncreatableError,
    clean,
    describe,
    failure_text,
)
from pymta.mail.text import UnreadableText
from pymta.privileges import user_name

# Seconds to wait for a locked mbox before deferring: mail readers hold the lock only while they rewrite it.
LOCK_TIMEOUT = 30.0
# Seconds between attempts to take the locks.
LOCK_RETRY_INTERVAL = 0.05
# Seconds after which a dotlock is a crashed writer's and is removed (Postfix's stale_lock_time).
STALE_DOTLOCK_AGE = 500.0

OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
CREATE_FLAGS = OPEN_FLAGS | os.O_CREAT | os.O_EXCL

# Threads of one process share fcntl locks; this lock per mbox keeps them apart.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


def from_line(sender: str, now: float) -> bytes:
    """The mbox `From ` line that starts a message, without its LF."""
    # ASCII only (other characters as '?'): Python's mailbox, for one, cannot read anything else here.
    ascii_sender = "".join(char if ord(char) < 128 else "?" for char in clean(sender))
    return f"From {ascii_sender or 'MAILER-DAEMON'} {time.asctime(time.localtime(now))}".encode()


def mbox_entry(data: Iterable[bytes], sender: str, now: float) -> Iterator[bytes]:
    """`data` (LF line endings, in pieces that each end a line but the last: `writing.unix_lines`) as one
    mbox message, piece by piece: From_ line, `>From ` quoting, trailing blank line."""
    yield from_line(sender, now) + b"\n"
    last = b""
    for piece in data:
        if piece.startswith(b"From ") or b"\nFrom " in piece:  # each piece starts a line
            piece = (b"\n" + piece).replace(b"\nFrom ", b"\n>From ")[1:]
        if piece:
            yield piece
            last = piece
    yield b"\n" if last.endswith(b"\n") else b"\n\n"


def deliver_mbox(
    path: str, entry_bytes: Pieces, entry: pwd.struct_passwd, lock_timeout: float, *, in_child: bool
) -> None:
    """Append `entry_bytes` (the pieces of a whole mbox message, `mbox_entry`) to the mbox at `path`,
    locked."""
    if in_child:  # one thread; and a lock another thread of the parent held at fork() would never be freed
        _deliver_locked(path, entry_bytes, entry, time.monotonic() + lock_timeout, lock_timeout)
        return
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(timeout=max(lock_timeout, 0)):
        raise LockedError(f"mailbox locked: {path} stayed locked for {lock_timeout:g} s; will try again")
    try:
        _deliver_locked(path, entry_bytes, entry, time.monotonic() + lock_timeout, lock_timeout)
    finally:
        thread_lock.release()


def _deliver_locked(
    path: str, entry_bytes: Pieces, entry: pwd.struct_passwd, deadline: float, lock_timeout: float
) -> None:
    while True:
        fd = _open_mbox(path, entry)
        try:
            dotlock = _lock(fd, path, deadline, lock_timeout)
            try:
                if _same_file(fd, path):
                    _append(fd, path, entry_bytes())
                    return
            finally:
                _unlock(fd, dotlock)
        finally:
            os.close(fd)
        # A mail reader replaced or removed the mbox while we waited for the lock: start again.
        if time.monotonic() > deadline:
            raise LockedError(f"mailbox locked: {path} kept changing for {lock_timeout:g} s")


def _open_mbox(path: str, entry: pwd.struct_passwd) -> int:
    """An fd for appending to the mbox at `path`, created when missing; refuses what is not the user's."""
    directory = os.path.dirname(path) or "."
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            fd = os.open(path, CREATE_FLAGS, 0o600)
        except FileExistsError:
            return _open_mbox(path, entry)  # someone else just created it: check that one
        except FileNotFoundError:
            raise DeferredError(
                f"the mail spool directory {directory} does not exist; create it or set local.mail_spool"
            ) from None
        except OSError as error:
            plain = f"{path} cannot be created ({describe(error)})"
            fix = (
                f"cannot create {path}: {describe(error)}; create it for the user"
                f" (install -m 600 -o {entry.pw_name} /dev/null {path}) or use a Maildir"
            )
            if error.errno in (errno.EACCES, errno.EPERM):
                raise UncreatableError(fix, plain) from None
            raise DeferredError(fix) from None
        try:
            os.fchmod(fd, 0o600)
            if writing.euid() == 0:
                os.fchown(fd, entry.pw_uid, -1)  # the group stays the directory's (mail on Debian)
        except OSError:
            os.close(fd)
            raise
        return fd
    if stat.S_ISLNK(info.st_mode):
        raise DeferredError(
            f"{path} is a symbolic link; pymta does not follow it: replace it with a plain file"
        )
    _check_mbox(path, info, entry)
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DeferredError(f"{path} is a symbolic link; pymta does not follow it") from None
        raise DeferredError(f"cannot open {path}: {describe(error)}") from None
    try:
        _check_mbox(path, os.fstat(fd), entry)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_mbox(path: str, info: os.stat_result, entry: pwd.struct_passwd) -> None:
    fix = "so nothing is written; the admin should fix it (mail waits in the queue meanwhile)"
    if not stat.S_ISREG(info.st_mode):
        raise DeferredError(f"{path} is not a regular file, {fix}")
    if info.st_nlink > 1:
        raise DeferredError(f"{path} has {info.st_nlink} hard links, {fix}")
    if info.st_uid != entry.pw_uid:  # the mode too: whoever made it may have left it open to all
        owner = user_name(info.st_uid)
        raise DeferredError(
            f"{path} belongs to {owner}, not {entry.pw_name}, {fix}: chown {entry.pw_name} {path}"
            f" && chmod 600 {path}"
        )
    if info.st_mode & stat.S_IWOTH:
        raise DeferredError(f"{path} may be written by anyone, {fix}: chmod 600 {path}")


def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open on `fd` (a reader may have replaced it meanwhile)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _lock(fd: int, path: str, deadline: float, lock_timeout: float) -> str | None:
    """Take the fcntl lock and the dotlock, retrying until `deadline`; the dotlock's path, or None when the
    directory does not allow one. Both are taken or neither, so we never hold one while waiting."""
    dotlock = path + ".lock"
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        else:
            got = _try_dotlock(dotlock)
            if got is not False:
                return dotlock if got else None
            fcntl.lockf(fd, fcntl.LOCK_UN)
        if time.monotonic() >= deadline:
            raise LockedError(
                f"mailbox locked: {path} stayed locked for {lock_timeout:g} s (a mail reader holds it,"
                f" or a stale {dotlock}); will try again"
            )
        time.sleep(LOCK_RETRY_INTERVAL)


def _try_dotlock(dotlock: str) -> bool | None:
    """True when we created the dotlock, False when someone holds it, None when the directory allows none."""
    try:
        fd = os.open(dotlock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        try:
            age = time.time() - os.lstat(dotlock).st_mtime
        except FileNotFoundError:
            return False  # just released: try again soon
        if age > STALE_DOTLOCK_AGE:
            try:
                os.unlink(dotlock)  # a crashed writer's; the next round takes it
            except OSError:
                pass  # gone already, or not ours to remove (a sticky directory): wait for the deadline
        return False
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return None
        raise
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return True


def _unlock(fd: int, dotlock: str | None) -> None:
    if dotlock is not None:
        try:
            os.unlink(dotlock)
        except FileNotFoundError:
            pass
    fcntl.lockf(fd, fcntl.LOCK_UN)


def _append(fd: int, path: str, entry: Iterable[bytes]) -> None:
    """Append `entry` to the locked mbox; on any failure cut the file back to its size before and defer."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, 2, size - 2) if size >= 2 else os.pread(fd, size, 0)
    if tail and not tail.endswith(b"\n"):
        entry = chain((b"\n\n",), entry)  # end the last line, then the blank line before our From_ line
    elif size >= 2 and tail != b"\n\n":
        entry = chain((b"\n",), entry)  # the blank line before our From_ line
    try:
        writing.begin_writing()
        writing.write_pieces(fd, entry)
        os.fsync(fd)
    except (OSError, UnreadableText) as error:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as undo:
            raise DeferredError(
                f"writing {path} failed ({failure_text(error)}) and so did cutting it back"
                f" ({describe(undo)}): the mailbox may end in a partial message"
            ) from None
        raise DeferredError(
            f"writing {path} failed: {failure_text(error)}; the mailbox is unchanged"
        ) from None
