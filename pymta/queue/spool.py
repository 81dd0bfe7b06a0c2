"""The spool and its commit protocol: durable submission (`Spool.submit`), and the state of each queued
message (`write_state`, `due`). It knows nothing of SMTP. Beside it, by job:

    directory.py  the layout's paths, the file primitives, reading a queued message
    entry.py      the one typed record of a queued message: envelope (`QueueEntry`) and state
                  (`MessageState`, the keys of state/ID)
    pickup.py     the pick-up gate: new/ to queue/, drop validation, sender policy, per-user limits
    locks.py      flush.lock, flush.request, the message locks, the reaper of delivered messages

Layout of a spool directory (ARCHITECTURE.md, "On disk"):

    tmp/ID       a submission being written; only its writer ever opens it
    tmp/.quota-UID  system mode: user UID's list of their own recent drops, for `max_queued_per_user` at
                 submission (`pymta.queue.views.hold_quota`)
    new/ID       a committed submission waiting to be picked up (system mode: the drop directory, 1733)
    queue/ID     a picked-up message; never changes after it is written
    state/ID     its delivery state (JSON, `pymta.queue.entry.MessageState`), replaced atomically on every
                 change; absent means never tried. Its mtime is the time of the next attempt, so finding
                 what is due reads no file at all.
    corrupt/ID   a submission the pick-up could not read, kept for the admin
    done/ID      left by a flush of an earlier version that stopped while removing delivered messages;
                 the next flush unlinks it (delivered messages are unlinked from queue/ now: `remove`)
    flush.lock   held (flock) by the one flush that may run; flush.request asks it to look again
    status/UID   system mode: user UID's view of their own queued messages, written by the root flush
                 (`pymta.queue.views`)

A submission file is one line of envelope JSON (sender, recipients, who submitted it, when, DSN options)
followed by the message exactly as it will be stored. One file, so that it appears whole or not at all.
Its first keys are `v` and `uid` (`{"v":1,"uid":N,...`), so that counting a user's queued messages
(`queued_per_uid`, for `max_queued_per_user`) reads 64 bytes of each file.

The commit protocol of `Spool.submit`, and what a crash after each step leaves behind:

    1. open tmp/ID with O_CREAT | O_EXCL | O_NOFOLLOW; ID is 64 random bits behind a time prefix
    2. write the envelope line and the message          crash: a partial tmp/ID that nobody reads
    3. fsync the file                                   crash: a complete tmp/ID that nobody reads
    4. rename tmp/ID to new/ID (atomic)                 crash: new/ID may not survive a power loss, and
                                                        sendmail has not yet said it was accepted
    5. fsync new/ (a user who may not open the drop     the entry is durable: only now sendmail exits 0;
       directory: fsync the file again, see              if this fails, or an interruption (SIGINT)
       `_sync_new_name`)                                 stops any step, tmp/ID and new/ID are unlinked
                                                         again and sendmail fails ("nothing was queued")

So a reader sees a whole entry in new/ or none, and a caller told "accepted" has a durable entry. Leftovers in
tmp/ are removed by the flush once they are older than `STALE_TMP_AGE`.

Unlike Python's mailbox.Maildir.add this fsyncs both the file and the directory, and unlike nullmailer it
renames rather than links, so a rename over an existing name cannot happen: the random ID makes it so.

In system mode new/ and tmp/ are writable by everyone but listable by no one (1733); a dropped file must be
readable by the flusher, so it is protected by its unguessable name, not by its mode (0644). In user mode
everything is the user's own and private (0700 directories, 0600 files). In a spool that is not the
submitter's own, steps 1, 4 and 5 resolve the names from descriptors of tmp/ and new/ opened without
following a link and checked (`Spool._commit_shared`): the spool's owner cannot make root, or any user,
write the mail into a directory of its choosing (ARCHITECTURE.md, invariant 10).

`sendmail` imports this module on every cron job: it and the queue modules it loads import only os, time,
errno and dataclasses at module level; the reading side imports json when it is used.
"""

from __future__ import annotations

import errno
import os

from pymta.errors import SpoolError, SpoolFullError
from pymta.queue.directory import (
    encode_json,
    fsync_dir,
    new_id,
    quoted,
    unlink_at,
    unlink_quietly,
    write_all,
    write_error,
)
from pymta.queue.entry import ENVELOPE_VERSION, MessageState, QueueEntry
from pymta.queue.locks import Locks
from pymta.queue.pickup import PickUp, PickUpBudget

SUBDIRS = ("tmp", "new", "queue", "state", "corrupt")
# A writer killed mid-message leaves tmp/ID behind; Maildir's rule says such files may go after 36 hours.
STALE_TMP_AGE = 36 * 3600

# Bytes the state directory must have free before a flush delivers anything: a state record is under 1 KiB,
# and one that cannot be written would make every later run send its delivered recipients again.
STATE_MIN_FREE = 256 * 1024
# Free space a sendmail submission must leave on the spool's file system beyond its own size: the flush
# delivers nothing it could not record (`state_problem`), so a queue filled to its last bytes would stop
# the very runs that drain it. Postfix's queue_minfree keeps room for the same reason.
SUBMIT_MIN_FREE = 4 * STATE_MIN_FREE
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def real_user() -> tuple[str, str, int]:
    """The real submitting user as the operating system knows them (never what a message claims): login
    name, GECOS full name, uid. A uid without a passwd entry is named `uid<N>`."""
    import pwd

    uid = os.getuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return f"uid{uid}", "", uid
    gecos = entry.pw_gecos.split(",", 1)[0].replace("&", entry.pw_name.capitalize())
    return entry.pw_name, gecos.strip(), uid


def _sync_new_name(directory: str, fd: int) -> None:
    """Make durable the name of the file `fd` that was just renamed into `directory`: fsync the directory.
    A writer who may not open it (system mode's drop directory, 1733: writable, not readable) fsyncs the
    file once more instead; the rename changed the file's inode (its ctime), so on ext4, XFS and btrfs that
    fsync commits the journal transaction holding the new name."""
    try:
        fsync_dir(directory)
    except PermissionError:
        os.fsync(fd)


# Opens a directory to resolve names from, without read rights (a drop directory is 1733) where the system
# has O_PATH (Linux); never through a link.
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC
_STICKY = 0o1000


def _open_dir(name: str, parent_fd: int | None, path: str) -> int:
    """A descriptor of the directory `name` (relative to `parent_fd`, never through a link); `path` names
    it in the SpoolError raised when it cannot be opened."""
    flags = _DIR_FLAGS if parent_fd is None else _DIR_FLAGS | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=parent_fd)
    except OSError as exc:
        if parent_fd is not None and exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise SpoolError(
                f"cannot write to the spool: {path} is a symbolic link or not a directory, and sendmail "
                "follows nothing in a spool that is not its own; nothing was queued; "
                "run 'pymta setup --check'"
            ) from None
        raise write_error("cannot use the spool", path, exc) from None


def _open_drop_dir(spool_fd: int, path: str, owner: int) -> int:
    """tmp/ or new/ of a spool owned by `owner`, checked: a directory (no link) of `owner` or root (of anyone
    in a spool directory of root's), in which other users cannot rename or remove our file (not writable
    by them, or sticky)."""
    fd = _open_dir(os.path.basename(path), spool_fd, path)
    info = os.fstat(fd)
    problem = None
    if owner != 0 and info.st_uid not in (owner, 0):  # in a spool of root's nobody else can swap it
        problem = f"belongs to uid {info.st_uid}, not to the spool's owner (uid {owner})"
    elif info.st_mode & 0o022 and not info.st_mode & _STICKY:
        problem = f"has mode {info.st_mode & 0o7777:04o}: other users may remove what is queued there"
    if problem is not None:
        os.close(fd)
        raise SpoolError(
            f"cannot write to the spool: {path} {problem}; nothing was queued; run 'pymta setup --check'"
        )
    return fd


class Spool(PickUp, Locks):
    """A spool directory. Cheap to construct; nothing touches the disk until a method is called.

    The commit protocol (`submit`) and the state (`write_state`, `due`) are here; the reading side is
    `SpoolDirectory`'s, the pick-up `PickUp`'s, the locks `Locks`'."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.private = True  # after submit(): whether the spool is this user's own (user mode)
        self._reaper = None
        self.limit_warned = set()

    # -- the write side (sendmail) --

    def create_private(self, parents: bool = False) -> None:
        """Create a user-mode spool (directories 0700). Its parent must exist unless `parents` (the default
        spool under ~/.local/state): a typo in a configured spool is not silently made."""
        if not parents and not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            parent = os.path.dirname(os.path.abspath(self.path))
            raise SpoolError(
                f"cannot create the spool {self.path}: {parent} does not exist; "
                f"create it or set 'spool:' in the config (or run pymta setup)"
            )
        try:
            missing = []
            path = os.path.abspath(self.path)
            while not os.path.isdir(path):
                missing.append(path)
                path = os.path.dirname(path)
            for directory in reversed(missing):  # XDG: create missing base directories 0700
                os.makedirs(directory, mode=0o700, exist_ok=True)
            for name in SUBDIRS:
                os.makedirs(self.dir(name), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise write_error("cannot create the spool", self.path, exc) from None

    def submit(
        self,
        envelope: dict[str, object],
        message: bytes,
        *,
        create: bool = True,
        create_parents: bool = False,
        reserve: int = 0,
    ) -> str:
        """Commit a submission durably (the protocol in the module docstring) and return its id.

        `envelope` gets `v` and `id` added. Raises SpoolError (EX_CANTCREAT) when the spool cannot be
        written and SpoolFullError (EX_TEMPFAIL) when the disk or the file size limit is full, or when the
        message would leave less than `reserve` bytes free; either way nothing is left that a reader
        could pick up.
        """
        new_dir = self.dir("new")
        try:
            owner = os.stat(self.path).st_uid
            drop = os.lstat(new_dir)
        except FileNotFoundError:
            if not create or _is_nonempty_dir(self.path):
                raise SpoolError(
                    f"the spool {self.path} has no new/ directory; "
                    "run 'pymta setup' or fix 'spool:' in the config"
                ) from None
            self.create_private(parents=create_parents)
            owner, drop = os.stat(self.path).st_uid, os.lstat(new_dir)
        except OSError as exc:
            raise write_error("cannot use the spool", self.path, exc) from None
        # A spool owned by someone else is the system-mode maildrop: the flusher must read the file, and
        # nothing in it is followed (`_commit_shared`).
        self.private = owner == drop.st_uid == os.geteuid()
        message_id = new_id()
        # The uid right after the version, where `queued_per_uid` reads it.
        head = (
            {"v": ENVELOPE_VERSION, "uid": envelope["uid"]} if "uid" in envelope else {"v": ENVELOPE_VERSION}
        )
        envelope = {**head, "id": message_id, **envelope}
        data = encode_json(envelope).encode("ascii") + b"\n" + message
        if reserve:
            self._check_room(len(data) + reserve)
        if not self.private:
            self._commit_shared(message_id, data)
            return message_id
        mode = 0o600
        tmp_path = os.path.join(self.dir("tmp"), message_id)
        try:
            fd = os.open(tmp_path, _OPEN_FLAGS, mode)
        except OSError as exc:
            raise write_error("cannot write to the spool", self.dir("tmp"), exc) from None
        target = os.path.join(new_dir, message_id)
        renamed = False
        try:
            os.fchmod(fd, mode)  # whatever the caller's umask
            write_all(fd, data)
            os.fsync(fd)
            os.rename(tmp_path, target)
            renamed = True
            _sync_new_name(new_dir, fd)
        except BaseException as exc:
            # Whatever stopped the commit, an OSError or an interruption (a Ctrl-C during the fsync, which
            # sendmail reports as "nothing was queued"), the caller is told the message was not accepted:
            # take it back, or the caller's retry would deliver it twice. (The target is unlinked even
            # when `renamed` is not yet set: the interruption may come just after the rename.)
            unlink_quietly(tmp_path)
            unlink_quietly(target)
            if not isinstance(exc, OSError):
                raise
            if renamed:
                raise write_error("cannot make the queued message durable", new_dir, exc) from None
            raise write_error("cannot write the message to the spool", self.path, exc) from None
        finally:
            os.close(fd)
        return message_id

    def _check_room(self, needed: int) -> None:
        """SpoolFullError unless the spool's file system has `needed` bytes free for ordinary users."""
        try:
            info = os.statvfs(self.path)
        except OSError:
            return  # the commit that follows says what is wrong with the spool
        free = info.f_bavail * info.f_frsize
        if free < needed:
            raise SpoolFullError(
                f"the spool {self.path} has only {free // 1024} KiB free, and {SUBMIT_MIN_FREE // 1024} KiB "
                "stay free for the deliveries that empty it: free some space, then send again"
            )

    def _commit_shared(self, message_id: str, data: bytes) -> None:
        """The commit protocol in a spool that is not ours (system mode), with every name resolved from a
        directory descriptor: the spool's owner can swap tmp/ or new/ for a link to another directory, and
        a submitter who followed it would write the mail there (root: anywhere). So tmp/ and new/ are opened
        without following a link and must be directories of the spool's owner (or root) that other users
        may not rename files in (sticky when writable by others); the file is created, renamed and made
        durable relative to them. The file is 0644: the flusher must read it."""
        spool_fd = _open_dir(self.path, None, self.path)
        try:
            owner = os.fstat(spool_fd).st_uid
            tmp_fd = _open_drop_dir(spool_fd, self.dir("tmp"), owner)
            try:
                new_fd = _open_drop_dir(spool_fd, self.dir("new"), owner)
                try:
                    self._commit_in(message_id, data, tmp_fd, new_fd)
                finally:
                    os.close(new_fd)
            finally:
                os.close(tmp_fd)
        finally:
            os.close(spool_fd)

    def _commit_in(self, message_id: str, data: bytes, tmp_fd: int, new_fd: int) -> None:
        try:
            fd = os.open(message_id, _OPEN_FLAGS, 0o644, dir_fd=tmp_fd)
        except OSError as exc:
            raise write_error("cannot write to the spool", self.dir("tmp"), exc) from None
        renamed = False
        try:
            os.fchmod(fd, 0o644)  # whatever the caller's umask
            write_all(fd, data)
            os.fsync(fd)
            os.rename(message_id, message_id, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
            renamed = True
            try:
                directory = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=new_fd)
            except PermissionError:
                os.fsync(fd)  # a user may not open the drop directory: see `_sync_new_name`
            else:
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except BaseException as exc:
            # Not durable, or interrupted: take it back, whichever name it has by now (see `submit`).
            unlink_at(tmp_fd, message_id)
            unlink_at(new_fd, message_id)
            if not isinstance(exc, OSError):
                raise
            if renamed:
                raise write_error("cannot make the queued message durable", self.dir("new"), exc) from None
            raise write_error("cannot write the message to the spool", self.path, exc) from None
        finally:
            os.close(fd)

    def state_problem(self) -> SpoolError | None:
        """Why the delivery state cannot be written just now (a read-only file system, no space or inodes,
        no permission), or None. The flush asks before it delivers anything: a delivery it could not
        record would be sent again by every later run (invariant 3)."""
        directory = self.dir("state")
        stop = "delivering nothing until then, or it would be sent again; then run pymta flush again"
        try:
            info = os.statvfs(directory)
        except OSError as exc:
            return write_error("cannot look at", directory, exc, "run pymta flush again")
        if info.f_flag & os.ST_RDONLY:
            return SpoolError(f"{directory} is on a read-only file system: remount it read-write; {stop}")
        free = info.f_bavail * info.f_frsize
        if free < STATE_MIN_FREE or (info.f_files and not info.f_favail):
            what = f"only {free // 1024} KiB free" if free < STATE_MIN_FREE else "no free inodes"
            return SpoolFullError(f"{directory} has {what}: free some space; {stop}")
        if not os.access(directory, os.W_OK):
            return SpoolError(
                f"{directory} cannot be written by this user: check its owner (pymta setup --check); {stop}"
            )
        return None

    # -- the read side (pymta queue, mailq, the flush) --
    def entries(self) -> tuple[list[QueueEntry], list[str]]:
        """Every committed message, oldest first, and a line for each entry that could not be read.

        Of one user's files waiting in new/ (root's and ours aside) no more than `MAX_PICKUP_PER_USER` are
        read, as the pick-up does: 300,000 files dropped there would make every listing and every user's
        view (`pymta.queue.views`) huge. One line says how many more there are."""
        found: list[QueueEntry] = []
        problems: list[str] = []
        budget = PickUpBudget(self)
        for location in ("new", "queue"):
            for name in self._names(location):
                try:
                    if location == "new" and not budget.admits(
                        os.lstat(os.path.join(self.dir("new"), name)).st_uid
                    ):
                        continue
                    found.append(self.read_entry(location, name))
                except FileNotFoundError:
                    continue  # picked up or deleted while we looked
                except (OSError, ValueError) as exc:
                    problems.append(f"{location}/{quoted(name)}: {exc}")
        budget.report(problems.append)
        found.sort(key=lambda entry: (entry.queued_at, entry.id))
        return found, problems

    def remove_stale_tmp(self, now: float) -> int:
        """Remove submissions abandoned mid-write (their writer was killed); return how many."""
        removed = 0
        for name in self._names("tmp"):
            path = os.path.join(self.dir("tmp"), name)
            try:
                if now - os.lstat(path).st_mtime > STALE_TMP_AGE:
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue
        return removed

    def due(self, now: float) -> list[str]:
        """The ids in queue/ whose next attempt has come, oldest submission first. Reads no file."""
        times = {}
        for name in self._names("state"):
            try:
                times[name] = os.stat(os.path.join(self.dir("state"), name)).st_mtime
            except FileNotFoundError:
                continue
        return sorted(name for name in self._names("queue") if times.get(name, 0.0) <= now)

    def write_state(self, name: str, state: MessageState, next_attempt: float) -> None:
        """Replace state/NAME atomically and durably; its mtime records `next_attempt`. Raises SpoolError
        (SpoolFullError when out of space) that says what to fix."""
        import json  # lazy: sendmail never writes a state

        data = json.dumps(state.to_json(), separators=(",", ":")).encode()
        try:
            self._write_private(os.path.join(self.dir("state"), name), data, mtime=next_attempt)
        except OSError as exc:
            raise write_error(
                "cannot record the delivery state in", self.dir("state"), exc, "run pymta flush again"
            ) from None

    def remove_leftovers(self) -> None:
        """Unlink what a flush of an earlier version left in done/ (it stopped before its background unlinks
        finished)."""
        for name in self._names("done"):
            unlink_quietly(os.path.join(self.dir("done"), name))


def _is_nonempty_dir(path: str) -> bool:
    try:
        return bool(os.listdir(path))
    except FileNotFoundError:
        return False
    except OSError:
        return True
