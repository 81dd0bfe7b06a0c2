"""Per-user views of the queue in system mode: what each user may see of it, published by the flush.

In system mode the queue (queue/, 0700) belongs to the spool's owner, so an ordinary user cannot list it, and
must not: another user's mail is none of theirs (invariant 6). So at the end of each delivery run
the flush, started as root, writes for every user with messages waiting a file that only that user can read:

    status/       0711  root                users reach their own view by name but cannot list the others
    status/UID    0400  UID                 the messages submitted by UID (as the kernel says: the owner of
                                            the dropped file), as JSON lines

A view is a header line, `{"v": 1, "uid": UID, "count": N, "published": UNIX TIME, "limit": L}` (`limit` is
`max_queued_per_user`, null for none), then one line per message holding the object `pymta queue --json`
prints for it (`pymta.queue.contract.entry_to_json`), oldest first. Drops still waiting in new/ count and are
listed.
A user with no message left has no view: no file means no messages, as of the last run.

Readers: `mailq` and `pymta queue` read the user's own view when they cannot read the queue (`read_view`);
`sendmail` reads only the header's count and time (without json), and adds the user's drops since then
from their own ledger in tmp/ (`hold_quota`), to refuse a submission over `max_queued_per_user` before
anything is queued. A view is a copy for its user's eyes: a user who edits their
own (they own it) fools only themselves; the pick-up counts the queue itself (`Spool.pick_up`).

How a view is written, as root inside a spool its owner can change, so that owner can never make root write
anywhere else: status/ is opened once from the spool's descriptor, without following a link, and every
name is resolved relative to that descriptor; a view is written to a new random name (O_CREAT | O_EXCL |
O_NOFOLLOW: never an existing name, which could be a planted hard link to /etc/shadow), given its owner and
mode through the descriptor, fsynced, and renamed over status/UID. A crash leaves the old view, or a
`.new-*` file that a later run removes.

status/ is root's, not the spool owner's: the uid of a picked-up message is what the pick-up (as the spool's
owner) recorded, so a compromised owner could have root write a view owned by any uid. In a directory of
its own that file would be the owner's to rename or link anywhere on the file system, a file of that uid
with contents the owner chose; in root's status/ it stays where it is, a view nobody but that uid reads.
A status/ that the spool's owner made (an older install, or the owner replaced root's) is taken over
through its descriptor: given to root, mode 0711.

The queue itself is read with the spool owner's rights (seteuid, then back to root): what the owner could
plant there (a link to a file of root's) is unreadable to the reader too. Users can still learn from
status/ that a view exists for a uid and its size (stat needs no read right); not its content.

`sendmail` imports this module: it imports only os at module level, and of the queue only what the spool
loads already (and the small `contract`).
"""

from __future__ import annotations

import os

from pymta.fsutil import open_directory
from pymta.queue.contract import entry_to_json
from pymta.queue.directory import SpoolDirectory, write_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging

    from pymta.config.model import Config
    from pymta.queue.entry import QueueEntry
    from pymta.queue.spool import Spool

STATUS_DIR = "status"
STATUS_MODE = 0o711
VIEW_MODE = 0o400
VIEW_VERSION = 1
# Bytes of a view read back; one user's messages at a few hundred bytes each stay far below it.
MAX_VIEW_SIZE = 64 * 1024 * 1024
# Bytes sendmail reads for the header line (it is about 90).
HEADER_READ = 512
# A view being written; a run killed meanwhile leaves it behind, and a later run removes it once this old.
TMP_PREFIX = ".new-"
STALE_TMP_AGE = 3600.0

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# --- writing (the flush, as root) ---


def publish(spool: Spool, config: Config, logger: logging.Logger) -> None:
    """Write status/UID for every user with messages in the queue; remove the views of users without.

    Does something only as root (euid 0) on a system spool (queue/ belongs to another user); anywhere else
    there is nobody to publish for. Reads each queued envelope (and state) once. Never raises: a view that
    cannot be written is a warning in the log, as the delivery run it ends has done its work.
    """
    if os.geteuid() != 0:
        return
    import time

    started = time.monotonic()
    try:
        spool_fd = os.open(spool.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        logger.warning(f"cannot publish the users' queue views: {spool.path}: {exc.strerror or exc}")
        return
    try:
        try:
            queue = os.stat("queue", dir_fd=spool_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        import stat

        if not stat.S_ISDIR(queue.st_mode) or queue.st_uid == 0:
            return  # not a system spool: every message is root's own
        try:
            status_fd = _open_status_dir(spool_fd, queue)
        except OSError as exc:
            where = os.path.join(spool.path, STATUS_DIR)
            logger.warning(
                f"cannot publish the users' queue views in {where}: {exc.strerror or exc}; "
                "run 'pymta setup --check'"
            )
            return
        try:
            written = _publish_in(status_fd, spool, queue, config, logger)
        except OSError as exc:
            logger.warning(f"cannot publish the users' queue views: {exc.strerror or exc}")
            return
        finally:
            os.close(status_fd)
    finally:
        os.close(spool_fd)
    logger.debug(f"published the queue views of {written} users in {time.monotonic() - started:.3f}s")


def _open_status_dir(spool_fd: int, queue: os.stat_result) -> int:
    """status/ as a descriptor: created if missing, never a link, owned by root, mode 0711 (one the spool's
    owner made is taken over)."""
    import stat

    try:
        os.mkdir(STATUS_DIR, 0o700, dir_fd=spool_fd)
    except FileExistsError:
        pass
    fd = open_directory(STATUS_DIR, spool_fd, lookup_only=False)  # it is fchowned and fchmodded
    try:
        info = os.fstat(fd)
        if info.st_uid not in (0, queue.st_uid):
            raise PermissionError(
                f"it belongs to uid {info.st_uid}, neither root nor the spool's owner (uid {queue.st_uid})"
            )
        if (info.st_uid, info.st_gid) != (0, 0):
            os.fchown(fd, 0, 0)
        if stat.S_IMODE(info.st_mode) != STATUS_MODE or info.st_uid != 0:
            os.fchmod(fd, STATUS_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def viewer(entry: QueueEntry, spool_owner: int) -> int | None:
    """The user whose view shows `entry`: who submitted it, as the kernel says; None for root, the spool's
    owner (both read the queue itself) and what nobody submitted (a bounce the flush wrote).

    In new/ that is the file's owner. In queue/ it is the uid the pick-up recorded, believed only in a file
    the spool's owner wrote: anything else there (a link to another file) is nobody's.
    """
    if entry.location == "new":
        uid = entry.owner_uid
    elif entry.owner_uid == spool_owner:
        uid = entry.uid
    else:
        return None
    return uid if uid > 0 and uid != spool_owner else None


def entries_as(spool: Spool, uid: int, gid: int) -> list[QueueEntry]:
    """The spool's entries, read by root with the rights of its owner `uid` and `gid` (effective ids, no
    groups) rather than root's: a link the owner planted in queue/ or state/ to a file of root's is then
    unreadable, as it is for the owner itself. Root's ids are back before this returns (the saved uid stays
    0 throughout)."""
    from pymta.privileges import looking_as  # lazy: sendmail imports this module; only root's publish looks

    with looking_as(uid, gid, []):
        entries, _ = spool.entries()  # unreadable entries are the flush's to report, not ours
    return entries


def _view_lines(spool: Spool, owner: int, group: int) -> dict[int, list[str]]:
    """The `entry_to_json` line of each message that is in a user's view, by that user: the queue read one
    message at a time with the rights of its owner (as `entries_as` does), so that of 100,000 messages
    only the lines of those users submitted are held, never the messages. Root's ids are back before this
    returns."""
    import json

    from pymta.privileges import looking_as  # lazy: as in entries_as

    lines: dict[int, list[str]] = {}
    with looking_as(owner, group, []):
        for entry in spool.scan():
            if isinstance(entry, str):
                continue  # unreadable: the flush's to report, not ours
            uid = viewer(entry, owner)
            if uid is not None:
                lines.setdefault(uid, []).append(json.dumps(entry_to_json(entry)))
    return lines


def _publish_in(
    status_fd: int, spool: Spool, queue: os.stat_result, config: Config, logger: logging.Logger
) -> int:
    import json
    import time

    lines = _view_lines(spool, queue.st_uid, queue.st_gid)
    published = time.time()
    written = 0
    for uid, messages in lines.items():
        header = {
            "v": VIEW_VERSION,
            "uid": uid,
            "count": len(messages),
            "published": round(published, 3),
            "limit": config.max_queued_per_user,
        }
        data = "\n".join([json.dumps(header), *messages, ""]).encode("utf-8")
        try:
            _write_view(status_fd, uid, data)
            written += 1
        except OSError as exc:
            logger.warning(f"cannot write the queue view of uid {uid}: {exc.strerror or exc}")
    _remove_others(status_fd, set(lines), published, logger)
    return written


def _write_view(status_fd: int, uid: int, data: bytes) -> None:
    """status/UID replaced by `data`, owned by UID, mode 0400: through a new name, never an existing one."""
    import pwd

    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = -1  # no passwd entry: root's group stays, and mode 0400 gives it nothing
    for _ in range(8):
        tmp_name = f"{TMP_PREFIX}{os.urandom(8).hex()}"
        try:
            fd = os.open(tmp_name, _CREATE_FLAGS, 0o600, dir_fd=status_fd)
            break
        except FileExistsError:
            continue  # planted by the directory's owner, or chance: another name
    else:
        raise FileExistsError(f"no free name for a new view in {STATUS_DIR}/")
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, VIEW_MODE)
            os.fchown(fd, uid, gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_name, str(uid), src_dir_fd=status_fd, dst_dir_fd=status_fd)
    except BaseException:
        try:
            os.unlink(tmp_name, dir_fd=status_fd)
        except OSError:
            pass
        raise


def _remove_others(status_fd: int, current: set[int], now: float, logger: logging.Logger) -> None:
    """Remove the views of users with no message left, and views a killed run left half-written."""
    try:
        with os.scandir(status_fd) as listing:
            names = [(item.name, item) for item in listing]
    except OSError as exc:
        logger.warning(f"cannot list {STATUS_DIR}/ to remove old queue views: {exc.strerror or exc}")
        return
    for name, item in names:
        try:
            if name.isascii() and name.isdigit():
                if int(name) in current:
                    continue
            elif not (
                name.startswith(TMP_PREFIX)
                and now - item.stat(follow_symlinks=False).st_mtime > STALE_TMP_AGE
            ):
                continue
            os.unlink(name, dir_fd=status_fd)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning(f"cannot remove the old queue view {STATUS_DIR}/{name}: {exc.strerror or exc}")


# --- reading (sendmail, mailq, pymta queue, as the user) ---


def view_path(spool_path: str, uid: int) -> str:
    return os.path.join(spool_path, STATUS_DIR, str(uid))


def queued_count(spool_path: str, uid: int) -> int:
    """How many messages the view of `uid` lists, from its header line alone (0 without a view, or when it
    cannot be read). For sendmail: no json."""
    return _view_header(spool_path, uid)[0]


def _view_header(spool_path: str, uid: int) -> tuple[int, float]:
    """The count and the publication time of the view of `uid`, from its header line ((0, 0.0) without a
    view, or when it cannot be read)."""
    try:
        fd = os.open(view_path(spool_path, uid), _READ_FLAGS)
    except OSError:
        return 0, 0.0
    try:
        head = os.read(fd, HEADER_READ)
    except OSError:
        return 0, 0.0
    finally:
        os.close(fd)
    line = head.partition(b"\n")[0]
    count = _header_number(line, b'"count":')
    return int(count), _header_number(line, b'"published":')


def _header_number(line: bytes, key: bytes) -> float:
    at = line.find(key)
    if at < 0:
        return 0
    digits = line[at + len(key) :].lstrip(b" ")
    end = len(digits) - len(digits.lstrip(b"0123456789."))
    try:
        return float(digits[:end]) if end else 0
    except ValueError:
        return 0


def quota_refusal(spool_path: str, uid: int, limit: int | None) -> str | None:
    """Why `uid` may not queue another message now, or None when it may (`hold_quota`, looking only)."""
    hold = hold_quota(spool_path, uid, limit)
    hold.release()
    return hold.refusal


class QuotaHold:
    """What `hold_quota` found: why no message may be queued now (or None), and the user's drop ledger,
    locked until `release`, for `record`."""

    __slots__ = ("refusal", "_ledger")

    def __init__(self, refusal: str | None, ledger: int | None) -> None:
        self.refusal = refusal
        self._ledger = ledger

    def record(self, queue_id: str, now: float) -> None:
        """Add the drop just committed to the ledger, so the next submission counts it."""
        if self._ledger is not None:
            try:
                os.write(self._ledger, f"{queue_id} {now:.3f}\n".encode("ascii"))
            except OSError:
                pass  # the pick-up counts it all the same

    def release(self) -> None:
        if self._ledger is not None:
            os.close(self._ledger)  # lets go of the lock too
            self._ledger = None


def hold_quota(spool_path: str, uid: int, limit: int | None, *, record: bool = False) -> QuotaHold:
    """`max_queued_per_user` at submission: whether `uid` may queue another message now.

    Only in system mode (the drop directory new/ belongs to another user) and never for root. A user may
    not list the drop directory, so what they have waiting is counted from two things of their own: the
    view the last delivery run published (`count`, as of its `published` time), and their ledger,
    tmp/.quota-UID (theirs, 0600, one line `ID TIME` per drop sendmail made for them): a drop made since
    the view that is still in new/ (a stat by name) counts too. So ten messages sent in a row before any
    run are counted as ten. The ledger is pruned of what the view covers or the pick-up took, and locked
    (flock) while it is read, and, with `record`, until `QuotaHold.release`, so two submissions of one
    user count each other. Another user's file under that name, or none that can be made, leaves the
    view alone to count; a user who edits their own ledger fools only themselves: the pick-up, which
    counts the queue itself, has the last word.
    """
    if limit is None or uid == 0:
        return QuotaHold(None, None)
    try:
        if os.stat(os.path.join(spool_path, "new")).st_uid == os.geteuid():
            return QuotaHold(None, None)  # user mode: the spool is the user's own
    except OSError:
        return QuotaHold(None, None)  # the submission reports what is wrong with the spool
    count, published = _view_header(spool_path, uid)
    ledger = _open_ledger(spool_path, uid, create=record)
    if ledger is not None:
        try:
            recent = _count_recent(spool_path, ledger, published)
            count += recent
            if not recent and (count >= limit or not record):
                _remove_ledger(spool_path, uid)  # nothing in it: no file left behind
        except OSError:
            os.close(ledger)
            ledger = None
    refusal = None
    if count >= limit:
        refusal = (
            f"you have {count} messages waiting in the queue, the limit (max_queued_per_user) is {limit}; "
            "try again later"
        )
    if ledger is not None and (refusal or not record):
        os.close(ledger)
        ledger = None
    return QuotaHold(refusal, ledger)


LEDGER_PREFIX = ".quota-"
# Bytes of a ledger read: lines are 40 bytes, and more than the limit of them are never kept.
MAX_LEDGER = 1 << 20


def _open_ledger(spool_path: str, uid: int, create: bool) -> int | None:
    """tmp/.quota-UID of this user, opened (with `create`, created if missing) and locked; None when there is
    none or it cannot be used."""
    import fcntl
    import stat

    flags = (
        os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    )
    try:
        tmp = open_directory(os.path.join(spool_path, "tmp"))
    except OSError:
        return None
    try:
        fd = os.open(f"{LEDGER_PREFIX}{uid}", flags, 0o600, dir_fd=tmp)
    except OSError:
        return None
    finally:
        os.close(tmp)
    info = os.fstat(fd)
    if info.st_uid != uid or not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)  # another user's file under our name: the view alone counts
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_ledger(spool_path: str, uid: int) -> None:
    try:
        tmp = open_directory(os.path.join(spool_path, "tmp"))
    except OSError:
        return
    try:
        os.unlink(f"{LEDGER_PREFIX}{uid}", dir_fd=tmp)
    except OSError:
        pass
    finally:
        os.close(tmp)


def _count_recent(spool_path: str, ledger: int, published: float) -> int:
    """How many drops the ledger names that came after the view was published and wait in new/; the
    ledger is rewritten with only those."""
    data = os.pread(ledger, MAX_LEDGER, 0)
    kept = []
    for line in data.split(b"\n"):
        name, _, when = line.decode("ascii", "replace").partition(" ")
        try:
            at = float(when)
        except ValueError:
            continue
        if at < published or "/" in name or name.startswith("."):
            continue
        if os.path.lexists(os.path.join(spool_path, "new", name)):
            kept.append(line + b"\n")
    text = b"".join(kept)
    if text != data:
        os.ftruncate(ledger, 0)
        os.write(ledger, text)  # O_APPEND: at the (new) end
    return len(kept)


class View:
    """A user's view as read back: when it was published, how many messages, the limit, the messages."""

    __slots__ = ("uid", "count", "published", "limit", "messages")

    def __init__(
        self, uid: int, count: int, published: float, limit: int | None, messages: list[dict[str, object]]
    ) -> None:
        self.uid = uid
        self.count = count
        self.published = published
        self.limit = limit
        self.messages = messages


def read_view(spool_path: str, uid: int) -> View | None:
    """The view of `uid`, or None when there is none (the last delivery run found no message of theirs).

    Raises ValueError when the file is not a view of theirs (damaged, or not owned by `uid`) and OSError when
    it cannot be read.
    """
    import json
    import stat

    try:
        fd = os.open(view_path(spool_path, uid), _READ_FLAGS)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid:
            raise ValueError("it is not a view published for this user")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_VIEW_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_VIEW_SIZE:
        raise ValueError("it is larger than any view pymta writes")
    lines = data.splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
        messages = [json.loads(line) for line in lines[1:] if line.strip()]
    except ValueError:
        raise ValueError("it is not JSON lines") from None
    if not isinstance(header, dict) or header.get("v") != VIEW_VERSION or header.get("uid") != uid:
        raise ValueError("its header is not that of a view of this user")
    published, limit = header.get("published"), header.get("limit")
    if not isinstance(published, int | float) or not (limit is None or isinstance(limit, int)):
        raise ValueError("its header is not that of a view of this user")
    if not all(isinstance(message, dict) for message in messages):
        raise ValueError("a message line is not a JSON object")
    return View(uid, len(messages), float(published), limit, messages)


def own_view_only(spool_path: str) -> bool:
    """Whether this user sees only their own view: not root, unable to list queue/, on a system spool (its
    drop directory new/ is sticky, 1733, as `pymta setup` makes it)."""
    if os.geteuid() == 0:
        return False
    try:
        with os.scandir(os.path.join(spool_path, "queue")):
            return False
    except PermissionError:
        pass
    except OSError:
        return False  # missing: the callers say what is wrong
    return SpoolDirectory(spool_path).is_shared()


def spool_owner_name(spool_path: str) -> str:
    """The login name of the spool's owner (`pymta` after `pymta setup`), for "only root and pymta ..."."""
    import pwd

    try:
        uid = os.stat(spool_path).st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "the spool's owner"
