"""Delivery into a local user's mailbox, the way mail(1), mutt and Python's `mailbox` expect it.

    outcome = deliver_as_recipient("alice", message, sender="root@host", local=config.local, now=time.time())

Where the mail goes: `~/Maildir` (config `local.maildir`, ~ is the recipient's home) when `local.mailbox` is
`maildir`, or `auto` and that directory exists; else the mbox `MAIL_SPOOL/USER` (`local.mail_spool`,
/var/mail). With `auto`, an mbox that is missing and that the user may not create (EACCES or EPERM: Debian's
/var/mail is root:mail 2775, and user mode has neither root nor the group) is not waited for: the Maildir is
created (cur, new, tmp, 0700) and the message goes there, and so does all later mail, since `auto` now finds
it; the delivery's reason says so, so the log tells it once. Every delivery begins with a
`Return-Path: <sender>` line (RFC 5321 4.4, final delivery) and has LF line endings (the message arrives in
SMTP form, CRLF).

mbox: the message follows a `From SENDER DATE` line (asctime, local time; MAILER-DAEMON for the null sender;
whitespace as '_' and characters beyond ASCII as '?', so every reader can parse it; Return-Path keeps the
address as it is) and ends with a blank line. Body lines starting with `From ` get a `>` (mboxo, as
Python's mailbox.mbox, Postfix and mail.local write them); a line already reading `>From ` is left alone,
because no common reader (mail, mutt, Python) removes a quoting `>`, so mboxrd's extra `>` would show.
The mbox is locked as those readers lock it: an fcntl (lockf) lock and a `USER.lock` dotlock, both retried
until `LOCK_TIMEOUT`, then the delivery is deferred ("mailbox locked"), and so is further mail for that
user in the same delivery run, at once (`LOCKED_MEMORY`). A dotlock older than
`STALE_DOTLOCK_AGE` is removed (a crashed writer's). Where the directory does not let us create a dotlock
(EACCES, EROFS), the fcntl lock alone is used, as Python's mailbox does.

The mbox is opened with O_NOFOLLOW and created (O_EXCL, mode 0600, owned by the user) when missing. One that
is a symlink, not a regular file, hard-linked, owned by someone else or writable by anyone is not written:
the delivery is deferred with a reason that says what to fix (for one someone else made: chown and chmod 600,
since whoever made it may have left it open), so no mail is lost while the admin looks. A write that fails
part-way (disk full, quota, file size limit) truncates the mbox back to its size before, so it is exactly
as it was, and defers. After the write the file is fsynced.

Maildir: the message is written to tmp/ (O_EXCL, O_NOFOLLOW, 0600), fsynced, linked into new/ under a
unique name (time.MusecPpidQn.host, as Python's mailbox.Maildir names them) and new/ is fsynced; all of
it through descriptors of tmp/ and new/ opened without following a link and checked to be the user's, so
swapping one for a link after the check leads nowhere. With
`mailbox: maildir` a missing Maildir is created (0700).

Why not Python's `mailbox` for writing: `mailbox.mbox` opens by path (following symlinks, so a user could
point a delivery at any file), cannot be told to create the file 0600 for its owner, and leaves a half
append in place when the disk fills. What it reads is the standard, though: the tests read every delivery
back with `mailbox.mbox` and `mailbox.Maildir`.

Outcomes: a user that does not exist, or a name with characters no user name has ('/', whitespace, NUL,
a leading '-' or '.', shell characters) fails; everything the admin can fix defers.

Privilege: `deliver` does the file work with the rights of the process. `deliver_as_recipient` is what the
flush calls. Mail for the process's own user is delivered in the process. As root, anyone else's is delivered
by a forked child that drops to the recipient for good (setgroups to their groups, plus, for the mbox only,
the mail spool directory's group when only that group may create files there, as on Debian's root:mail 2775
/var/mail, the group mail readers' dotlock helpers have; then setgid, setuid) and answers through a pipe. Fork
without exec on purpose: it needs no interpreter readable by the recipient, and the child (non-dumpable after
setuid, so the user cannot inspect it) calls no name service and takes no lock another thread may hold.
Without root, anyone else's mail is deferred with the fix ("run the flush as root"): that is user mode, where
the user's own mail goes to their own mailbox.

The child is the recipient's process, so the recipient may signal it, and the whole run waits for it. The
parent kills it, defers the delivery and, for the rest of the run, defers that user's mail at once (as for a
locked mbox) when it is seen stopped (a stop sends nothing, so a silent child is looked at every
CHILD_POLL_INTERVAL), when it has not begun to write within `lock_timeout + CHILD_START_TIMEOUT` (the child
says when it has the mailbox in hand), or has not answered CHILD_WRITE_TIMEOUT after that. A child killed
while appending to an mbox cannot cut the mbox back: the mailbox then ends in a copy of the message cut
short (readers show it as a truncated message; the next delivery starts on a line of its own) and the
child's dotlock stays until it is STALE_DOTLOCK_AGE old, deferring that user's mail meanwhile. The message
itself stays queued and is delivered whole by a later run. A Maildir keeps only a file in tmp/, which
readers ignore.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import pwd
import re
import signal
import socket
import stat
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from pymta.config.model import Local
from pymta.queue.directory import unlink_at as _unlink_at

Status = Literal["delivered", "deferred", "failed"]

# Seconds to wait for a locked mbox before deferring: mail readers hold the lock only while they rewrite it.
LOCK_TIMEOUT = 30.0
# Seconds a delivery run remembers a mailbox it found locked (or whose delivery child it had to kill): later
# messages for that user are deferred at once instead of each waiting again, so one locked mbox does not
# stall the rest of the queue.
LOCKED_MEMORY = 300.0
# Seconds between attempts to take the locks.
LOCK_RETRY_INTERVAL = 0.05
# Seconds after which a dotlock is a crashed writer's and is removed (Postfix's stale_lock_time).
STALE_DOTLOCK_AGE = 500.0
# Seconds the delivering child may take, besides the lock wait, before it begins to write: the user
# switch and opening (or creating) the mailbox.
CHILD_START_TIMEOUT = 30.0
# Seconds the child may take to write once it holds the mailbox (35 MB take well under a second): short,
# because the mailbox stays locked meanwhile and the whole run waits.
CHILD_WRITE_TIMEOUT = 60.0
# Seconds between looks at the child while it sends nothing: a stopped child (SIGSTOP from the recipient,
# whose process it is) is seen within this and killed.
CHILD_POLL_INTERVAL = 0.05
# Bytes of a child's answer: one outcome as JSON.
MAX_CHILD_ANSWER = 1 << 16
# Bytes of a user name: NAME_MAX minus ".lock".
MAX_USER_LENGTH = 250
# What a user name may be made of (POSIX portable user names): nothing a shell or a path would read.
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# errno values that mean "no room": disk full, quota, file size limit.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = _OPEN_FLAGS | os.O_CREAT | os.O_EXCL


@dataclass(frozen=True, slots=True)
class LocalOutcome:
    """How one local delivery ended: delivered, deferred (try again later) or failed (bounce), and why."""

    status: Status
    reason: str  # one line: where the message went, or what went wrong and what to do
    mailbox: str = ""  # the mbox file or Maildir, when it got that far
    locked: bool = False  # deferred because the mbox stayed locked (a reader holds it) or its child stalled

    def to_json(self) -> str:
        return json.dumps(
            {"status": self.status, "reason": self.reason, "mailbox": self.mailbox, "locked": self.locked}
        )

    @classmethod
    def from_json(cls, text: str) -> LocalOutcome:
        data = json.loads(text)
        status = data["status"]
        if status not in ("delivered", "deferred", "failed"):
            raise ValueError(f"unknown status {status!r}")
        return cls(status, str(data["reason"]), str(data.get("mailbox", "")), data.get("locked") is True)


class _DeferredError(Exception):
    """Internal: stop this delivery and defer it with the message as reason."""


class _Locked(_DeferredError):
    """Internal: the mbox stayed locked past the deadline."""


class _Uncreatable(_DeferredError):
    """Internal: the mbox is missing and this user may not create it (EACCES, EPERM: the mail spool lets
    only root or a group create files). `plain` says so without the fix for the mbox."""

    def __init__(self, text: str, plain: str) -> None:
        super().__init__(text)
        self.plain = plain


def user_name_problem(user: str) -> str:
    """Why `user` cannot be a local user name (shell or path characters, too long); "" when it can."""
    if not user:
        return "an empty user name"
    if len(user) > MAX_USER_LENGTH:
        return "a user name longer than any user has"
    if not _USER_RE.fullmatch(user):
        return f"{user!r} is not a user name (letters, digits, '.', '_' and '-' only; no '.' or '-' first)"
    if user.endswith(".lock"):
        return f"{user!r} is not a user name (it would name another mailbox's lock file)"
    return ""


def lookup_user(user: str) -> pwd.struct_passwd | None:
    """The passwd entry of `user`; failing that, of `user` in lower case (mail local parts ignore case)."""
    for name in dict.fromkeys((user, user.lower())):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _euid() -> int:
    return os.geteuid()


def deliver(
    user: str,
    message: bytes,
    *,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float = LOCK_TIMEOUT,
) -> LocalOutcome:
    """Deliver `message` (SMTP form, CRLF) from `sender` ("" for the null sender) to the local `user`.

    Works with the rights of this process (see `deliver_as_recipient`); as root it chowns what it creates to
    the user. Never raises for a delivery problem: the outcome says what happened.
    """
    entry = _user_entry(user)
    if isinstance(entry, LocalOutcome):
        return entry
    return _deliver(entry, message, sender, local, now, lock_timeout, in_child=False)


def _user_entry(user: str) -> pwd.struct_passwd | LocalOutcome:
    """The passwd entry of `user`, or the failed outcome for a name that is no user."""
    problem = user_name_problem(user)
    if problem:
        return LocalOutcome("failed", f"5.1.3 refused: {problem}")
    entry = lookup_user(user)
    if entry is None:
        return LocalOutcome("failed", f"5.1.1 no such local user: {user}")
    return entry


def _deliver(
    entry: pwd.struct_passwd,
    message: bytes,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float,
    *,
    in_child: bool,
    to_maildir: bool | None = None,
    may_fall_back: bool = True,
) -> LocalOutcome:
    """Deliver to the Maildir when `to_maildir` (None: as `local` says, `_uses_maildir`), else to the mbox;
    an mbox that may not be created falls back to the Maildir only when `may_fall_back`."""
    data = (
        b"Return-Path: <"
        + _clean(sender).encode("utf-8", "surrogateescape")
        + b">\n"
        + message.replace(b"\r\n", b"\n")
    )
    maildir = _maildir_path(local, entry)
    use_maildir = _uses_maildir(local, entry) if to_maildir is None else to_maildir
    path = maildir if use_maildir else os.path.join(local.mail_spool, entry.pw_name)
    try:
        if use_maildir:
            name = _deliver_maildir(maildir, data, entry, create=local.mailbox == "maildir")
            return LocalOutcome("delivered", f"delivered to {name}", maildir)
        _deliver_mbox(path, mbox_entry(data, sender, now), entry, lock_timeout, in_child=in_child)
        return LocalOutcome("delivered", f"delivered to {path}", path)
    except _Uncreatable as why:
        if local.mailbox != "auto" or not may_fall_back:
            return LocalOutcome("deferred", str(why), path)
        return _fall_back_to_maildir(maildir, data, entry, why)
    except _DeferredError as why:
        return LocalOutcome("deferred", str(why), path, locked=isinstance(why, _Locked))
    except OSError as error:
        return LocalOutcome("deferred", f"cannot deliver to {path}: {_describe(error)}", path)


def _fall_back_to_maildir(
    maildir: str, data: bytes, entry: pwd.struct_passwd, why: _Uncreatable
) -> LocalOutcome:
    """`mailbox: auto` and the mbox may not be created (Debian's /var/mail lets only root and the group
    mail create files; user mode has neither): create the user's Maildir and deliver there. From then on
    `auto` finds the Maildir, so this happens, and the reason says so, once."""
    try:
        name = _deliver_maildir(maildir, data, entry, create=True)
    except _DeferredError as also:
        return LocalOutcome("deferred", f"{why.plain}; and no Maildir instead: {also}", maildir)
    except OSError as error:
        reason = f"{why.plain}; and no Maildir instead: cannot create {maildir}: {_describe(error)}"
        return LocalOutcome("deferred", reason, maildir)
    return LocalOutcome(
        "delivered",
        f"delivered to {name}: {why.plain}, so {maildir} was created, and {entry.pw_name}'s mail goes"
        " there from now on",
        maildir,
    )


def _clean(sender: str) -> str:
    """`sender` safe for one header or From_ line: controls dropped, whitespace as '_'; "" stays ""."""
    return "".join("_" if char.isspace() else char for char in sender if ord(char) >= 32 and char != "\x7f")


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


def _uses_maildir(local: Local, entry: pwd.struct_passwd) -> bool:
    """Whether `entry`'s mail goes to their Maildir (else to their mbox in the mail spool)."""
    return local.mailbox == "maildir" or (
        local.mailbox == "auto" and os.path.isdir(_maildir_path(local, entry))
    )


def _maildir_path(local: Local, entry: pwd.struct_passwd) -> str:
    if local.maildir == "~" or local.maildir.startswith("~/"):
        return entry.pw_dir.rstrip("/") + local.maildir[1:]
    return local.maildir


# --- mbox ---

# Threads of one process share fcntl locks; this lock per mbox keeps them apart.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.Lock())


def from_line(sender: str, now: float) -> bytes:
    """The mbox `From ` line that starts a message, without its LF."""
    # ASCII only (other characters as '?'): Python's mailbox, for one, cannot read anything else here.
    ascii_sender = "".join(char if ord(char) < 128 else "?" for char in _clean(sender))
    return f"From {ascii_sender or 'MAILER-DAEMON'} {time.asctime(time.localtime(now))}".encode()


def mbox_entry(data: bytes, sender: str, now: float) -> bytes:
    """`data` (LF line endings) as one mbox message: From_ line, `>From ` quoting, trailing blank line."""
    body = (b"\n" + data).replace(b"\nFrom ", b"\n>From ")[1:]
    if not body.endswith(b"\n"):
        body += b"\n"
    return from_line(sender, now) + b"\n" + body + b"\n"


def _deliver_mbox(
    path: str, entry_bytes: bytes, entry: pwd.struct_passwd, lock_timeout: float, *, in_child: bool
) -> None:
    """Append `entry_bytes` (a whole mbox message) to the mbox at `path`, locked."""
    if in_child:  # one thread; and a lock another thread of the parent held at fork() would never be freed
        _deliver_locked(path, entry_bytes, entry, time.monotonic() + lock_timeout, lock_timeout)
        return
    thread_lock = _thread_lock(path)
    if not thread_lock.acquire(timeout=max(lock_timeout, 0)):
        raise _Locked(f"mailbox locked: {path} stayed locked for {lock_timeout:g} s; will try again")
    try:
        _deliver_locked(path, entry_bytes, entry, time.monotonic() + lock_timeout, lock_timeout)
    finally:
        thread_lock.release()


def _deliver_locked(
    path: str, entry_bytes: bytes, entry: pwd.struct_passwd, deadline: float, lock_timeout: float
) -> None:
    while True:
        fd = _open_mbox(path, entry)
        try:
            dotlock = _lock(fd, path, deadline, lock_timeout)
            try:
                if _same_file(fd, path):
                    _append(fd, path, entry_bytes)
                    return
            finally:
                _unlock(fd, dotlock)
        finally:
            os.close(fd)
        # A mail reader replaced or removed the mbox while we waited for the lock: start again.
        if time.monotonic() > deadline:
            raise _Locked(f"mailbox locked: {path} kept changing for {lock_timeout:g} s")


def _open_mbox(path: str, entry: pwd.struct_passwd) -> int:
    """An fd for appending to the mbox at `path`, created when missing; refuses what is not the user's."""
    directory = os.path.dirname(path) or "."
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            return _open_mbox(path, entry)  # someone else just created it: check that one
        except FileNotFoundError:
            raise _DeferredError(
                f"the mail spool directory {directory} does not exist; create it or set local.mail_spool"
            ) from None
        except OSError as error:
            plain = f"{path} cannot be created ({_describe(error)})"
            fix = (
                f"cannot create {path}: {_describe(error)}; create it for the user"
                f" (install -m 600 -o {entry.pw_name} /dev/null {path}) or use a Maildir"
            )
            if error.errno in (errno.EACCES, errno.EPERM):
                raise _Uncreatable(fix, plain) from None
            raise _DeferredError(fix) from None
        try:
            os.fchmod(fd, 0o600)
            if _euid() == 0:
                os.fchown(fd, entry.pw_uid, -1)  # the group stays the directory's (mail on Debian)
        except OSError:
            os.close(fd)
            raise
        return fd
    if stat.S_ISLNK(info.st_mode):
        raise _DeferredError(
            f"{path} is a symbolic link; pymta does not follow it: replace it with a plain file"
        )
    _check_mbox(path, info, entry)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _DeferredError(f"{path} is a symbolic link; pymta does not follow it") from None
        raise _DeferredError(f"cannot open {path}: {_describe(error)}") from None
    try:
        _check_mbox(path, os.fstat(fd), entry)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_mbox(path: str, info: os.stat_result, entry: pwd.struct_passwd) -> None:
    fix = "so nothing is written; the admin should fix it (mail waits in the queue meanwhile)"
    if not stat.S_ISREG(info.st_mode):
        raise _DeferredError(f"{path} is not a regular file, {fix}")
    if info.st_nlink > 1:
        raise _DeferredError(f"{path} has {info.st_nlink} hard links, {fix}")
    if info.st_uid != entry.pw_uid:  # the mode too: whoever made it may have left it open to all
        owner = _user_name(info.st_uid)
        raise _DeferredError(
            f"{path} belongs to {owner}, not {entry.pw_name}, {fix}: chown {entry.pw_name} {path}"
            f" && chmod 600 {path}"
        )
    if info.st_mode & stat.S_IWOTH:
        raise _DeferredError(f"{path} may be written by anyone, {fix}: chmod 600 {path}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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
            raise _Locked(
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


def _append(fd: int, path: str, entry: bytes) -> None:
    """Append `entry` to the locked mbox; on any failure cut the file back to its size before and defer."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, 2, size - 2) if size >= 2 else os.pread(fd, size, 0)
    if tail and not tail.endswith(b"\n"):
        entry = b"\n\n" + entry  # end the last line, then the blank line before our From_ line
    elif size >= 2 and tail != b"\n\n":
        entry = b"\n" + entry  # the blank line before our From_ line
    try:
        _begin_writing()
        view = memoryview(entry)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as error:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as undo:
            raise _DeferredError(
                f"writing {path} failed ({_describe(error)}) and so did cutting it back ({_describe(undo)}):"
                " the mailbox may end in a partial message"
            ) from None
        full = " (disk full or over quota?)" if error.errno in _NO_SPACE else ""
        raise _DeferredError(
            f"writing {path} failed: {_describe(error)}{full}; the mailbox is unchanged"
        ) from None


# --- Maildir ---

_maildir_counter = itertools.count(1)


def _unique_name() -> str:
    """A Maildir file name no other delivery uses: time, microseconds, pid, a counter and the host name."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_maildir_counter)}.{host}"


def _deliver_maildir(maildir: str, data: bytes, entry: pwd.struct_passwd, *, create: bool) -> str:
    """Write `data` into the Maildir's new/ (through tmp/); the file's path in new/.

    Everything goes through descriptors of the checked directories (the user's own, not links), so the
    user, whose directories they are, cannot point a write elsewhere by swapping tmp/ or new/ for a link
    after the checks: a child with the mail spool's group would have written into /var/mail."""
    if create:
        _make_maildir(maildir, entry)
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
        raise _DeferredError(
            f"{directory} is missing: {maildir} is not a whole Maildir (cur, new, tmp)"
        ) from None
    except OSError:
        raise _DeferredError(
            f"{directory} is not a directory of {entry.pw_name}; the admin should fix it"
        ) from None
    if os.fstat(fd).st_uid != entry.pw_uid:
        os.close(fd)
        raise _DeferredError(f"{directory} is not a directory of {entry.pw_name}; the admin should fix it")
    return fd


def _write_maildir(maildir: str, data: bytes, entry: pwd.struct_passwd, tmp_fd: int, new_fd: int) -> str:
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
                _begin_writing()
                os.fchmod(fd, 0o600)
                if _euid() == 0:
                    os.fchown(fd, entry.pw_uid, entry.pw_gid)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd, follow_symlinks=False)
        except FileExistsError:
            _unlink_at(tmp_fd, name)
            continue
        except OSError as error:
            _unlink_at(tmp_fd, name)
            full = " (disk full or over quota?)" if error.errno in _NO_SPACE else ""
            raise _DeferredError(f"writing into {maildir} failed: {_describe(error)}{full}") from None
        os.unlink(name, dir_fd=tmp_fd)
        os.fsync(new_fd)
        return os.path.join(maildir, "new", name)
    raise _DeferredError(f"no unique file name in {maildir}/tmp after 10 tries")


def _make_maildir(maildir: str, entry: pwd.struct_passwd) -> None:
    """Create what is missing of the Maildir and its cur, new and tmp: 0700 whatever the umask."""
    for sub in ("", "tmp", "new", "cur"):
        directory = os.path.join(maildir, sub) if sub else maildir
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise _DeferredError(
                f"cannot create {directory}: its parent (the home directory?) is missing"
            ) from None
        # Through a descriptor: a symbolic link swapped in for the new directory is not followed.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
            if _euid() == 0:
                os.fchown(fd, entry.pw_uid, entry.pw_gid)
        finally:
            os.close(fd)


# --- Running as the recipient ---


def deliver_as_recipient(
    user: str,
    message: bytes,
    *,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float = LOCK_TIMEOUT,
) -> LocalOutcome:
    """`deliver`, with the recipient's rights.

    Mail for the process's own user is delivered in this process. As root, everyone's (root's own too) is
    delivered by a forked child that has dropped to the recipient (setgroups, setgid, setuid) and answers
    through a pipe, so the root process never opens a mailbox.
    Without root, anyone else's mail is deferred: writing their mailbox needs root. A mailbox that stayed
    locked is remembered for LOCKED_MEMORY seconds, and mail for it is deferred at once meanwhile.
    """
    entry = _user_entry(user)
    if isinstance(entry, LocalOutcome):
        return entry
    earlier = _found_locked.get(entry.pw_name)
    if earlier is not None and time.monotonic() - earlier[0] < LOCKED_MEMORY:
        age = time.monotonic() - earlier[0]
        reason = f"{earlier[1].reason} (so found {age:.0f} s ago in this run; not waiting again)"
        return LocalOutcome("deferred", reason, earlier[1].mailbox, locked=True)
    outcome = _deliver_with_rights(entry, message, sender, local, now, lock_timeout)
    if outcome.locked:
        _found_locked[entry.pw_name] = (time.monotonic(), outcome)
    else:
        _found_locked.pop(entry.pw_name, None)
    return outcome


# The mailboxes this process (one delivery run) found locked: user -> (time.monotonic(), the deferral).
_found_locked: dict[str, tuple[float, LocalOutcome]] = {}


def _deliver_with_rights(
    entry: pwd.struct_passwd, message: bytes, sender: str, local: Local, now: float, lock_timeout: float
) -> LocalOutcome:
    euid = _euid()
    if entry.pw_uid == euid != 0:  # root's own mailbox too is written by a child (pymta(1), PRIVILEGES)
        return _deliver(entry, message, sender, local, now, lock_timeout, in_child=False)
    if euid != 0:
        return LocalOutcome(
            "deferred",
            f"cannot deliver to {entry.pw_name}'s mailbox without root; run the flush as root (pymta setup)",
        )
    _create_mbox_as_root(entry, local)
    return _deliver_in_child(entry, message, sender, local, now, lock_timeout)


@contextmanager
def looking_as(uid: int, gid: int, groups: list[int]) -> Iterator[None]:
    """Root's effective ids and groups become another user's for a look at their files (through their
    links, with their rights), then root's again. The saved uid stays root's, which is what lets them come
    back; that user, whose uid is neither this process's real nor its saved one, cannot signal it."""
    own_groups, egid = os.getgroups(), os.getegid()
    os.setgroups(groups)
    try:
        os.setegid(gid)
        try:
            os.seteuid(uid)
            try:
                yield
            finally:
                os.seteuid(0)
        finally:
            os.setegid(egid)
    finally:
        os.setgroups(own_groups)


def _create_mbox_as_root(entry: pwd.struct_passwd, local: Local) -> None:
    """Create a missing mbox for the recipient (0600, theirs), as Postfix does as root, for a mail spool
    only root may create files in. O_EXCL and O_NOFOLLOW: whatever is there already, the child checks.
    Whether the mail goes to their Maildir instead is judged with their rights, as the child judges it:
    root following their link would tell them, by their mail's fate, what lies behind it."""
    if local.mailbox == "maildir":
        return
    if local.mailbox == "auto":
        with looking_as(entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)):
            if _uses_maildir(local, entry):
                return
    try:
        fd = os.open(os.path.join(local.mail_spool, entry.pw_name), _CREATE_FLAGS, 0o600)
    except OSError:
        return  # there already, or impossible: the child tells why when it matters
    try:
        os.fchmod(fd, 0o600)
        os.fchown(fd, entry.pw_uid, -1)  # the group stays the directory's (mail on Debian)
    finally:
        os.close(fd)


def _child_groups(entry: pwd.struct_passwd, local: Local) -> list[int]:
    """The recipient's groups, plus the mail spool directory's group when only that group may create files
    in it (Debian's /var/mail: root:mail 2775, the group mail readers' dotlock helpers run with). The child
    takes that group for a delivery to the mbox only (`_become_recipient`)."""
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    try:
        info = os.stat(local.mail_spool)
    except OSError:
        return sorted(groups)
    if info.st_mode & stat.S_IWGRP and not info.st_mode & stat.S_IWOTH and info.st_gid != 0:
        groups.add(info.st_gid)
    return sorted(groups)


def _deliver_in_child(
    entry: pwd.struct_passwd,
    message: bytes,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float,
) -> LocalOutcome:
    """Fork; the child drops to the recipient, delivers and writes the outcome (JSON) into a pipe."""
    # Looked up here: the child calls no name service.
    groups = (sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))), _child_groups(entry, local))
    read_end, write_end = os.pipe()
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads (the spool's reaper): the child
            # takes none of their locks (see _deliver_mbox) and ends with os._exit.
            warnings.filterwarnings("ignore", r".*fork\(\) may lead to deadlocks", DeprecationWarning)
            pid = os.fork()
    except OSError as error:
        os.close(read_end)
        os.close(write_end)
        return LocalOutcome("deferred", f"cannot start the delivery process for {entry.pw_name}: {error}")
    if pid == 0:  # pragma: no cover - runs in the child; its outcome is what the tests check
        status = 1
        try:
            os.close(read_end)
            status = _child(entry, groups, write_end, message, sender, local, now, lock_timeout)
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        answer, wait_status, killed = _watch_child(read_end, pid, lock_timeout)
    finally:
        os.close(read_end)
    name = entry.pw_name
    if killed:  # remembered like a locked mailbox: the rest of this run does not wait for it again
        return LocalOutcome(
            "deferred", f"the delivery process for {name} {killed}; will try again", locked=True
        )
    if answer is None:
        return LocalOutcome(
            "deferred", f"the delivery process for {name} did not answer ({exit_text(wait_status)})"
        )
    try:
        return LocalOutcome.from_json(answer.decode())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return LocalOutcome("deferred", f"the delivery process for {name} gave no usable answer")


def _child(
    entry: pwd.struct_passwd,
    groups: tuple[list[int], list[int]],
    answer_fd: int,
    message: bytes,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float,
) -> int:  # pragma: no cover - runs in the child
    """The child's work: drop to the recipient, deliver, answer. The exit status is 0 when it answered.

    `groups` are the recipient's own and those with the mail spool's group (`_child_groups`). Whether the
    mail goes to the Maildir is decided first, with the recipient's rights (their links, their view of the
    files), and only a delivery to the mbox takes the mail spool's group: with it, the recipient's Maildir,
    a link to the mail spool, would have the child create directories there. Such a child does not fall
    back to a Maildir either."""
    global _writing_fd
    try:
        own, with_spool_group = groups
        with looking_as(entry.pw_uid, entry.pw_gid, own):
            to_maildir = _uses_maildir(local, entry)
        os.setgroups(own if to_maildir else with_spool_group)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)  # as root this sets the real, effective and saved uid: no way back
        if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid or os.getegid() != entry.pw_gid:
            raise OSError(errno.EPERM, "the user switch did not take")
        os.umask(0o077)
        os.chdir("/")
        _writing_fd = answer_fd
        may_fall_back = to_maildir or sorted(with_spool_group) == sorted(own)
        outcome = _deliver(
            entry,
            message,
            sender,
            local,
            now,
            lock_timeout,
            in_child=True,
            to_maildir=to_maildir,
            may_fall_back=may_fall_back,
        )
    except BaseException as error:  # any surprise still answers, so the flush can log it and retry
        outcome = LocalOutcome("deferred", f"local delivery as {entry.pw_name} failed: {error}")
    data = memoryview(outcome.to_json().encode())
    while data:
        data = data[os.write(answer_fd, data) :]
    os.close(answer_fd)  # the parent sees the answer end before the exit
    return 0


# In a delivery child: the answer pipe, where `_begin_writing` tells the parent that the write begins.
_writing_fd: int | None = None
# What the child sends down the answer pipe before the write; from then its deadline is CHILD_WRITE_TIMEOUT.
_WRITING = b"W"


def _begin_writing() -> None:
    """In a delivery child with the mailbox in hand: tell the parent, once, that the write begins."""
    global _writing_fd
    if _writing_fd is not None:
        os.write(_writing_fd, _WRITING)
        _writing_fd = None


def child_time_limit(lock_timeout: float = LOCK_TIMEOUT) -> float:
    """Seconds a local delivery in a child may take at most, from the fork to its exit."""
    return lock_timeout + CHILD_START_TIMEOUT + CHILD_WRITE_TIMEOUT + CHILD_START_TIMEOUT


def _watch_child(fd: int, pid: int, lock_timeout: float) -> tuple[bytes | None, int, str]:
    """What the child writes into `fd` until it closes it (None: nothing), its wait status, and why it was
    killed ("" when it was not).

    It is killed when it is seen stopped (by the recipient, whose process it is: a stop sends nothing, so
    a silent child is looked at every CHILD_POLL_INTERVAL), when it has not begun to write within
    `lock_timeout + CHILD_START_TIMEOUT`, or not answered CHILD_WRITE_TIMEOUT after that. A child killed
    while it writes an mbox leaves what it wrote (see the module docstring)."""
    import select

    deadline = time.monotonic() + lock_timeout + CHILD_START_TIMEOUT
    data = b""
    while True:
        wait = max(min(CHILD_POLL_INTERVAL, deadline - time.monotonic()), 0)
        if select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, MAX_CHILD_ANSWER)
            if not chunk:
                break
            if not data.startswith(_WRITING) and (data + chunk).startswith(_WRITING):
                deadline = time.monotonic() + CHILD_WRITE_TIMEOUT
            data += chunk
            if len(data) > MAX_CHILD_ANSWER:
                return None, _kill(pid), "sent more than an answer and was killed"
            continue
        stopped = _stopped(pid)
        if stopped or time.monotonic() >= deadline:
            writing = data.startswith(_WRITING)
            why = stopped or (
                f"did not finish writing within {CHILD_WRITE_TIMEOUT:g} s"
                if writing
                else f"did not begin to write within {lock_timeout + CHILD_START_TIMEOUT:g} s"
            )
            cut = ": a copy of this message cut short may end the mailbox" if writing else ""
            return None, _kill(pid), f"{why} and was killed{cut}"
    return data.removeprefix(_WRITING) or None, _reap_child(pid), ""


def _reap_child(pid: int) -> int:
    """Wait for a child that has answered to exit; one stopped, or still there after CHILD_START_TIMEOUT,
    is killed (its answer stands). Its wait status."""
    deadline = time.monotonic() + CHILD_START_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if done and not os.WIFSTOPPED(status):
            return status
        if done or time.monotonic() >= deadline:
            return _kill(pid)
        time.sleep(CHILD_POLL_INTERVAL)


def _stopped(pid: int) -> str:
    """Why the child no longer runs, when it is stopped; else "". An exited child is left to be reaped."""
    found = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
    if found is not None and found.si_code == os.CLD_STOPPED:
        return f"was stopped (signal {found.si_status}: by the recipient, whose process it is)"
    return ""


def _kill(pid: int) -> int:
    """Kill the child and reap it; its wait status."""
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def exit_text(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"killed by signal {os.WTERMSIG(wait_status)}"
    return f"exit status {os.waitstatus_to_exitcode(wait_status)}"
