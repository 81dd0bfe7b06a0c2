"""The locks of a spool, and freeing what a flush delivered.

    flush.lock      flock'ed by the one flush that may run (`lock_flush`): two flushes never deliver at once,
                    and sendmail never waits for it (invariant 4)
    flush.request   asks the flush that holds the lock to look at the queue once more (`request_flush`)
    queue/ID        flock'ed while a flush delivers it or a `pymta queue` command changes it (`lock_message`)

A delivered message is unlinked at once (that is the decision) and its lock let go; freeing its blocks,
which the close of its last descriptor does, is left to the reaper, a process of the flush's own
(`pymta.queue.reaper`), REAP_BATCH descriptors at a time. The unlinks are made durable in batches: queue/
and state/ are fsynced at the first removal that comes REMOVAL_SYNC_INTERVAL or more after the last
fsync (by the reaper, or here while it is not running), and once more after the run's last removal
(`finish_removals`); in between, the file system's own commit (about 5 s on ext4) may come first. A power
loss before that fsync can only bring back a message that was delivered (a duplicate, never a loss):
ARCHITECTURE.md, invariant 3.
"""

from __future__ import annotations

import os
import time

from pymta.queue.directory import READ_FLAGS, SpoolDirectory, unlink_quietly, write_error
from pymta.queue.reaper import REAP_BATCH, Reaper, close_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.queue.entry import QueueEntry

# Seconds between the fsyncs of queue/ and state/ that make removals durable while removals keep coming:
# one fsync a second for any number of messages, where one each would cost a journal commit per message;
# and a power loss can bring back only the messages of the last second, delivered again.
REMOVAL_SYNC_INTERVAL = 1.0


class Locks(SpoolDirectory):
    """The locks of a spool and its reaper (`pymta.queue.spool.Spool` has them)."""

    _reaper: Reaper | None = None  # frees delivered messages in the background, from the first removal on
    _batch: list[int]  # descriptors of removed messages not yet handed to the reaper
    _sync_due = 0.0  # time.monotonic() from which the next removal asks the reaper for an fsync

    def remove(self, entry: QueueEntry, lock: int | None = None) -> None:
        """Forget a message whose every recipient is done: unlink queue/ID (that unlink is the decision),
        then state/ID.

        A descriptor of the file stays open across the unlink, its lock is let go (the message is gone by
        name: nobody can take it again), and the reaper closes it while the flush goes on, with the
        REAP_BATCH removed before it: whoever lets go of an unlinked file last pays for freeing its blocks,
        and for a file that was fsynced that costs three renames here, ten times the unlink itself.
        `finish_removals` waits for those closes. A crash leaves nothing behind: the kernel frees an
        unlinked file whose last descriptor goes (after a power loss, when the file system is mounted again).

        `lock`, the message's lock descriptor (`lock_message`), is that descriptor when given, and is handed
        over: the caller must not unlock it (unless this raises).
        """
        fd = os.open(entry.path, READ_FLAGS) if lock is None else lock
        try:
            os.unlink(entry.path)
        except BaseException:
            if lock is None:
                os.close(fd)
            raise
        if entry.has_state:
            unlink_quietly(self.state_prefix + entry.id)
        if lock is not None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)  # as the close would, at once: a waiting `pymta queue` says gone
        if self._reaper is None:
            self._reaper = Reaper((self.dir("queue"), self.dir("state")))
            self._batch = []
            self._sync_due = time.monotonic() + REMOVAL_SYNC_INTERVAL
        self._batch.append(fd)
        sync = time.monotonic() >= self._sync_due
        if sync or len(self._batch) >= REAP_BATCH:
            if sync:
                self._sync_due = time.monotonic() + REMOVAL_SYNC_INTERVAL
            batch, self._batch = self._batch, []
            if len(batch) < REAP_BATCH and not self._reaper.running:
                close_all(batch)  # a few, for an fsync that is due: a fork for them would cost more
                self._reaper.sync()
            else:
                self._reaper.hand_over(batch, sync)

    def finish_removals(self) -> None:
        """Wait until every message handed to `remove` is freed, and make their removal durable. A run that
        filled no batch closes its few here (a fork for them would cost more) and forked no reaper."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            if reaper.running:
                reaper.hand_over(self._batch)
            else:
                close_all(self._batch)
            self._batch = []
            reaper.finish()
            reaper.sync()

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

        fd = os.open(self.queue_prefix + name, READ_FLAGS)
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
