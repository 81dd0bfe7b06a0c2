"""The commit protocol: how `sendmail` writes one submission into a spool durably (`commit`), and the file
primitives the rest of the queue shares with it. The layout of a spool is in `pymta.queue.spool`'s
docstring; this is its write side, alone, because sendmail runs it for every message on the machine.

A submission file is one line of envelope JSON (sender, recipients, who submitted it, when, DSN options)
followed by the message exactly as it will be stored. One file, so that it appears whole or not at all.
Its first keys are `v` and `uid` (`{"v":1,"uid":N,...`), so that counting a user's queued messages
(`queued_per_uid`, for `max_queued_per_user`) reads 64 bytes of each file.

The commit protocol of `commit`, and what a crash after each step leaves behind:

    1. open tmp/ID with O_CREAT | O_EXCL | O_NOFOLLOW; ID is 48 random bits behind a time prefix
    2. write the envelope line and the message          crash: a partial tmp/ID that nobody reads
    3. fsync the file                                   crash: a complete tmp/ID that nobody reads
    4. rename tmp/ID to new/ID (atomic)                 crash: new/ID may not survive a power loss, and
                                                        sendmail has not yet said it was accepted
    5. fsync new/ (a user who may not open the drop     the entry is durable: only now sendmail exits 0;
       directory: fsync the file again, see              if this fails, or an interruption (SIGINT)
       `_sync_new_name`)                                 stops any step, tmp/ID and new/ID are unlinked
                                                         again and sendmail fails ("nothing was queued")

So a reader sees a whole entry in new/ or none, and a caller told "accepted" has a durable entry. Leftovers in
tmp/ are removed by the flush once they are older than `STALE_TMP_AGE` (`pymta.queue.spool`).

Unlike Python's mailbox.Maildir.add this fsyncs both the file and the directory, and unlike nullmailer it
renames rather than links, so a rename over an existing name cannot happen: the random ID makes it so.

In system mode new/ and tmp/ are writable by everyone but listable by no one (1733); a dropped file must be
readable by the flusher, so it is protected by its unguessable name, not by its mode (0644). In user mode
everything is the user's own and private (0700 directories, 0600 files). In a spool that is not the
submitter's own, steps 1, 4 and 5 resolve the names from descriptors of tmp/ and new/ opened without
following a link and checked (`_commit_shared`): the spool's owner cannot make root, or any user, write
the mail into a directory of its choosing (ARCHITECTURE.md, invariant 10).

`sendmail` imports this module on every cron job: it imports only posix, errno and time (and pwd when it
runs), pymta.errors and pymta.config.paths; no json (it pulls in re: `encode_json` writes the envelope), no
annotations future, and not even os: `posix` is the built-in module under it, already loaded by the
interpreter, while os (with _collections_abc, stat and posixpath) costs a millisecond per message. Only
`create_private`, which runs once per user, imports os.

The message is given whole (bytes) or as an iterable of blocks (sendmail streams a large message from its
standard input: the blocks are written as they come, and an exception raised by the iterable, such as a
size limit reached, takes the commit back like any other).
"""

import errno
import posix
import time

from pymta.config.paths import join
from pymta.errors import SpoolError, SpoolFullError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

SUBDIRS = ("tmp", "new", "queue", "state", "corrupt")
ENVELOPE_VERSION = 1  # the `v` of every envelope line (`pymta.queue.entry` reads it)
# Bytes the state directory must have free before a flush delivers anything: a state record is under 1 KiB,
# and one that cannot be written would make every later run send its delivered recipients again.
STATE_MIN_FREE = 256 * 1024
# Free space a sendmail submission must leave on the spool's file system beyond its own size: the flush
# delivers nothing it could not record (`Spool.state_problem`), so a queue filled to its last bytes would
# stop the very runs that drain it. Postfix's queue_minfree keeps room for the same reason.
SUBMIT_MIN_FREE = 4 * STATE_MIN_FREE
_OPEN_FLAGS = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW | posix.O_CLOEXEC
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Opens a directory to resolve names from, without read rights (a drop directory is 1733) where the system
# has O_PATH (Linux); never through a link.
_DIR_FLAGS = getattr(posix, "O_PATH", posix.O_RDONLY) | posix.O_DIRECTORY | posix.O_CLOEXEC
_STICKY = 0o1000


# --- the file primitives ---


def new_id() -> str:
    """A queue id, 24 hex digits: 12 of the time in 1/65536 s (the first 8 are the seconds since 1970) and
    48 unguessable random bits. Ids sort in submission order, so the listing and the flush sort by id
    alone: those one process makes are strictly increasing, those of processes within one 1/65536 s tick
    sort randomly among themselves. Ids of earlier versions (8 digits of the seconds, 16 random ones) have
    the same shape: they sort to their second, in random order within it."""
    global _last_tick
    tick = max(time.time_ns() * 65536 // 1_000_000_000, _last_tick + 1)
    _last_tick = tick
    return f"{tick:012x}{posix.urandom(6).hex()}"


_last_tick = 0


def _json_string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # the common case, without a loop over the characters
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
    fd = posix.open(path, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)


def unlink_at(dir_fd: int, name: str) -> None:
    try:
        posix.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = posix.write(fd, view)
        view = view[written:]


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


def unlink_quietly(path: str) -> None:
    """Unlink `path` if it is there; a file already gone, or one we may not remove, is not an error here."""
    try:
        posix.unlink(path)
    except OSError:
        pass


def real_user() -> tuple[str, str, int]:
    """The real submitting user as the operating system knows them (never what a message claims): login
    name, GECOS full name, uid. A uid without a passwd entry is named `uid<N>`."""
    import pwd

    uid = posix.getuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return f"uid{uid}", "", uid
    gecos = entry.pw_gecos.split(",", 1)[0].replace("&", entry.pw_name.capitalize())
    return entry.pw_name, gecos.strip(), uid


# --- the commit ---


def create_private(spool: str, parents: bool = False) -> None:
    """Create a user-mode spool (directories 0700). Its parent must exist unless `parents` (the default
    spool under ~/.local/state): a typo in a configured spool is not silently made."""
    import os  # only when a spool is made: sendmail's path does without os (see the module docstring)

    if not parents and not os.path.isdir(os.path.dirname(os.path.abspath(spool))):
        parent = os.path.dirname(os.path.abspath(spool))
        raise SpoolError(
            f"cannot create the spool {spool}: {parent} does not exist; "
            f"create it or set 'spool:' in the config (or run pymta setup)"
        )
    try:
        missing = []
        path = os.path.abspath(spool)
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for directory in reversed(missing):  # XDG: create missing base directories 0700
            os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in SUBDIRS:
            os.makedirs(os.path.join(spool, name), mode=0o700, exist_ok=True)
    except OSError as exc:
        raise write_error("cannot create the spool", spool, exc) from None


def commit(
    spool: str,
    envelope: dict[str, object],
    message: "bytes | Iterable[bytes]",
    *,
    create: bool = True,
    create_parents: bool = False,
    reserve: int = 0,
) -> tuple[str, bool]:
    """Commit a submission to `spool` durably (the protocol in the module docstring); return its id, and
    whether the spool is this user's own (user mode).

    `envelope` gets `v` and `id` added. Raises SpoolError (EX_CANTCREAT) when the spool cannot be
    written and SpoolFullError (EX_TEMPFAIL) when the disk or the file size limit is full, or when the
    message would leave less than `reserve` bytes free; either way nothing is left that a reader
    could pick up. `message` is bytes, or blocks of bytes written as they come (the module docstring).
    """
    private = open_spool(spool, create=create, create_parents=create_parents)
    return commit_to(spool, private, envelope, message, reserve), private


def open_spool(spool: str, *, create: bool = True, create_parents: bool = False) -> bool:
    """Whether `spool` is this user's own (user mode), created first (`create_private`) when it is missing
    and `create`. SpoolError when it cannot be used."""
    new_dir = join(spool, "new")
    try:
        owner = posix.stat(spool).st_uid
        drop = posix.lstat(new_dir)
    except FileNotFoundError:
        if not create or _holds_other_things(spool):
            raise SpoolError(
                f"the spool {spool} has no new/ directory; run 'pymta setup' or fix 'spool:' in the config"
            ) from None
        create_private(spool, parents=create_parents)
        owner, drop = posix.stat(spool).st_uid, posix.lstat(new_dir)
    except OSError as exc:
        raise write_error("cannot use the spool", spool, exc) from None
    # A spool owned by someone else is the system-mode maildrop: the flusher must read the file, and
    # nothing in it is followed (`_commit_shared`).
    return owner == drop.st_uid == posix.geteuid()


def commit_to(
    spool: str,
    private: bool,
    envelope: dict[str, object],
    message: "bytes | Iterable[bytes]",
    reserve: int = 0,
) -> str:
    """`commit`'s protocol in a spool that `open_spool` found `private` or not; the id."""
    new_dir = join(spool, "new")
    message_id = new_id()
    # The uid right after the version, where `queued_per_uid` reads it.
    head = {"v": ENVELOPE_VERSION, "uid": envelope["uid"]} if "uid" in envelope else {"v": ENVELOPE_VERSION}
    envelope = {**head, "id": message_id, **envelope}
    # The envelope line and the message, written one after the other: joined, a 30 MB message would be
    # held twice.
    line = encode_json(envelope).encode("ascii") + b"\n"
    data = _Parts(line, message, spool, reserve)
    if reserve:  # a streamed message is checked again once it is written (`_Parts`)
        _check_room(spool, len(line) + (len(message) if isinstance(message, bytes) else 0) + reserve)
    if not private:
        _commit_shared(spool, message_id, data)
        return message_id
    mode = 0o600
    tmp_path = join(spool, "tmp", message_id)
    try:
        fd = posix.open(tmp_path, _OPEN_FLAGS, mode)
    except OSError as exc:
        raise write_error("cannot write to the spool", join(spool, "tmp"), exc) from None
    target = join(new_dir, message_id)
    renamed = False
    try:
        posix.fchmod(fd, mode)  # whatever the caller's umask
        for part in data:
            write_all(fd, part)
        posix.fsync(fd)
        posix.rename(tmp_path, target)
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
        raise write_error("cannot write the message to the spool", spool, exc) from None
    finally:
        posix.close(fd)
    return message_id


class _Parts:
    """What a commit writes: the envelope line, then the message, whole or block by block. A streamed
    message is counted as it goes, and once it is all written the spool must still have `reserve` bytes
    free (SpoolFullError), as a whole one is checked with its size before anything is written."""

    __slots__ = ("line", "message", "spool", "reserve")

    def __init__(self, line: bytes, message: "bytes | Iterable[bytes]", spool: str, reserve: int) -> None:
        self.line = line
        self.message = message
        self.spool = spool
        self.reserve = reserve

    def __iter__(self) -> "Iterator[bytes]":
        yield self.line
        if isinstance(self.message, bytes):
            yield self.message
            return
        yield from self.message
        if self.reserve:
            _check_room(self.spool, self.reserve)


def _check_room(spool: str, needed: int) -> None:
    """SpoolFullError unless the spool's file system has `needed` bytes free for ordinary users."""
    try:
        info = posix.statvfs(spool)
    except OSError:
        return  # the commit that follows says what is wrong with the spool
    free = info.f_bavail * info.f_frsize
    if free < needed:
        raise SpoolFullError(
            f"the spool {spool} has only {free // 1024} KiB free, and {SUBMIT_MIN_FREE // 1024} KiB "
            "stay free for the deliveries that empty it: free some space, then send again"
        )


def _sync_new_name(directory: str, fd: int) -> None:
    """Make durable the name of the file `fd` that was just renamed into `directory`: fsync the directory.
    A writer who may not open it (system mode's drop directory, 1733: writable, not readable) fsyncs the
    file once more instead; the rename changed the file's inode (its ctime), so on ext4, XFS and btrfs that
    fsync commits the journal transaction holding the new name."""
    try:
        fsync_dir(directory)
    except PermissionError:
        posix.fsync(fd)


def _open_dir(name: str, parent_fd: int | None, path: str) -> int:
    """A descriptor of the directory `name` (relative to `parent_fd`, never through a link); `path` names
    it in the SpoolError raised when it cannot be opened."""
    flags = _DIR_FLAGS if parent_fd is None else _DIR_FLAGS | posix.O_NOFOLLOW
    try:
        return posix.open(name, flags, dir_fd=parent_fd)
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
    fd = _open_dir(path.rpartition("/")[2], spool_fd, path)
    info = posix.fstat(fd)
    problem = None
    if owner != 0 and info.st_uid not in (owner, 0):  # in a spool of root's nobody else can swap it
        problem = f"belongs to uid {info.st_uid}, not to the spool's owner (uid {owner})"
    elif info.st_mode & 0o022 and not info.st_mode & _STICKY:
        problem = f"has mode {info.st_mode & 0o7777:04o}: other users may remove what is queued there"
    if problem is not None:
        posix.close(fd)
        raise SpoolError(
            f"cannot write to the spool: {path} {problem}; nothing was queued; run 'pymta setup --check'"
        )
    return fd


def _commit_shared(spool: str, message_id: str, data: "Iterable[bytes]") -> None:
    """The commit protocol in a spool that is not ours (system mode), with every name resolved from a
    directory descriptor: the spool's owner can swap tmp/ or new/ for a link to another directory, and
    a submitter who followed it would write the mail there (root: anywhere). So tmp/ and new/ are opened
    without following a link and must be directories of the spool's owner (or root) that other users
    may not rename files in (sticky when writable by others); the file is created, renamed and made
    durable relative to them. The file is 0644: the flusher must read it."""
    spool_fd = _open_dir(spool, None, spool)
    try:
        owner = posix.fstat(spool_fd).st_uid
        tmp_fd = _open_drop_dir(spool_fd, join(spool, "tmp"), owner)
        try:
            new_fd = _open_drop_dir(spool_fd, join(spool, "new"), owner)
            try:
                _commit_in(spool, message_id, data, tmp_fd, new_fd)
            finally:
                posix.close(new_fd)
        finally:
            posix.close(tmp_fd)
    finally:
        posix.close(spool_fd)


def _commit_in(spool: str, message_id: str, data: "Iterable[bytes]", tmp_fd: int, new_fd: int) -> None:
    try:
        fd = posix.open(message_id, _OPEN_FLAGS, 0o644, dir_fd=tmp_fd)
    except OSError as exc:
        raise write_error("cannot write to the spool", join(spool, "tmp"), exc) from None
    renamed = False
    try:
        posix.fchmod(fd, 0o644)  # whatever the caller's umask
        for part in data:
            write_all(fd, part)
        posix.fsync(fd)
        posix.rename(message_id, message_id, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
        renamed = True
        try:
            directory = posix.open(".", posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC, dir_fd=new_fd)
        except PermissionError:
            posix.fsync(fd)  # a user may not open the drop directory: see `_sync_new_name`
        else:
            try:
                posix.fsync(directory)
            finally:
                posix.close(directory)
    except BaseException as exc:
        # Not durable, or interrupted: take it back, whichever name it has by now (see `commit`).
        unlink_at(tmp_fd, message_id)
        unlink_at(new_fd, message_id)
        if not isinstance(exc, OSError):
            raise
        if renamed:
            raise write_error("cannot make the queued message durable", join(spool, "new"), exc) from None
        raise write_error("cannot write the message to the spool", spool, exc) from None
    finally:
        posix.close(fd)


def _holds_other_things(path: str) -> bool:
    """Whether directory `path` holds anything but a spool's own subdirectories: a directory of someone
    else's that `spool:` names by mistake, never made a spool here. A spool another sendmail is still making
    (its tmp/ made, its new/ not yet: the first messages of several cron jobs at once) is finished instead."""
    try:
        return not set(posix.listdir(path)) <= set(SUBDIRS)
    except FileNotFoundError:
        return False
    except OSError:
        return True
