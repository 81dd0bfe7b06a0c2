"""The pick-up gate: what moves a committed submission from new/ into queue/, and what it refuses.

Only what the kernel says is trusted (the owner and type of a file, seen on its descriptor); every envelope
field of another user's drop is checked for its type and range (`validate_drop`) before anything reads it,
its sender is judged against its owner (`sender_policy`), a user over `max_queued_per_user` waits in new/,
and no run looks at more than `MAX_PICKUP_PER_USER` drops of one user. A drop that is not what sendmail
writes costs only itself: it is moved to corrupt/ for the admin (invariants 10 and 11).

The layout is in `pymta.queue.spool`'s docstring, the commit protocol that fills new/ in
`pymta.queue.commit`'s.
"""

from __future__ import annotations

import errno
import os
import time
from stat import S_ISDIR, S_ISREG

from pymta.fsutil import read_all
from pymta.mail.address import has_control
from pymta.queue.directory import (
    READ_FLAGS,
    SpoolDirectory,
    encode_json,
    fsync_dir,
    is_queue_id,
    quoted,
)
from pymta.queue.entry import ENVELOPE_VERSION, MAX_ENVELOPE_LINE, parse_envelope, time_field, uid_from_head

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from pymta.config.identity import SenderPolicy

# The longest address a drop may name (sender or recipient): RFC 5322's line limit, far past what SMTP carries
# (256 octets a path), so nothing sendmail accepts is refused here.
MAX_ADDRESS = 998
# Drops of one user the pick-up looks at in one run, beside root's and the spool owner's: 300,000 files
# dropped straight into new/ cost each run a bounded amount of work, and the rest waits for later runs.
MAX_PICKUP_PER_USER = 1000


class PickUp(SpoolDirectory):
    """The pick-up of a spool (`pymta.queue.spool.Spool` is one)."""

    limit_warned: set[int]  # uids told about max_queued_per_user by this object's pick-ups

    def pick_up(
        self,
        max_size: int,
        report: Callable[[str], None],
        *,
        sender_policy: SenderPolicy | None = None,
        max_queued_per_user: int | None = None,
    ) -> list[str]:
        """Move committed submissions from new/ into queue/ and return their ids.

        Only what the kernel says is trusted: a file is opened with O_NOFOLLOW and checked on its descriptor
        (a regular file with one link, at most `max_size` bytes of message); our own, of which nothing is
        read, is checked by an lstat. A submission owned by us (user mode) is linked into place; one owned
        by another user (system mode) is copied into a file of ours, with `submitted_by` and `uid` taken
        from the file's owner, so its writer can change it no longer; no more than `max_size` and the
        envelope allowance of it is read, however it grows meanwhile, and every envelope field is checked
        before it is used (`validate_drop`). Links, FIFOs and devices are
        removed; unreadable, invalid or oversized files, names that are no queue id, and a file whose
        pick-up fails in any other way are moved to corrupt/ (ARCHITECTURE.md 10, 11); each gets
        one `report` line, with the name quoted (`quoted`). No more than `MAX_PICKUP_PER_USER` files of one
        user (root and the spool's owner aside) are looked at in one call.

        `sender_policy` (the flush passes the config's; None checks nothing) judges the envelope sender of
        another user's submission against its owner (`pymta.config.identity`): a foreign sender gets an
        X-Authentication-Warning field at the top of the stored message, or under `sender_policy: strict`
        the file is moved to corrupt/.

        `max_queued_per_user` (None: no limit): a submission of a user other than root and the spool's
        owner who has that many messages in queue/ already is left in new/ as it is, and picked up by a
        later run once the queue has room; one `report` line per user says how many wait (once per Spool
        object, that is per flush run). The queue is counted only when such a submission turns up, from
        the first bytes of each queued file (`queued_per_uid`); a file's owner comes from the fstat of its
        descriptor (opened without waiting or following a link), so a user over the limit costs an open
        and nothing of theirs is read.

        What each file costs is kept to what it needs: a file of our own (user mode, and the flush's own
        notices) is looked at with one lstat by name and not opened, since nothing of it is read here; it
        is linked into queue/ without looking for queue/NAME first (the link fails with EEXIST rather than
        replace it), and looked for there only when it has a second name (the link of a pick-up killed
        before its unlink). A rename would not be cheaper: it must look for queue/NAME first, since it
        would replace it, and on ext4 and tmpfs a rename costs what the link and the unlink cost.
        """
        limit = _QueueLimit(self, max_queued_per_user) if max_queued_per_user is not None else None
        budget = PickUpBudget(self)

        def admits(uid: int) -> bool:
            return budget.admits(uid) and (limit is None or limit.admits(uid))

        euid = os.geteuid()  # asked once: the run's user does not change while it picks up
        new, queue = os.path.join(self.dir("new"), ""), self.queue_prefix
        picked = []
        for name in sorted(self._names("new")):
            source = new + name
            try:
                if self._pick_up_one(
                    name, source, queue + name, max_size, report, sender_policy, limit, admits, euid
                ):
                    picked.append(name)
            except FileNotFoundError:
                continue
            except OSError as exc:  # one user's odd file must not stop everyone's mail
                report(
                    f"cannot pick up new/{quoted(name)}: {exc.strerror or exc}; left in place for the admin"
                )
            except Exception as exc:  # noqa: BLE001 - whatever a drop does to us, it costs only itself
                why = f"it made the pick-up fail ({type(exc).__name__})"
                try:
                    self._set_aside(name, source, why, report)
                except OSError:
                    report(f"cannot pick up new/{quoted(name)}: {why}; left in place for the admin")
        if picked:
            fsync_dir(self.dir("queue"))
            fsync_dir(self.dir("new"))
        if limit is not None:
            limit.report(report)
        budget.report(report)
        return picked

    def queued_per_uid(self) -> dict[int, int]:
        """How many messages in queue/ each submitting uid has, as the envelopes record it.

        Cheap on a large queue: the pick-up and `submit` write the uid right after the version, so 64 bytes
        of a file tell it; only a file written otherwise (by an older pymta) has its envelope read.
        """
        counts: dict[int, int] = {}
        try:
            directory = os.open(self.dir("queue"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return counts
        try:
            for name in self._names("queue"):
                try:
                    fd = os.open(name, READ_FLAGS, dir_fd=directory)
                except OSError:
                    continue
                try:
                    head = os.pread(fd, 64, 0)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                uid = uid_from_head(head)
                if uid is None:
                    try:
                        uid = self.read_entry("queue", name).uid
                    except (OSError, ValueError):
                        continue
                counts[uid] = counts.get(uid, 0) + 1
        finally:
            os.close(directory)
        return counts

    def _pick_up_one(
        self,
        name: str,
        source: str,
        target: str,
        max_size: int,
        report: Callable[[str], None],
        sender_policy: SenderPolicy | None,
        limit: _QueueLimit | None,
        admits: Callable[[int], bool],
        euid: int,
    ) -> bool:
        """Pick up new/NAME (`source`) into queue/NAME (`target`): True when it was, False when it was
        refused, set aside or left waiting (`admits(uid)` says whether its owner's drops are taken now).
        `euid` is the run's own uid."""
        try:
            seen = os.lstat(source)
        except FileNotFoundError:
            raise
        except OSError:
            seen = None  # the open below meets the same and says what it is
        # Our own regular file with one name (every drop in user mode): nothing of it is read, so the lstat
        # tells all there is to check, and only a file of ours could replace it under that name (new/ is
        # ours, or sticky). Anything else is opened and checked on its descriptor below.
        if seen is not None and seen.st_uid == euid and seen.st_nlink == 1 and S_ISREG(seen.st_mode):
            if not admits(euid):
                return False
            return self._take_own(name, source, target, seen.st_size, max_size, report)
        try:
            fd = os.open(source, READ_FLAGS)
        except FileNotFoundError:
            raise
        except OSError as exc:
            # Who dropped what cannot be opened, from a stat by name: a user over their quota or this
            # run's budget gets no line and keeps the file.
            seen = os.lstat(source)
            if not admits(seen.st_uid):
                return False
            if exc.errno == errno.ELOOP:
                os.unlink(source)
                report(f"refused new/{quoted(name)}: a symbolic link; removed")
                return False
            if exc.errno == errno.EACCES:  # mode 000, or a hard link to someone else's private file
                if seen.st_nlink != 1:
                    os.unlink(source)
                    report(
                        f"refused new/{quoted(name)}: a hard link ({seen.st_nlink} names)"
                        " that we may not read; removed"
                    )
                else:
                    self._set_aside(name, source, "it cannot be read (its mode lets nobody read it)", report)
                return False
            raise
        try:
            # Who dropped it, from its descriptor: a user over their quota or this run's budget costs an
            # open (without waiting, following no link) and nothing of theirs is read.
            info = os.fstat(fd)
            if not admits(info.st_uid):
                return False
            # A pick-up killed after it took the file and before it removed it from new/ left queue/NAME
            # behind: our own file linked there (a second name), another user's copied (a file of ours).
            if (info.st_uid != euid or info.st_nlink != 1) and self._picked_up_already(
                name, target, info, euid
            ):
                os.unlink(source)
                report(
                    f"new/{name} was picked up already (a pick-up stopped between taking it and removing it "
                    "from new/); removed from new/"
                )
                return False
            refusal = ""
            if not S_ISREG(info.st_mode):
                refusal = "not a regular file (a FIFO, device or directory)"
            elif info.st_nlink != 1:
                refusal = f"a hard link ({info.st_nlink} names)"
            if refusal:
                if S_ISDIR(info.st_mode):
                    report(f"refused new/{quoted(name)}: {refusal}; left in place for the admin")
                else:
                    os.unlink(source)
                    report(f"refused new/{quoted(name)} of uid {info.st_uid}: {refusal}; removed")
                return False
            if info.st_uid == euid:  # became ours and plain since the lstat above
                return self._take_own(name, source, target, info.st_size, max_size, report)
            if not is_queue_id(name):
                self._set_aside(
                    name, source, "its name is not a queue id (sendmail did not write it)", report
                )
                return False
            if info.st_size > max_size + MAX_ENVELOPE_LINE:
                self._set_aside(name, source, f"{info.st_size} bytes, over max_message_size", report)
                return False
            if os.path.lexists(target):
                self._set_aside(name, source, "a queued message has this id already", report)
                return False
            # Never more than a drop may hold: its writer may grow it after the fstat above (M1).
            data = read_all(fd, limit=max_size + MAX_ENVELOPE_LINE + 1)
        finally:
            os.close(fd)
        line, newline, message = data.partition(b"\n")
        try:
            if len(data) > max_size + MAX_ENVELOPE_LINE or len(message) > max_size:
                raise ValueError(f"over max_message_size ({max_size} bytes)")
            if not newline:
                raise ValueError("no envelope line: not a pymta queue file")
            claimed = validate_drop(parse_envelope(line), time.time())
        except ValueError as exc:
            self._set_aside(name, source, str(exc), report)
            return False
        import pwd

        try:
            owner = pwd.getpwuid(info.st_uid).pw_name
        except KeyError:
            owner = f"uid{info.st_uid}"
        # The file's owner and name are the kernel's word; what the envelope claims about them is not.
        # The uid goes right after the version, where `queued_per_uid` reads it.
        envelope = {"v": ENVELOPE_VERSION, "uid": info.st_uid, "id": name, "submitted_by": owner, **claimed}
        if sender_policy is not None:
            refusal, message = sender_policy.check_drop(owner, str(claimed["sender"]), message)
            if refusal:
                self._set_aside(name, source, refusal, report)
                return False
        try:
            self._write_private(
                target, encode_json(envelope).encode("ascii") + b"\n" + message, replace=False
            )
        except FileExistsError:
            self._set_aside(name, source, "a queued message has this id already", report)
            return False
        os.unlink(source)
        if limit is not None:
            limit.took(info.st_uid)
        return True

    def _take_own(
        self, name: str, source: str, target: str, size: int, max_size: int, report: Callable[[str], None]
    ) -> bool:
        """Move our own submission new/NAME (`source`, a regular file of `size` bytes with one name) into
        queue/NAME (`target`): True when it was, False when it was set aside. Nobody else could have written
        it. Moved as it is (link, then unlink: never over an existing name, whose link fails with EEXIST,
        so nothing looks for it first); an unreadable envelope is found, and set aside, when the message
        is loaded for delivery."""
        if not is_queue_id(name):
            self._set_aside(name, source, "its name is not a queue id (sendmail did not write it)", report)
            return False
        if size > max_size + MAX_ENVELOPE_LINE:
            self._set_aside(name, source, f"{size} bytes, over max_message_size", report)
            return False
        try:
            os.link(source, target, follow_symlinks=False)
        except FileExistsError:
            self._set_aside(name, source, "a queued message has this id already", report)
            return False
        os.unlink(source)
        return True

    def _picked_up_already(self, name: str, target: str, info: os.stat_result, euid: int) -> bool:
        """Whether new/NAME (`info`) is a submission that queue/NAME (`target`) holds already: a pick-up
        killed after it linked (user mode: the same file) or copied it (system mode: a file of ours
        recording the same uid) into queue/ and before it unlinked it from new/. The next flush then
        removes it from new/, so it is delivered once (issue 11, item 8). `euid` is the run's own uid."""
        if not is_queue_id(name) or not S_ISREG(info.st_mode):
            return False
        try:
            fd = os.open(target, READ_FLAGS)
        except OSError:
            return False
        try:
            queued = os.fstat(fd)
            if (queued.st_dev, queued.st_ino) == (info.st_dev, info.st_ino):
                return True
            return (
                info.st_nlink == 1
                and queued.st_uid == euid != info.st_uid
                and uid_from_head(os.pread(fd, 64, 0)) == info.st_uid
            )
        finally:
            os.close(fd)


class _QueueLimit:
    """`max_queued_per_user` during one pick-up: which uids it applies to, how many each has queued (counted
    once, when the first submission it applies to turns up), and how many of theirs were left waiting."""

    def __init__(self, spool: PickUp, limit: int) -> None:
        self.spool = spool
        self.limit = limit
        try:
            owner = os.stat(spool.dir("queue")).st_uid
        except OSError:
            owner = os.geteuid()
        self.exempt = {0, os.geteuid(), owner}  # root and the spool's owner: the admins
        self.counts: dict[int, int] | None = None
        self.waiting: dict[int, int] = {}

    def admits(self, uid: int) -> bool:
        """Whether a submission of `uid` may be picked up now."""
        if uid in self.exempt:
            return True
        if self.counts is None:
            self.counts = self.spool.queued_per_uid()
        if self.counts.get(uid, 0) < self.limit:
            return True
        self.waiting[uid] = self.waiting.get(uid, 0) + 1
        return False

    def took(self, uid: int) -> None:
        """A submission of `uid` was picked up: it counts from now on."""
        if self.counts is not None and uid not in self.exempt:
            self.counts[uid] = self.counts.get(uid, 0) + 1

    def report(self, report: Callable[[str], None]) -> None:
        """One line per user left waiting, once per Spool object (a flush run may pick up several times)."""
        import pwd

        for uid, waiting in sorted(self.waiting.items()):
            if uid in self.spool.limit_warned:
                continue
            self.spool.limit_warned.add(uid)
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = f"uid{uid}"
            queued = (self.counts or {}).get(uid, 0)
            report(
                f"user {name} (uid {uid}) is over max_queued_per_user ({queued} queued): "
                f"{waiting} message{'s' if waiting != 1 else ''} wait{'s' if waiting == 1 else ''} in new/"
            )


class PickUpBudget:
    """`MAX_PICKUP_PER_USER` during one pick-up: how many drops of each user it looked at, and how many of
    theirs it left for a later run. Root and the spool's owner (the admins, and the flush's own notices)
    have no budget."""

    def __init__(self, spool: PickUp) -> None:
        self.spool = spool
        self.exempt = {0, os.geteuid()}
        self.seen: dict[int, int] = {}
        self.left: dict[int, int] = {}

    def admits(self, uid: int) -> bool:
        if uid in self.exempt:
            return True
        seen = self.seen.get(uid, 0)
        if seen < MAX_PICKUP_PER_USER:
            self.seen[uid] = seen + 1
            return True
        self.left[uid] = self.left.get(uid, 0) + 1
        return False

    def report(self, report: Callable[[str], None]) -> None:
        """One line per user with drops left alone."""
        for uid, left in sorted(self.left.items()):
            report(
                f"uid {uid} has more than {MAX_PICKUP_PER_USER} files in new/: {left} are left for later "
                "(a run looks at no more of one user's)"
            )


# The fields sendmail writes into a drop; a drop naming any other is not sendmail's.
_DROP_FIELDS = frozenset(
    ("v", "uid", "id", "submitted_by", "sender", "recipients", "full_name", "queued_at")
    + ("notify", "ret", "envid", "body_type")
)
_NOTIFY_WORDS = frozenset(("success", "failure", "delay"))
_CHOICES = {"ret": ("hdrs", "full"), "body_type": ("7BIT", "8BITMIME")}


def validate_drop(envelope: dict[str, object], now: float) -> dict[str, object]:
    """The fields of another user's drop the pick-up keeps, each checked for its type and range as sendmail
    writes it (`sendmail.submit`); ValueError naming the first that is not. `v`, `uid`, `id` and
    `submitted_by` are left out: the kernel tells them. A `queued_at` after `now` becomes `now`.

    Everything the queue's readers convert later (a time to a date, an address to a command) is checked
    here, so a hand-made drop costs only itself (ARCHITECTURE.md, invariant 10)."""
    for key in envelope:
        if key not in _DROP_FIELDS:
            raise ValueError(f"envelope field {quoted(key)} is not one sendmail writes")
    sender = envelope.get("sender")
    if not isinstance(sender, str):
        raise ValueError("envelope field 'sender' is not text")
    if sender and (problem := _address_problem(sender)):
        raise ValueError(f"envelope field 'sender' {problem}")
    recipients = envelope.get("recipients")
    if not isinstance(recipients, list) or not recipients:
        raise ValueError("envelope has no recipient list")
    for address in recipients:
        if not isinstance(address, str):
            raise ValueError("envelope field 'recipients' holds something that is not text")
        if problem := _address_problem(address):
            raise ValueError(f"envelope field 'recipients' holds an address that {problem}")
    full_name = envelope.get("full_name", "")
    if not isinstance(full_name, str):
        raise ValueError("envelope field 'full_name' is not text")
    queued_at = time_field(envelope, "queued_at", -1.0)
    for key, allowed in _CHOICES.items():
        if envelope.get(key) not in (None, *allowed):
            raise ValueError(f"envelope field {key!r} is not one of {', '.join(allowed)}")
    if envelope.get("notify") is not None and not is_notify(envelope["notify"]):
        raise ValueError("envelope field 'notify' is not 'never' or a list of success, failure, delay")
    if envelope.get("envid") is not None and not is_envid(envelope["envid"]):
        raise ValueError("envelope field 'envid' is not 1 to 100 printable ASCII characters")
    kept = {key: value for key, value in envelope.items() if key not in ("v", "uid", "id", "submitted_by")}
    kept["queued_at"] = min(queued_at, now)
    return kept


def is_notify(value: object) -> bool:
    """Whether `value` is a `notify` field as sendmail writes it (-N): 'never', or success, failure and delay
    joined by commas."""
    return isinstance(value, str) and (
        value == "never" or (bool(value) and set(value.split(",")) <= _NOTIFY_WORDS)
    )


def is_envid(value: object) -> bool:
    """Whether `value` is an `envid` field as sendmail takes it (-V): 1 to 100 printable ASCII characters
    without spaces."""
    return isinstance(value, str) and 0 < len(value) <= 100 and all("!" <= char <= "~" for char in value)


def _address_problem(text: str) -> str | None:
    """Why `text` cannot be an envelope address, or None: it is empty, too long, or holds a control
    character (one would forge a line of a mailbox, a header or an SMTP command)."""
    if not text:
        return "is empty"
    if len(text) > MAX_ADDRESS:
        return f"is longer than {MAX_ADDRESS} characters"
    if has_control(text):
        return "holds a control character (header injection?)"
    return None
