"""The on-disk queue: durable submission, listing and per-message state. It knows nothing of SMTP.

Layout of a spool directory (DESIGN.md, "Two ways to run"):

    tmp/ID       a submission being written; only its writer ever opens it
    tmp/.quota-UID  system mode: user UID's list of their own recent drops, for `max_queued_per_user` at
                 submission (`pymta.queue.views.hold_quota`)
    new/ID       a committed submission waiting to be picked up (system mode: the drop directory, 1733)
    queue/ID     a picked-up message; never changes after it is written
    state/ID     its delivery state (JSON), replaced atomically on every change; absent means never tried.
                 Its mtime is the time of the next attempt, so finding what is due reads no file at all.
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
write the mail into a directory of its choosing (DESIGN.md invariant 10).

`sendmail` imports this module on every cron job: module level imports only os, time and errno; the
reading side imports json when it is used.
"""

from __future__ import annotations

import errno
import os
import time

from pymta.errors import SpoolError, SpoolFullError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterator

    from pymta.config.identity import SenderPolicy

SUBDIRS = ("tmp", "new", "queue", "state", "corrupt")
ENVELOPE_VERSION = 1
# A writer killed mid-message leaves tmp/ID behind; Maildir's rule says such files may go after 36 hours.
STALE_TMP_AGE = 36 * 3600
# An envelope line longer than this is not one we wrote: refuse it rather than read a huge file into memory.
MAX_ENVELOPE_LINE = 4 * 1024 * 1024
# A state file larger than this is not one we wrote (one of a message with the largest envelope and a long
# reply for each recipient stays below it): refused rather than read into memory.
MAX_STATE_SIZE = 64 * 1024 * 1024
# The longest address a drop may name (sender or recipient): RFC 5322's line limit, far past what SMTP carries
# (256 octets a path), so nothing sendmail accepts is refused here.
MAX_ADDRESS = 998
# The latest time an envelope, a state or a privsep request may name: the last day of the year 9999 begins,
# so that datetime can still show it in any time zone.
MAX_TIME = 253402214400.0
# Drops of one user the pick-up looks at in one run, beside root's and the spool owner's: 300,000 files
# dropped straight into new/ cost each run a bounded amount of work, and the rest waits for later runs.
MAX_PICKUP_PER_USER = 1000

# The next-attempt time of a message that no flush should pick (held, failed): the largest 32-bit time.
NEVER = float(2**31 - 1)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Bytes the state directory must have free before a flush delivers anything: a state record is under 1 KiB,
# and one that cannot be written would make every later run send its delivered recipients again.
STATE_MIN_FREE = 256 * 1024
# Free space a sendmail submission must leave on the spool's file system beyond its own size: the flush
# delivers nothing it could not record (`state_problem`), so a queue filled to its last bytes would stop
# the very runs that drain it. Postfix's queue_minfree keeps room for the same reason.
SUBMIT_MIN_FREE = 4 * STATE_MIN_FREE
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


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


def new_id() -> str:
    """A queue id: 8 hex digits of the time (so ids sort by submission) and 64 unguessable random bits."""
    return f"{int(time.time()):08x}{os.urandom(8).hex()}"


def is_queue_id(name: str) -> bool:
    """Whether `name` is what `new_id` makes: 24 lower-case hexadecimal digits."""
    return len(name) == 24 and all(char in "0123456789abcdef" for char in name)


def quoted(name: str) -> str:
    """A file name as a log line or listing may show it: as it is when it is printable ASCII without
    blanks, else as a Python literal (a name holding a newline must not forge a log line)."""
    if name and name.isascii() and name.isprintable() and " " not in name:
        return name
    return ascii(name)


def _json_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def encode_json(value: object) -> str:
    """JSON for the envelope's plain values, ASCII only, without importing json (it pulls in re)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json_string(str(k))}:{encode_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot encode {type(value).__name__} in an envelope")


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (after a create, rename or unlink in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int, size: int = 0, limit: int | None = None) -> bytes:
    """Everything in the file behind `fd`, from its start whatever the descriptor's offset, or its first
    `limit` bytes. `size` (what fstat said) lets a file that size come in one read: a shorter read than
    asked is the end of the file."""
    chunks = []
    offset = 0
    wanted = size + 1 if size else 65536
    while True:
        if limit is not None:
            wanted = min(wanted, limit - offset)
        chunk = os.pread(fd, wanted, offset)
        chunks.append(chunk)
        offset += len(chunk)
        if len(chunk) < wanted or offset == limit:
            return b"".join(chunks)
        wanted = 65536


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


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """A spool directory. Cheap to construct; nothing touches the disk until a method is called."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.private = True  # after submit(): whether the spool is this user's own (user mode)
        self._dirs: dict[str, str] = {}
        self._reaper: threading.Thread | None = None  # frees delivered messages in the background
        self.limit_warned: set[int] = set()  # uids told about max_queued_per_user by this object's pick-ups

    def dir(self, name: str) -> str:
        """The path of one of the spool's directories (tmp, new, queue, ...)."""
        path = self._dirs.get(name)
        if path is None:
            path = self._dirs[name] = os.path.join(self.path, name)
        return path

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
            _write_all(fd, data)
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
            _write_all(fd, data)
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
            _unlink_at(tmp_fd, message_id)
            _unlink_at(new_fd, message_id)
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
        budget = _PickUpBudget(self)
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

    def _names(self, location: str) -> Iterator[str]:
        try:
            with os.scandir(self.dir(location)) as listing:
                for item in listing:
                    if not item.name.startswith("."):
                        yield item.name
        except FileNotFoundError:
            return

    def read_entry(self, location: str, name: str) -> QueueEntry:
        """Read the envelope of new/NAME or queue/NAME, and state/NAME if there is one."""
        import stat

        path = os.path.join(self.dir(location), name)
        fd = os.open(path, _READ_FLAGS)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            with os.fdopen(os.dup(fd), "rb") as handle:
                line = handle.readline(MAX_ENVELOPE_LINE)
        finally:
            os.close(fd)
        if not line.endswith(b"\n"):
            raise ValueError("no envelope line: not a pymta queue file")
        envelope = _parse_envelope(line)
        state = self._read_state(name) if location == "queue" else None
        return QueueEntry(location, path, envelope, state, info.st_size - len(line), info.st_uid)

    def _read_state(self, name: str) -> dict[str, object] | None:
        """state/NAME as a dict, or None when there is none. Opened without following a link or waiting on
        a FIFO, and read only when it is a regular file of at most MAX_STATE_SIZE bytes: whatever the
        spool's owner planted there costs a listing one line, never a hang or the memory."""
        import json
        import stat

        try:
            fd = os.open(os.path.join(self.dir("state"), name), _READ_FLAGS)
        except FileNotFoundError:
            return None  # never tried: the common case on the flush's hot path, so no file object is made
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("state file is not a regular file")
            data = _read_all(fd, limit=MAX_STATE_SIZE + 1)
            if len(data) > MAX_STATE_SIZE:
                raise ValueError(f"state file is larger than {MAX_STATE_SIZE} bytes")
            state = json.loads(data)
        finally:
            os.close(fd)
        if not isinstance(state, dict):
            raise ValueError("state file is not a JSON object")
        return state

    def load(self, name: str, fd: int | None = None) -> tuple[QueueEntry, bytes]:
        """A picked-up message and its entry, from one read of queue/NAME (the flush's hot path).

        `fd`, when given, is a descriptor of queue/NAME that is already open (the one `lock_message`
        returned): the file is read through it, from its start, and it stays open. FileNotFoundError when
        that file has no name any more (deleted by a queue command between the open and the lock; queue
        files are only ever unlinked, never replaced, and only the one flush renames them).
        """
        import stat

        path = os.path.join(self.dir("queue"), name)
        own = fd is None
        if fd is None:
            fd = os.open(path, _READ_FLAGS)
        try:
            info = os.fstat(fd)
            if info.st_nlink == 0:
                raise FileNotFoundError(errno.ENOENT, "deleted since it was opened", path)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            data = _read_all(fd, info.st_size)
        finally:
            if own:
                os.close(fd)
        line, newline, message = data.partition(b"\n")
        if not newline:
            raise ValueError("no envelope line: not a pymta queue file")
        entry = QueueEntry(
            "queue", path, _parse_envelope(line), self._read_state(name), len(message), info.st_uid
        )
        if entry.id != name:
            raise ValueError(f"its envelope claims the id {entry.id!r}, not its file name")
        return entry, message

    def read_message(self, entry: QueueEntry) -> bytes:
        """The stored message of an entry, without its envelope line."""
        fd = os.open(entry.path, _READ_FLAGS)
        with os.fdopen(fd, "rb") as handle:
            handle.readline(MAX_ENVELOPE_LINE)
            return handle.read()

    # -- the flush side: pick-up, due messages, state, lock --

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
        (a regular file with one link, at most `max_size` bytes of message). A submission owned by us (user
        mode) is renamed into place; one owned by another user (system mode) is copied into a file of ours,
        with `submitted_by` and `uid` taken from the file's owner, so its writer can change it no longer;
        no more than `max_size` and the envelope allowance of it is read, however it grows meanwhile, and
        every envelope field is checked before it is used (`validate_drop`). Links, FIFOs and devices are
        removed; unreadable, invalid or oversized files, names that are no queue id, and a file whose
        pick-up fails in any other way are moved to corrupt/ (DESIGN.md invariants 10 and 11); each gets
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
        the first bytes of each queued file (`queued_per_uid`); a file's owner comes from an lstat, so a
        user over the limit costs no open.
        """
        limit = _QueueLimit(self, max_queued_per_user) if max_queued_per_user is not None else None
        budget = _PickUpBudget(self)
        picked = []
        for name in sorted(self._names("new")):
            source = os.path.join(self.dir("new"), name)
            try:
                # Who dropped it, from a stat by name: a user over their quota or this run's budget costs
                # no open, and nothing of theirs is read.
                uid = os.lstat(source).st_uid
                if not budget.admits(uid) or (limit is not None and not limit.admits(uid)):
                    continue
                if self._pick_up_one(name, source, max_size, report, sender_policy, limit):
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
                    fd = os.open(name, _READ_FLAGS, dir_fd=directory)
                except OSError:
                    continue
                try:
                    head = os.pread(fd, 64, 0)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                uid = _uid_from_head(head)
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
        max_size: int,
        report: Callable[[str], None],
        sender_policy: SenderPolicy | None,
        limit: _QueueLimit | None = None,
    ) -> bool:
        import stat

        try:
            fd = os.open(source, _READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                os.unlink(source)
                report(f"refused new/{quoted(name)}: a symbolic link; removed")
                return False
            if exc.errno == errno.EACCES:  # mode 000, or a hard link to someone else's private file
                links = os.lstat(source).st_nlink
                if links != 1:
                    os.unlink(source)
                    report(
                        f"refused new/{quoted(name)}: a hard link ({links} names)"
                        " that we may not read; removed"
                    )
                else:
                    self._set_aside(name, source, "it cannot be read (its mode lets nobody read it)", report)
                return False
            raise
        try:
            info = os.fstat(fd)
            if self._picked_up_already(name, info):
                os.unlink(source)
                report(
                    f"new/{name} was picked up already (a pick-up stopped between taking it and removing it "
                    "from new/); removed from new/"
                )
                return False
            refusal = ""
            if not stat.S_ISREG(info.st_mode):
                refusal = "not a regular file (a FIFO, device or directory)"
            elif info.st_nlink != 1:
                refusal = f"a hard link ({info.st_nlink} names)"
            if refusal:
                if stat.S_ISDIR(info.st_mode):
                    report(f"refused new/{quoted(name)}: {refusal}; left in place for the admin")
                else:
                    os.unlink(source)
                    report(f"refused new/{quoted(name)} of uid {info.st_uid}: {refusal}; removed")
                return False
            if not is_queue_id(name):
                self._set_aside(
                    name, source, "its name is not a queue id (sendmail did not write it)", report
                )
                return False
            if info.st_size > max_size + MAX_ENVELOPE_LINE:
                self._set_aside(name, source, f"{info.st_size} bytes, over max_message_size", report)
                return False
            target = os.path.join(self.dir("queue"), name)
            if os.path.lexists(target):
                self._set_aside(name, source, "a queued message has this id already", report)
                return False
            if info.st_uid == os.geteuid():
                # Our own submission (user mode): nobody else could have written it. Moved as it is (link,
                # then unlink: never over an existing name); an unreadable envelope is found, and set
                # aside, when the message is loaded for delivery.
                os.link(source, target, follow_symlinks=False)
                os.unlink(source)
                return True
            # Never more than a drop may hold: its writer may grow it after the fstat above (M1).
            data = _read_all(fd, limit=max_size + MAX_ENVELOPE_LINE + 1)
        finally:
            os.close(fd)
        line, newline, message = data.partition(b"\n")
        try:
            if len(data) > max_size + MAX_ENVELOPE_LINE or len(message) > max_size:
                raise ValueError(f"over max_message_size ({max_size} bytes)")
            if not newline:
                raise ValueError("no envelope line: not a pymta queue file")
            claimed = validate_drop(_parse_envelope(line), time.time())
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
            refusal, message = sender_policy.check_drop(owner, _text(envelope, "sender"), message)
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

    def _picked_up_already(self, name: str, info: os.stat_result) -> bool:
        """Whether new/NAME (`info`) is a submission that queue/NAME holds already: a pick-up killed after it
        linked (user mode: the same file) or copied it (system mode: a file of ours recording the same
        uid) into queue/ and before it unlinked it from new/. The next flush then removes it from new/, so
        it is delivered once (issue 11, item 8)."""
        import stat

        if not is_queue_id(name) or not stat.S_ISREG(info.st_mode):
            return False
        try:
            fd = os.open(os.path.join(self.dir("queue"), name), _READ_FLAGS)
        except OSError:
            return False
        try:
            queued = os.fstat(fd)
            if (queued.st_dev, queued.st_ino) == (info.st_dev, info.st_ino):
                return True
            return (
                info.st_nlink == 1
                and queued.st_uid == os.geteuid() != info.st_uid
                and _uid_from_head(os.pread(fd, 64, 0)) == info.st_uid
            )
        finally:
            os.close(fd)

    def is_shared(self) -> bool:
        """Whether this is a system spool, shared by every local user: its drop directory new/ is sticky
        (1733, as `pymta setup` makes it). False when it does not exist yet."""
        import stat

        try:
            return bool(os.stat(self.dir("new")).st_mode & stat.S_ISVTX)
        except OSError:
            return False

    def exists(self) -> bool:
        """Whether the spool has been created (by a first submission or by pymta setup)."""
        return os.path.isdir(self.dir("queue"))

    def set_aside_queued(self, name: str) -> None:
        """Move an unreadable queue/NAME (and its state) to corrupt/, where the admin can look at it."""
        os.makedirs(self.dir("corrupt"), mode=0o700, exist_ok=True)
        try:
            os.rename(os.path.join(self.dir("queue"), name), os.path.join(self.dir("corrupt"), name))
        except FileNotFoundError:
            pass
        unlink_quietly(os.path.join(self.dir("state"), name))

    def _set_aside(self, name: str, source: str, why: str, report: Callable[[str], None]) -> None:
        """Move new/NAME to corrupt/, where the admin can look at it and `pymta queue delete` removes it,
        with one `report` line. A name that is no queue id (or one corrupt/ has already) gets a new id
        there, so the admin can name it and nothing set aside before is replaced."""
        os.makedirs(self.dir("corrupt"), mode=0o700, exist_ok=True)
        kept = name
        if not is_queue_id(name) or os.path.lexists(os.path.join(self.dir("corrupt"), name)):
            kept = new_id()
        os.rename(source, os.path.join(self.dir("corrupt"), kept))
        as_id = "" if kept == name else f" as {kept}"
        report(f"refused new/{quoted(name)}: {why}; moved to corrupt/{as_id} for the admin")

    def _write_private(
        self, target: str, data: bytes, mtime: float | None = None, replace: bool = True
    ) -> None:
        """Write `data` to `target` atomically and durably: a dot-file beside it, fsync, rename (or, when not
        `replace`, link and unlink, which raises FileExistsError rather than replace an existing file)."""
        directory, name = os.path.split(target)
        tmp_path = os.path.join(directory, f".{name}.tmp")
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if mtime is not None:
                os.utime(tmp_path, (mtime, mtime))
            if replace:
                os.rename(tmp_path, target)
            else:
                os.link(tmp_path, target)
                os.unlink(tmp_path)
        except BaseException:
            unlink_quietly(tmp_path)
            raise

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

    def write_state(self, name: str, state: dict[str, object], next_attempt: float) -> None:
        """Replace state/NAME atomically and durably; its mtime records `next_attempt`. Raises SpoolError
        (SpoolFullError when out of space) that says what to fix."""
        import json

        data = json.dumps(state, separators=(",", ":")).encode()
        try:
            self._write_private(os.path.join(self.dir("state"), name), data, mtime=next_attempt)
        except OSError as exc:
            raise write_error(
                "cannot record the delivery state in", self.dir("state"), exc, "run pymta flush again"
            ) from None

    def remove(self, entry: QueueEntry, lock: int | None = None) -> None:
        """Forget a message whose every recipient is done: unlink queue/ID (that unlink is the decision),
        then state/ID.

        A descriptor of the file stays open across the unlink, and a background thread closes it while the
        flush goes on: whoever lets go of an unlinked file last pays for freeing its blocks, and for a file
        that was fsynced that costs three renames here, ten times the unlink itself. `finish_removals` waits
        for those closes. A crash leaves nothing behind: the kernel frees an unlinked file whose last
        descriptor goes (after a power loss, when the file system is mounted again).

        `lock`, the message's lock descriptor (`lock_message`), is that descriptor when given, and is handed
        over: the caller must not unlock it (unless this raises).
        """
        fd = os.open(entry.path, _READ_FLAGS) if lock is None else lock
        try:
            os.unlink(entry.path)
        except BaseException:
            if lock is None:
                os.close(fd)
            raise
        if entry.has_state:
            unlink_quietly(os.path.join(self.dir("state"), entry.id))
        if self._reaper is None:
            import queue
            import threading

            self._doomed: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            self._reaper = threading.Thread(target=self._reap, name="pymta-reaper", daemon=True)
            self._reaper.start()
        self._doomed.put(fd)

    def _reap(self) -> None:
        while (fd := self._doomed.get()) is not None:
            os.close(fd)

    def finish_removals(self) -> None:
        """Wait until every message handed to `remove` is freed."""
        if self._reaper is not None:
            self._doomed.put(None)
            self._reaper.join()
            self._reaper = None

    def remove_leftovers(self) -> None:
        """Unlink what a flush of an earlier version left in done/ (it stopped before its background unlinks
        finished)."""
        for name in self._names("done"):
            unlink_quietly(os.path.join(self.dir("done"), name))

    def lock_flush(self) -> int | None:
        """Take the flush lock without waiting: a descriptor to `release_flush`, or None when it is held."""
        import fcntl

        path = os.path.join(self.path, "flush.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a lock of root's (a root process wrote it) stops the owner's flush
            raise write_error("cannot open the flush lock", path, exc, "run pymta flush again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def lock_message(self, name: str, wait: float = 0.0) -> int | None:
        """Lock queue/NAME against concurrent changes (flock on the file), waiting up to `wait` seconds.

        The flush holds it while it delivers a message; `pymta queue` commands hold it while they change
        one. Returns a descriptor for `unlock_message`, or None when someone else holds it. Raises
        FileNotFoundError when the message is gone.
        """
        import fcntl

        fd = os.open(os.path.join(self.dir("queue"), name), _READ_FLAGS)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)

    def unlock_message(self, fd: int) -> None:
        os.close(fd)  # closing the descriptor releases the flock

    def release_flush(self, fd: int) -> None:
        os.close(fd)  # closing the descriptor releases the flock

    def request_flush(self) -> None:
        """Ask the flush that holds the lock to look at the queue once more before it stops."""
        fd = os.open(os.path.join(self.path, "flush.request"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def has_flush_request(self) -> bool:
        return os.path.exists(os.path.join(self.path, "flush.request"))

    def take_flush_request(self) -> bool:
        """True (and the request cleared) when someone asked for another look since the last call."""
        try:
            os.unlink(os.path.join(self.path, "flush.request"))
        except FileNotFoundError:
            return False
        return True


class RecipientStatus:
    """One recipient of a queued message and how its delivery stands.

    `status` is pending, delivered, deferred, failed, or expanded (an alias or the admin rule replaced it by
    other recipients, which follow with `via` naming it). `reported`: its failure was told to the sender.
    """

    __slots__ = ("address", "status", "last_error", "via", "reported")

    def __init__(
        self,
        address: str,
        status: str = "pending",
        last_error: str | None = None,
        via: str | None = None,
        reported: bool = False,
    ) -> None:
        self.address = address
        self.status = status
        self.last_error = last_error
        self.via = via
        self.reported = reported

    def record(self) -> dict[str, object]:
        """The recipient as its message's state file stores it (what `QueueEntry` reads back)."""
        record: dict[str, object] = {"status": self.status, "last_error": self.last_error}
        if self.via:
            record["via"] = self.via  # an alias target: not to be expanded again
        if self.reported:
            record["reported"] = True  # its failure was told to the sender: no second bounce
        return record


def write_error(what: str, path: str, exc: OSError, then: str = "send again") -> SpoolError:
    """The one-line SpoolError for a failed write to `path`: what failed, why, and what to do (`then`, after
    freeing space). Out of space or quota is SpoolFullError (try again later: 75); the rest 73."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        return SpoolFullError(f"{what} {path}: {reason}; free some space, then {then}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SpoolError(f"{what} {path}: {reason}; check its owner, mode and mount (pymta setup --check)")
    if exc.errno == errno.ENOENT:
        return SpoolError(
            f"{what} {path}: it does not exist; run 'pymta setup' or fix 'spool:' in the config"
        )
    return SpoolError(f"{what} {path}: {reason}")


class QueueEntry:
    """A queued message as the spool describes it: its envelope and its delivery state."""

    __slots__ = (
        "location",
        "path",
        "id",
        "sender",
        "recipients",
        "submitted_by",
        "uid",
        "full_name",
        "queued_at",
        "dsn_notify",
        "dsn_ret",
        "dsn_envid",
        "body_type",
        "state",
        "attempts",
        "next_attempt",
        "last_error",
        "size",
        "owner_uid",
        "has_state",
        "warned",
        "bounce_due",
        "relay",
        "dsn_of",
        "to_postmaster",
        "held_seconds",
    )

    def __init__(
        self,
        location: str,
        path: str,
        envelope: dict[str, object],
        state: dict[str, object] | None,
        size: int,
        owner_uid: int,
    ) -> None:
        self.location = location
        self.path = path
        self.id = _text(envelope, "id")
        self.sender = _text(envelope, "sender")
        self.submitted_by = _text(envelope, "submitted_by")
        self.full_name = _text(envelope, "full_name")
        self.uid = int(_number(envelope, "uid", -1))
        self.queued_at = _time(envelope, "queued_at", 0)
        self.dsn_notify = _optional_text(envelope, "notify")
        self.dsn_ret = _optional_text(envelope, "ret")
        self.dsn_envid = _optional_text(envelope, "envid")
        self.body_type = _optional_text(envelope, "body_type")
        addresses = envelope.get("recipients")
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError("envelope has no recipient list")
        self.has_state = state is not None
        state = state or {}
        per_recipient = state.get("recipients")
        per_recipient = per_recipient if isinstance(per_recipient, dict) else {}
        self.recipients = []
        # The envelope's recipients, then those the flush added (alias targets), in the state's order.
        extra = [address for address in per_recipient if address not in addresses]
        for address in [*addresses, *extra]:
            known = per_recipient.get(address)
            known = known if isinstance(known, dict) else {}
            self.recipients.append(
                RecipientStatus(
                    address,
                    _text(known, "status") or "pending",
                    _optional_text(known, "last_error"),
                    _optional_text(known, "via"),
                    known.get("reported") is True,
                )
            )
        self.state = _text(state, "state") or "queued"
        self.attempts = int(_number(state, "attempts", 0))
        # None when no attempt is planned: every recipient is done (failed) or the message is held.
        self.next_attempt: float | None = (
            None if state.get("next_attempt", 0) is None else _time(state, "next_attempt", self.queued_at)
        )
        self.last_error = _optional_text(state, "last_error")
        self.size = size
        self.owner_uid = owner_uid
        self.warned = state.get("warned") is True  # the one delay notice has gone out
        self.bounce_due = state.get("bounce_due") is True  # an admin asked for a bounce (pymta queue bounce)
        self.relay = _optional_text(state, "relay")  # the server of the last attempt, if one answered
        self.dsn_of = _optional_text(envelope, "dsn_of")  # this is a notice about that message
        # The last-resort notice to postmaster (`bounce.bounce_recipient`): routed without the admin rule,
        # and a failure of it is told to no one.
        self.to_postmaster = envelope.get("to_postmaster") is True
        # Seconds spent on hold, added up by `pymta queue release`: not part of the message's lifetime.
        self.held_seconds = max(0.0, float(_number(state, "held_seconds", 0)))


_UID_HEAD = b'{"v":1,"uid":'


def _uid_from_head(head: bytes) -> int | None:
    """The uid that a queue file written by `submit` or the pick-up starts with (`{"v":1,"uid":N,`)."""
    if not head.startswith(_UID_HEAD):
        return None
    rest = head[len(_UID_HEAD) :]
    sign = -1 if rest[:1] == b"-" else 1
    rest = rest[1:] if sign < 0 else rest
    end = len(rest) - len(rest.lstrip(b"0123456789"))
    if not end or rest[end : end + 1] != b",":
        return None
    return sign * int(rest[:end])


class _QueueLimit:
    """`max_queued_per_user` during one pick-up: which uids it applies to, how many each has queued (counted
    once, when the first submission it applies to turns up), and how many of theirs were left waiting."""

    def __init__(self, spool: Spool, limit: int) -> None:
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


class _PickUpBudget:
    """`MAX_PICKUP_PER_USER` during one pick-up: how many drops of each user it looked at, and how many of
    theirs it left for a later run. Root and the spool's owner (the admins, and the flush's own notices)
    have no budget."""

    def __init__(self, spool: Spool) -> None:
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


def _parse_envelope(line: bytes) -> dict[str, object]:
    import json

    try:
        envelope = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: arrays nested 200,000 deep
        raise ValueError("the envelope line is not JSON: not a pymta queue file") from None
    if not isinstance(envelope, dict) or envelope.get("v") != ENVELOPE_VERSION:
        raise ValueError("unknown envelope format")
    return envelope


def _text(data: dict[str, object], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"envelope field {key!r} is not text")
    return value


def _optional_text(data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _number(data: dict[str, object], key: str, default: float) -> float:
    """A number of the envelope or state: finite, and no larger than a time can be (an integer of 400
    digits would overflow every float conversion that follows)."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"envelope field {key!r} is not a number")
    if not -MAX_TIME <= value <= MAX_TIME:  # also false for NaN
        raise ValueError(f"envelope field {key!r} is out of range")
    return value


def _time(data: dict[str, object], key: str, default: float) -> float:
    value = float(_number(data, key, default))
    if value < 0:
        raise ValueError(f"envelope field {key!r} is not a time")
    return value


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
    here, so a hand-made drop costs only itself (DESIGN.md invariant 10)."""
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
    queued_at = _time(envelope, "queued_at", -1.0)
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
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        return "holds a control character (header injection?)"
    return None


def _is_nonempty_dir(path: str) -> bool:
    try:
        return bool(os.listdir(path))
    except FileNotFoundError:
        return False
    except OSError:
        return True


def unlink_quietly(path: str) -> None:
    """Unlink `path` if it is there; a file already gone, or one we may not remove, is not an error here."""
    try:
        os.unlink(path)
    except OSError:
        pass
