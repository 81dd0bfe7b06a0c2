"""The locks of a spool, and freeing what a flush delivered.

    flush.lock      flock'ed by the one flush that may run (`lock_flush`): two flushes never deliver at once,
                    and sendmail never waits for it (invariant 4)
    flush.request   asks the flush that holds the lock to look at the queue once more (`request_flush`)
    queue/ID        flock'ed while a flush delivers it or a `pymta queue` command changes it (`lock_message`)

A delivered message is unlinked at once (that is the decision) and its lock let go, and background
threads, the reapers, close its last descriptor, which is what frees its blocks (`remove`): the
descriptors go to them REAP_BATCH at a time, so that the flush wakes a thread once per batch, not once per
message. The unlinks are made durable in batches: a reaper fsyncs queue/ and state/ at most
REMOVAL_SYNC_INTERVAL after a removal, and the run does once more after its last one (`finish_removals`).
A power loss before that fsync can only bring back a message that was delivered (a duplicate, never a
loss): ARCHITECTURE.md, invariant 3.
"""

from __future__ import annotations

import os
import time

from pymta.queue.directory import READ_FLAGS, SpoolDirectory, fsync_dir, unlink_quietly, write_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    import queue
    import threading

    from pymta.queue.entry import QueueEntry

# Threads that close the descriptors of delivered messages. On ext4 one thread closing unlinked files frees
# about 300 a second on a busy disk, and falls ever further behind a flush of thousands; two or more free
# ten times as many in the same time (their journal work is batched), so the flush never waits for them.
REAPERS = 4
# Descriptors of delivered messages handed to the reapers at once. Handing each over on its own woke a thread
# per message, and the interpreter lock went back and forth with it: 18 futex calls a message, a fifth of a
# flush's time on two cores. A batch keeps at most this many unlinked files open (their locks let go).
REAP_BATCH = 32
# Seconds after a removal within which a reaper makes it durable (an fsync of queue/ and state/, in the
# background): one fsync a second for any number of messages, where one each would cost a journal commit
# per message; and a power loss can bring back only the messages of the last second, delivered again.
REMOVAL_SYNC_INTERVAL = 1.0
# What a reaper is handed, beside descriptors to close, when the removals before are to be made durable.
_SYNC = -1


class Locks(SpoolDirectory):
    """The locks of a spool and its reaper (`pymta.queue.spool.Spool` has them)."""

    _reapers: list[threading.Thread] | None = None  # free delivered messages in the background
    _doomed: queue.SimpleQueue[list[int] | None]
    _batch: list[int]  # descriptors of removed messages not yet handed to the reapers
    _sync_due = 0.0  # time.monotonic() from which the next removal asks a reaper for an fsync

    def remove(self, entry: QueueEntry, lock: int | None = None) -> None:
        """Forget a message whose every recipient is done: unlink queue/ID (that unlink is the decision),
        then state/ID.

        A descriptor of the file stays open across the unlink, its lock is let go (the message is gone by
        name: nobody can take it again), and a background thread closes it while the flush goes on, with
        the REAP_BATCH removed before it: whoever lets go of an unlinked file last pays for freeing its
        blocks, and for a file that was fsynced that costs three renames here, ten times the unlink itself.
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
            unlink_quietly(os.path.join(self.dir("state"), entry.id))
        if lock is not None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)  # as the close would, at once: a waiting `pymta queue` says gone
        if self._reapers is None:
            import queue
            import threading

            self._doomed = queue.SimpleQueue()
            self._batch = []
            self._reapers = [
                threading.Thread(target=self._reap, name=f"pymta-reaper-{number}", daemon=True)
                for number in range(REAPERS)
            ]
            for reaper in self._reapers:
                reaper.start()
            self._sync_due = time.monotonic() + REMOVAL_SYNC_INTERVAL
        self._batch.append(fd)
        sync = time.monotonic() >= self._sync_due
        if sync or len(self._batch) >= REAP_BATCH:
            self._doomed.put(self._batch)
            self._batch = []
        if sync:
            self._sync_due = time.monotonic() + REMOVAL_SYNC_INTERVAL
            self._doomed.put([_SYNC])

    def _reap(self) -> None:
        while (batch := self._doomed.get()) is not None:
            for fd in batch:
                if fd == _SYNC:
                    self._sync_removals()
                else:
                    os.close(fd)

    def _sync_removals(self) -> None:
        """Make the unlinks in queue/ and state/ durable. A failure is not the run's: at worst a power loss
        brings those delivered messages back, to be delivered again."""
        for location in ("queue", "state"):
            try:
                fsync_dir(self.dir(location))
            except OSError:
                continue

    def finish_removals(self) -> None:
        """Wait until every message handed to `remove` is freed, and make their removal durable."""
        if self._reapers is not None:
            self._doomed.put(self._batch)
            self._batch = []
            for _ in self._reapers:
                self._doomed.put(None)
            for reaper in self._reapers:
                reaper.join()
            self._reapers = None
            self._sync_removals()

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

        fd = os.open(os.path.join(self.dir("queue"), name), READ_FLAGS)
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
