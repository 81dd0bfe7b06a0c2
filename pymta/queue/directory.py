"""The spool directory: where its parts are, the file primitives every part of the queue uses (an atomic
private write, a bounded read, an fsync of a directory, a one-line error for a failed write), and reading
a queued message and its state (`SpoolDirectory`). What the parts hold is in `pymta.queue.spool`'s docstring,
the commit protocol that writes them in `pymta.queue.commit`'s. The primitives that sendmail's commit needs
as well live there, and are imported from here too.
"""

from __future__ import annotations

import errno
import functools
import os
from stat import S_ISREG

from pymta.fsutil import read_all
from pymta.mail.message import header_known
from pymta.mail.text import BLOCK, Text
from pymta.queue.commit import encode_json as encode_json
from pymta.queue.commit import fsync_dir as fsync_dir
from pymta.queue.commit import new_id as new_id
from pymta.queue.commit import unlink_at as unlink_at
from pymta.queue.commit import unlink_quietly as unlink_quietly
from pymta.queue.commit import write_all as write_all
from pymta.queue.commit import write_error as write_error
from pymta.queue.entry import (
    MAX_ENVELOPE_LINE,
    MAX_STATE_SIZE,
    MessageState,
    QueueEntry,
    parse_envelope,
    parse_state,
    time_field,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# What a listing reads of a queue file at first: the envelope line is almost always shorter.
_HEAD = 8192
# A state file smaller than this is read in one pread (a longer read would only be shorter at its end).
_STATE_READ = 16384


def is_queue_id(name: str) -> bool:
    """Whether `name` is what `new_id` makes (now or in earlier versions): 24 lower-case hex digits."""
    return len(name) == 24 and not name.strip("0123456789abcdef")


def quoted(name: str) -> str:
    """A file name as a log line or listing may show it: as it is when it is printable ASCII without
    blanks, else as a Python literal (a name holding a newline must not forge a log line)."""
    if name and name.isascii() and name.isprintable() and " " not in name:
        return name
    return ascii(name)


# The envelope line is looked for in this much of a queue file's start; a longer one (thousands of
# recipients) is found in a read of the whole file.
ENVELOPE_READ = 65536


class SpoolDirectory:
    """A spool directory and what reads it. Cheap to construct; nothing touches the disk until a method is
    called. `pymta.queue.spool.Spool` adds the commit protocol, the pick-up and the locks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dirs: dict[str, str] = {}
        # queue/ and state/ with their slash: the path of a file there is one concatenation (the flush
        # makes a few for every message).
        self.queue_prefix = os.path.join(path, "queue", "")
        self.state_prefix = os.path.join(path, "state", "")

    def dir(self, name: str) -> str:
        """The path of one of the spool's directories (tmp, new, queue, ...)."""
        path = self._dirs.get(name)
        if path is None:
            path = self._dirs[name] = os.path.join(self.path, name)
        return path

    # -- the write side (sendmail) --

    def _names(self, location: str) -> Iterator[str]:
        try:
            with os.scandir(self.dir(location)) as listing:
                for item in listing:
                    if not item.name.startswith("."):
                        yield item.name
        except FileNotFoundError:
            return

    def read_entry(
        self, location: str, name: str, dir_fd: int | None = None, state_fd: int | None = None
    ) -> QueueEntry:
        """Read the envelope of new/NAME or queue/NAME, and state/NAME if there is one. `dir_fd` and
        `state_fd` (descriptors of that directory and of state/) spare a listing the lookup of each path.

        The envelope line comes from the file's first bytes (one pread; a longer line, up to
        MAX_ENVELOPE_LINE, takes a second): the message itself is not read."""
        path = f"{self.dir(location)}/{name}"
        fd = os.open(path if dir_fd is None else name, READ_FLAGS, dir_fd=dir_fd)
        try:
            info = os.fstat(fd)
            if not S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            head = os.pread(fd, _HEAD, 0)
            end = head.find(b"\n")
            if end < 0 and len(head) == _HEAD:
                head = os.pread(fd, MAX_ENVELOPE_LINE, 0)
                end = head.find(b"\n")
        finally:
            os.close(fd)
        if end < 0:
            raise ValueError("no envelope line: not a pymta queue file")
        envelope = parse_envelope(head[:end])  # without its line end: the fast path of `_json_value`
        state = None
        if location == "queue":
            state = self.read_state(name, _queued_at(envelope), state_fd)
        return QueueEntry(location, path, envelope, state, info.st_size - end - 1, info.st_uid)

    def read_state(
        self, name: str, queued_at: float = 0.0, state_fd: int | None = None
    ) -> MessageState | None:
        """state/NAME (`MessageState`; without a next attempt, due from `queued_at`), or None when there is
        none. Opened without following a link or waiting on
        a FIFO, and read only when it is a regular file of at most MAX_STATE_SIZE bytes: whatever the
        spool's owner planted there costs a listing one line, never a hang or the memory."""
        try:
            if state_fd is None:
                fd = os.open(self.state_prefix + name, READ_FLAGS)
            else:
                fd = os.open(name, READ_FLAGS, dir_fd=state_fd)
        except FileNotFoundError:
            return None  # never tried: the common case on the flush's hot path, so no file object is made
        try:
            # The usual state: one read, to the end of the file, and no fstat (a listing reads 100,000).
            # What else the spool's owner can put here (a FIFO, a directory, a hard link to a device
            # every user may read and write: /dev/null, /dev/zero, /dev/tty, ...; protected_hardlinks
            # allows no other) fails that read (opened without waiting), fills it, or gives nothing:
            # each of those goes to fstat, which says what it is, before anything is parsed.
            try:
                data = os.pread(fd, _STATE_READ, 0)
            except OSError:
                data = b""
            if not 0 < len(data) < _STATE_READ:
                info = os.fstat(fd)
                if not S_ISREG(info.st_mode):
                    raise ValueError("state file is not a regular file")
                if info.st_size < _STATE_READ:
                    data = os.pread(fd, _STATE_READ, 0)
                else:
                    data = read_all(fd, min(info.st_size, MAX_STATE_SIZE), limit=MAX_STATE_SIZE + 1)
                if len(data) > MAX_STATE_SIZE:
                    raise ValueError(f"state file is larger than {MAX_STATE_SIZE} bytes")
        finally:
            os.close(fd)
        return parse_state(data, queued_at)

    def load(self, name: str, fd: int | None = None) -> tuple[QueueEntry, bytes]:
        """A picked-up message and its entry, read whole (`load_text`, then all of it in memory)."""
        entry, text = self.load_text(name, fd)
        return entry, text.whole()

    def load_text(self, name: str, fd: int | None = None) -> tuple[QueueEntry, Text]:
        """A picked-up message and its entry, from one read of queue/NAME (the flush's hot path).

        `fd`, when given, is a descriptor of queue/NAME that is already open (the one `lock_message`
        returned): the file is read through it, from its start, and it stays open. A message larger than
        `text.BLOCK` is then read only as far as its header block goes (`message.header_known`); the `Text`
        reads the rest through `fd` as it is sent, so `fd` must stay open while the `Text` is used.
        FileNotFoundError when that file has no name any more (deleted by a queue command between the open
        and the lock; queue files are only ever unlinked, never replaced, and only the one flush renames
        them).
        """
        path = self.queue_prefix + name
        own = fd is None
        if fd is None:
            fd = os.open(path, READ_FLAGS)
        try:
            info = os.fstat(fd)
            if info.st_nlink == 0:
                raise FileNotFoundError(errno.ENOENT, "deleted since it was opened", path)
            if not S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            # The envelope line first (a small file comes whole with it), then a larger message in a read
            # of its own: slicing it off one read of the whole file would hold it twice for a moment.
            head = read_all(fd, info.st_size, limit=ENVELOPE_READ)
            cut = head.find(b"\n")
            if cut < 0:
                line, newline, message = read_all(fd, info.st_size).partition(b"\n")
                text = Text(message)
            elif len(head) == info.st_size:  # all of it in that one read: most messages
                line, newline, text = head[:cut], b"\n", Text(head[cut + 1 :])
            else:
                line, newline = head[:cut], b"\n"
                text = _text_of(fd, cut + 1, info.st_size, streamed=not own)
        finally:
            if own:
                os.close(fd)
        if not newline:
            raise ValueError("no envelope line: not a pymta queue file")
        envelope = parse_envelope(line)
        state = self.read_state(name, _queued_at(envelope))
        entry = QueueEntry("queue", path, envelope, state, len(text), info.st_uid)
        if entry.id != name:
            raise ValueError(f"its envelope claims the id {entry.id!r}, not its file name")
        return entry, text

    def read_message(self, entry: QueueEntry) -> bytes:
        """The stored message of an entry, without its envelope line."""
        fd = os.open(entry.path, READ_FLAGS)
        with os.fdopen(fd, "rb") as handle:
            handle.readline(MAX_ENVELOPE_LINE)
            return handle.read()

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
                write_all(fd, data)
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


def _queued_at(envelope: dict[str, object]) -> float:
    """When the message of `envelope` was queued, for reading its state: as it is when it is a float (what
    pymta writes; `QueueEntry` checks its range), else through `time_field`'s checks."""
    queued_at = envelope.get("queued_at", 0)
    return queued_at if type(queued_at) is float else time_field(envelope, "queued_at", 0)


def _text_of(fd: int, start: int, size: int, *, streamed: bool) -> Text:
    """The message in the file behind `fd` from offset `start` to `size`: whole in memory when it is small
    or not `streamed`; else its start, as far as its header block goes, and the rest read later through
    `fd` (`Text`)."""
    if not streamed or size - start <= BLOCK:
        return Text(read_all(fd, size, start=start))
    head = b""
    want = BLOCK
    while True:
        head = read_all(fd, start + want, limit=want, start=start)
        if len(head) < want or header_known(head):
            break
        want *= 4  # a header of more than a block: rare; the whole of it is held, as it must be
    if len(head) < want and start + len(head) >= size:
        return Text(head)
    return Text(head, functools.partial(os.pread, fd), start + len(head), size - start - len(head))
