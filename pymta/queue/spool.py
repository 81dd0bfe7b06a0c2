"""The spool and its commit protocol: durable submission (`Spool.submit`), and the state of each queued
message (`write_state`, `due`). It knows nothing of SMTP. Beside it, by job:

    directory.py  the layout's paths, the file primitives, reading a queued message
    entry.py      the one typed record of a queued message: envelope (`QueueEntry`) and state
                  (`MessageState`, the keys of state/ID)
    pickup.py     the pick-up gate: new/ to queue/, drop validation, sender policy, per-user limits
    locks.py      flush.lock, flush.request, the message locks, the removal of delivered messages
    reaper.py     the process that frees delivered messages (closes their last descriptors) and fsyncs

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
    mta-sts/     direct delivery's cache of MTA-STS policies, one file per domain (0700, made by the
                 flush as the spool's owner on first use: `pymta.delivery.mtasts.PolicyCache`)

A submission file, and the commit protocol that writes it durably (what a crash at each step leaves), are
in `pymta.queue.commit`: sendmail imports that module alone, not this one.
"""

from __future__ import annotations

import os
from array import array
from itertools import accumulate

from pymta.errors import SpoolError, SpoolFullError
from pymta.queue import commit as _commit
from pymta.queue.commit import STATE_MIN_FREE as STATE_MIN_FREE
from pymta.queue.commit import SUBDIRS as SUBDIRS
from pymta.queue.commit import SUBMIT_MIN_FREE as SUBMIT_MIN_FREE
from pymta.queue.commit import real_user as real_user
from pymta.queue.directory import quoted, unlink_quietly, write_error
from pymta.queue.entry import NEVER, MessageState, QueueEntry
from pymta.queue.locks import Locks
from pymta.queue.pickup import PickUp, PickUpBudget

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

# A writer killed mid-message leaves tmp/ID behind; Maildir's rule says such files may go after 36 hours.
STALE_TMP_AGE = 36 * 3600


class Spool(PickUp, Locks):
    """A spool directory. Cheap to construct; nothing touches the disk until a method is called.

    The commit protocol (`submit`) and the state (`write_state`, `due`) are here; the reading side is
    `SpoolDirectory`'s, the pick-up `PickUp`'s, the locks `Locks`'."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.private = True  # after submit(): whether the spool is this user's own (user mode)
        self._reaper = None
        self.limit_warned = set()

    # -- the write side (sendmail's is `pymta.queue.commit`) --

    def create_private(self, parents: bool = False) -> None:
        """Create a user-mode spool (directories 0700); see `pymta.queue.commit.create_private`."""
        _commit.create_private(self.path, parents)

    def submit(
        self,
        envelope: dict[str, object],
        message: bytes,
        *,
        create: bool = True,
        create_parents: bool = False,
        reserve: int = 0,
    ) -> str:
        """Commit a submission durably (`pymta.queue.commit.commit`) and return its id."""
        self.private = _commit.open_spool(self.path, create=create, create_parents=create_parents)
        return _commit.commit_to(self.path, self.private, envelope, message, reserve)

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
        """Every committed message, oldest first, and a line for each entry that could not be read
        (`scan`, held in lists)."""
        found: list[QueueEntry] = []
        problems: list[str] = []
        for item in self.scan():
            if isinstance(item, str):
                problems.append(item)
            else:
                found.append(item)
        return found, problems

    def scan(self) -> Iterator[QueueEntry | str]:
        """Every committed message, oldest first (by id: `new_id`), read one at a time as it is yielded,
        and a line (a str) for each entry that could not be read. Only the names are held, so a listing
        of 100,000 messages starts printing at once and holds one message at a time.

        Of one user's files waiting in new/ (root's and ours aside) no more than `MAX_PICKUP_PER_USER` are
        read, as the pick-up does: 300,000 files dropped there would make every listing and every user's
        view (`pymta.queue.views`) huge. One line says how many more there are (at the end).

        PermissionError (at once, not when the first is read) when this user may not list the spool."""
        budget = PickUpBudget(self)
        waiting: set[str] = set()  # the names in new/: few, beside the many in queue/
        problems: list[str] = []
        for name in self._names("new"):  # before queue/: one picked up meanwhile is found there
            try:
                if budget.admits(os.lstat(os.path.join(self.dir("new"), name)).st_uid):
                    waiting.add(name)
            except FileNotFoundError:
                continue  # picked up or deleted while we looked
            except OSError as exc:
                problems.append(f"new/{quoted(name)}: {exc}")
        names = [*waiting, *self._names("queue")]  # bare names: 100,000 pairs would cost 6 MiB more
        names.sort()
        # Held as strings of _RUN names, each ended by a NUL (which no file name holds), made from the end
        # of the list as it shrinks: 100,000 names are then 2.5 MiB rather than 9 MiB of str objects and
        # the list, for as long as the listing runs.
        runs: list[str] = []
        while names:
            runs.append("\0".join(names[-_RUN:]) + "\0")
            del names[-_RUN:]
        runs.reverse()
        return self._read_listed(runs, waiting, problems, budget)

    def _read_listed(
        self, runs: list[str], waiting: set[str], problems: list[str], budget: PickUpBudget
    ) -> Iterator[QueueEntry | str]:
        yield from problems
        fds = {location: _open_dir_quietly(self.dir(location)) for location in ("new", "queue", "state")}
        try:
            for name in _names_of(runs):
                location = "queue"
                if name in waiting:  # a name listed in both: the first of the two is new/'s
                    waiting.discard(name)
                    location = "new"
                try:
                    yield self.read_entry(location, name, fds[location], fds["state"])
                except FileNotFoundError:
                    continue  # picked up or deleted while we looked
                except (OSError, ValueError) as exc:
                    yield f"{location}/{quoted(name)}: {exc}"
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
        left: list[str] = []
        budget.report(left.append)
        yield from left

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

    def due(self, now: float) -> Names:
        """The ids in queue/ whose next attempt has come, oldest submission first. Reads no file."""
        return self.schedule(now)[0]

    def schedule(self, now: float) -> tuple[Names, Names]:
        """The ids in queue/ whose next attempt has come (`due`), and those parked with no attempt planned
        (their state's mtime is NEVER: failed or held, what `ops.expire_failed` looks at), each sorted:
        one listing of state/, then a stat of state/ID for each queued message that may have one, and no
        file read; nothing held of the others (an idle flush of 100,000 deferred messages holds two empty
        lists). The ids are kept as `Names`: a flush of 100,000 due messages holds 3 MB of them while it
        delivers, not 9.

        The listing spares a message never tried (most of a busy queue) a stat that fails. It is held as a
        filter of fixed size (`_listed`), not as the names: a name it may hold is looked at as before, one
        it cannot hold has no state. A state written after the listing (a queue command meanwhile) is
        met where it counts: a message is loaded under its lock, state and all, before anything is sent,
        and a held one is never sent; a parked one found due has nothing pending."""
        due: list[str] = []
        parked: list[str] = []
        state_fd = _open_dir_quietly(self.dir("state"))
        try:
            stat = os.stat
            listed = _listed(state_fd)
            for name in self._names("queue"):
                try:
                    if listed is not None and not _may_hold(listed, name):
                        mtime = 0.0  # never tried: no state, so no stat that fails
                    elif state_fd is None:
                        mtime = stat(os.path.join(self.dir("state"), name)).st_mtime
                    else:
                        mtime = stat(name, dir_fd=state_fd).st_mtime
                except OSError:  # never tried; or a state the delivery cannot read either and sets aside
                    mtime = 0.0
                if mtime <= now:
                    due.append(name)
                elif mtime >= NEVER:
                    parked.append(name)
        finally:
            if state_fd is not None:
                os.close(state_fd)
        due.sort()
        parked.sort()
        return Names(due), Names(parked)

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


class Names:
    """Names in the order given, held as one string and where each one ends: a list of 100,000 queue ids
    costs 9 MB (88 bytes an id: the string and its pointer), this 3 MB (24 bytes and an offset). A
    sequence (len, index, iteration), equal to a list or tuple of the same names."""

    __slots__ = ("_text", "_ends")

    def __init__(self, names: Iterable[str] = ()) -> None:
        names = names if isinstance(names, list) else list(names)
        self._text = "".join(names)
        self._ends = array("Q", accumulate(map(len, names)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self._ends)
        end = self._ends[index]  # IndexError when out of range
        return self._text[self._ends[index - 1] if index else 0 : end]

    def __iter__(self) -> Iterator[str]:
        text, start = self._text, 0
        for end in self._ends:
            yield text[start:end]
            start = end

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list | tuple | Names):
            return NotImplemented
        return len(self) == len(other) and all(
            mine == theirs for mine, theirs in zip(self, other, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]  # equal to lists: as unhashable as they are

    def __repr__(self) -> str:
        return f"Names({list(self)!r})"


# How many names `Spool.scan` joins into one string.
_RUN = 4096


def _names_of(runs: list[str]) -> Iterator[str]:
    """The names in `runs` (strings of names each ended by a NUL), in order; each run let go of once read."""
    runs.reverse()
    while runs:
        run = runs.pop()
        start, find = 0, run.find
        while (end := find("\0", start)) >= 0:
            yield run[start:end]
            start = end + 1


# The size in bits of `_listed`'s filter: 128 KiB, whatever the queue holds; with 100,000 states in it, one
# name in ten that has none is looked at all the same.
_FILTER_BITS = 1 << 20


def _listed(directory: int | None) -> bytearray | None:
    """A filter of the names in the directory behind `directory` (a bit per name's hash: `_may_hold`); None
    when it cannot be listed (then every name is looked at)."""
    if directory is None:
        return None
    bits = bytearray(_FILTER_BITS >> 3)
    mask = _FILTER_BITS - 1
    try:
        with os.scandir(directory) as listing:
            for item in listing:
                bit = hash(item.name) & mask
                bits[bit >> 3] |= 1 << (bit & 7)
    except OSError:
        return None
    return bits


def _may_hold(bits: bytearray, name: str) -> bool:
    """Whether the listing `bits` (`_listed`) may hold `name`; False only when it does not."""
    bit = hash(name) & (_FILTER_BITS - 1)
    return bool(bits[bit >> 3] & (1 << (bit & 7)))


def _open_dir_quietly(path: str) -> int | None:
    """A descriptor of the directory `path` to open names in; None when it cannot be opened (then each
    name is opened by its path, and fails or not as it would)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
