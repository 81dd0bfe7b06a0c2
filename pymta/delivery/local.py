"""Delivery into a local user's mailbox, the way mail(1), mutt and Python's `mailbox` expect it.

    outcome = deliver_as_recipient("alice", message, sender="root@host", local=config.local, now=time.time())

Where the mail goes: `~/Maildir` (config `local.maildir`, ~ is the recipient's home) when `local.mailbox` is
`maildir`, or `auto` and that directory exists; else the mbox `MAIL_SPOOL/USER` (`local.mail_spool`,
/var/mail). With `auto`, an mbox that is missing and that the user may not create (EACCES or EPERM: Debian's
/var/mail is root:mail 2775, and user mode has neither root nor the group) is not waited for: the Maildir is
created (cur, new, tmp, 0700) and the message goes there, and so does all later mail, since `auto` now finds
it; the delivery's reason says so, so the log tells it once. Every delivery begins with a
`Return-Path: <sender>` line (RFC 5321 4.4, final delivery) and has LF line endings (the message arrives in
SMTP form, CRLF). A large message is written as it is read from its queue file, block by block
(`writing.unix_lines`), by this process or the child, which inherits the file's descriptor; only the frame
that a split flush sends root holds it whole (`privsep`).

How an mbox is written and locked is `mbox`'s docstring; how a Maildir is, `maildir`'s.

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
/var/mail, the group mail readers' dotlock helpers have; then setgid, setuid: `privileges.become`) and
answers through a pipe. Fork without exec on purpose: it needs no interpreter readable by the recipient,
and the child (non-dumpable after setuid, so the user cannot inspect it) calls no name service and takes
no lock another thread may hold.
Without root, anyone else's mail is deferred with the fix ("run the flush as root"): that is user mode, where
the user's own mail goes to their own mailbox.

The child is the recipient's process, so the recipient may signal it, and the whole run waits for it. The
parent kills it, defers the delivery and, for the rest of the run, defers that user's mail at once (as for a
locked mbox) when it is seen stopped (a stop sends nothing, so a silent child is looked at every
CHILD_POLL_INTERVAL), when it has not begun to write within `lock_timeout + CHILD_START_TIMEOUT` (the child
says when it has the mailbox in hand), or has not answered CHILD_WRITE_TIMEOUT after that. A child killed
while appending to an mbox cannot cut the mbox back: the mailbox then ends in a copy of the message cut
short (readers show it as a truncated message; the next delivery starts on a line of its own) and the
child's dotlock stays until it is `mbox.STALE_DOTLOCK_AGE` old, deferring that user's mail meanwhile. The
message itself stays queued and is delivered whole by a later run. A Maildir keeps only a file in tmp/,
which readers ignore.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import select
import stat
import time
from collections.abc import Iterator

from pymta.config.model import Local
from pymta.delivery import writing
from pymta.delivery.maildir import deliver_maildir
from pymta.delivery.mbox import CREATE_FLAGS, LOCK_TIMEOUT, deliver_mbox, mbox_entry
from pymta.delivery.writing import DeferredError, LockedError, UncreatableError, clean, describe
from pymta.mail.text import Text
from pymta.privileges import (
    become,
    exit_text,
    fork_child,
    groups_of,
    kill,
    looking_as,
    lookup_user,
    reap,
    stopped,
)
from pymta.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.delivery.smtp.outcome import Status

# Seconds a delivery run remembers a mailbox it found locked (or whose delivery child it had to kill): later
# messages for that user are deferred at once instead of each waiting again, so one locked mbox does not
# stall the rest of the queue.
LOCKED_MEMORY = 300.0
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


@record(frozen=True, slots=True)
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


def deliver(
    user: str,
    message: bytes | Text,
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
    message: bytes | Text,
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
    return_path = b"Return-Path: <" + clean(sender).encode("utf-8", "surrogateescape") + b">\n"

    def data() -> Iterator[bytes]:  # LF line ends; a large message read from the queue file as it goes
        yield return_path
        yield from writing.unix_lines(message.blocks() if isinstance(message, Text) else (message,))

    maildir = _maildir_path(local, entry)
    use_maildir = _uses_maildir(local, entry) if to_maildir is None else to_maildir
    path = maildir if use_maildir else os.path.join(local.mail_spool, entry.pw_name)
    try:
        if use_maildir:
            name = deliver_maildir(maildir, data, entry, create=local.mailbox == "maildir")
            return LocalOutcome("delivered", f"delivered to {name}", maildir)
        deliver_mbox(path, lambda: mbox_entry(data(), sender, now), entry, lock_timeout, in_child=in_child)
        return LocalOutcome("delivered", f"delivered to {path}", path)
    except UncreatableError as why:
        if local.mailbox != "auto" or not may_fall_back:
            return LocalOutcome("deferred", str(why), path)
        return _fall_back_to_maildir(maildir, data, entry, why)
    except DeferredError as why:
        return LocalOutcome("deferred", str(why), path, locked=isinstance(why, LockedError))
    except OSError as error:
        return LocalOutcome("deferred", f"cannot deliver to {path}: {describe(error)}", path)


def _fall_back_to_maildir(
    maildir: str, data: writing.Pieces, entry: pwd.struct_passwd, why: UncreatableError
) -> LocalOutcome:
    """`mailbox: auto` and the mbox may not be created (Debian's /var/mail lets only root and the group
    mail create files; user mode has neither): create the user's Maildir and deliver there. From then on
    `auto` finds the Maildir, so this happens, and the reason says so, once."""
    try:
        name = deliver_maildir(maildir, data, entry, create=True)
    except DeferredError as also:
        return LocalOutcome("deferred", f"{why.plain}; and no Maildir instead: {also}", maildir)
    except OSError as error:
        reason = f"{why.plain}; and no Maildir instead: cannot create {maildir}: {describe(error)}"
        return LocalOutcome("deferred", reason, maildir)
    return LocalOutcome(
        "delivered",
        f"delivered to {name}: {why.plain}, so {maildir} was created, and {entry.pw_name}'s mail goes"
        " there from now on",
        maildir,
    )


def _uses_maildir(local: Local, entry: pwd.struct_passwd) -> bool:
    """Whether `entry`'s mail goes to their Maildir (else to their mbox in the mail spool)."""
    return local.mailbox == "maildir" or (
        local.mailbox == "auto" and os.path.isdir(_maildir_path(local, entry))
    )


def _maildir_path(local: Local, entry: pwd.struct_passwd) -> str:
    if local.maildir == "~" or local.maildir.startswith("~/"):
        return entry.pw_dir.rstrip("/") + local.maildir[1:]
    return local.maildir


# --- Running as the recipient ---


def deliver_as_recipient(
    user: str,
    message: bytes | Text,
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
    entry: pwd.struct_passwd,
    message: bytes | Text,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float,
) -> LocalOutcome:
    euid = writing.euid()
    if entry.pw_uid == euid != 0:  # root's own mailbox too is written by a child (pymta(1), PRIVILEGES)
        return _deliver(entry, message, sender, local, now, lock_timeout, in_child=False)
    if euid != 0:
        return LocalOutcome(
            "deferred",
            f"cannot deliver to {entry.pw_name}'s mailbox without root; run the flush as root (pymta setup)",
        )
    _create_mbox_as_root(entry, local)
    return _deliver_in_child(entry, message, sender, local, now, lock_timeout)


def _create_mbox_as_root(entry: pwd.struct_passwd, local: Local) -> None:
    """Create a missing mbox for the recipient (0600, theirs), as Postfix does as root, for a mail spool
    only root may create files in. O_EXCL and O_NOFOLLOW: whatever is there already, the child checks.
    Whether the mail goes to their Maildir instead is judged with their rights, as the child judges it:
    root following their link would tell them, by their mail's fate, what lies behind it."""
    if local.mailbox == "maildir":
        return
    if local.mailbox == "auto":
        with looking_as(entry.pw_uid, entry.pw_gid, groups_of(entry)):
            if _uses_maildir(local, entry):
                return
    try:
        fd = os.open(os.path.join(local.mail_spool, entry.pw_name), CREATE_FLAGS, 0o600)
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
    takes that group for a delivery to the mbox only (`_child`)."""
    groups = set(groups_of(entry))
    try:
        info = os.stat(local.mail_spool)
    except OSError:
        return sorted(groups)
    if info.st_mode & stat.S_IWGRP and not info.st_mode & stat.S_IWOTH and info.st_gid != 0:
        groups.add(info.st_gid)
    return sorted(groups)


def _deliver_in_child(
    entry: pwd.struct_passwd,
    message: bytes | Text,
    sender: str,
    local: Local,
    now: float,
    lock_timeout: float,
) -> LocalOutcome:
    """Fork; the child drops to the recipient, delivers and writes the outcome (JSON) into a pipe."""
    # Looked up here: the child calls no name service.
    groups = (sorted(set(groups_of(entry))), _child_groups(entry, local))
    read_end, write_end = os.pipe()

    def child() -> int:  # pragma: no cover - runs in the child; its outcome is what the tests check
        os.close(read_end)
        return _child(entry, groups, write_end, message, sender, local, now, lock_timeout)

    try:
        # The child takes no lock another thread may hold (see `mbox.deliver_mbox`).
        pid = fork_child(child, failed=1)
    except OSError as error:
        os.close(read_end)
        os.close(write_end)
        return LocalOutcome("deferred", f"cannot start the delivery process for {entry.pw_name}: {error}")
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
    message: bytes | Text,
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
    try:
        own, with_spool_group = groups
        with looking_as(entry.pw_uid, entry.pw_gid, own):
            to_maildir = _uses_maildir(local, entry)
        become(entry, own if to_maildir else with_spool_group)
        os.chdir("/")
        writing.announce_to(answer_fd)
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
    deadline = time.monotonic() + lock_timeout + CHILD_START_TIMEOUT
    data = b""
    while True:
        wait = max(min(CHILD_POLL_INTERVAL, deadline - time.monotonic()), 0)
        if select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, MAX_CHILD_ANSWER)
            if not chunk:
                break
            if not data.startswith(writing.WRITING) and (data + chunk).startswith(writing.WRITING):
                deadline = time.monotonic() + CHILD_WRITE_TIMEOUT
            data += chunk
            if len(data) > MAX_CHILD_ANSWER:
                return None, kill(pid), "sent more than an answer and was killed"
            continue
        why_stopped = stopped(pid)
        if why_stopped or time.monotonic() >= deadline:
            begun = data.startswith(writing.WRITING)
            why = why_stopped or (
                f"did not finish writing within {CHILD_WRITE_TIMEOUT:g} s"
                if begun
                else f"did not begin to write within {lock_timeout + CHILD_START_TIMEOUT:g} s"
            )
            cut = ": a copy of this message cut short may end the mailbox" if begun else ""
            return None, kill(pid), f"{why} and was killed{cut}"
    # One stopped, or still there after CHILD_START_TIMEOUT, is killed; its answer stands.
    return data.removeprefix(writing.WRITING) or None, reap(pid, CHILD_START_TIMEOUT), ""
