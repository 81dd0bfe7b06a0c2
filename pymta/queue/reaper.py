"""The reaper: a process of the flush's own that frees what it delivered (ARCHITECTURE.md, "What a flush
costs").

Whoever closes the last descriptor of an unlinked file pays for freeing its blocks: about 100 us on ext4
for a file that was fsynced, more than all the rest of a removal. So a removed message's descriptor (its
lock let go: `Locks.remove`) is closed here, in a process forked for it, REAP_BATCH descriptors at a time
sent over a socket pair (SCM_RIGHTS). The flush closes its own copies right after sending them, which is
cheap because the reaper's copies are the last: it closes a batch only once the next one (or the end of
the socket) has come, which the flush sends only after those closes. Threads of the flush did this
before, and took the interpreter lock from the delivery loop at every close they made (a tenth of a
message's time, and on a busy machine a whole time slice whenever one was descheduled holding it); the
reaper's threads (REAPERS, whose closes batch their journal work) take only its own. Asked to (`sync`),
it fsyncs the spool's queue/ and state/ after the unlinks handed to it: the removals are made durable
(invariant 3).

It is forked without exec (`privileges.fork_child`) at the first full batch, so a run that removes a few
messages forks nothing and closes them itself at its end. The child keeps nothing of the flush but its end
of the socket (no lock, no connection, no spool file), and ends when the flush's end closes: at `finish`,
which waits for it (FINISH_TIMEOUT at most: one stopped or stuck is killed), or when the flush dies.
When it cannot be started or has gone, the flush closes the descriptors itself.
"""

from __future__ import annotations

import gc
import os
import socket

from pymta import privileges
from pymta.queue.directory import fsync_dir

# Threads of the reaper that close descriptors. On ext4 one thread closing unlinked files frees about 300 a
# second on a busy disk, and falls ever further behind a flush of thousands; two or more free ten times as
# many in the same time (their journal work is batched), so the flush never waits for them.
REAPERS = 4
# Descriptors handed to the reaper at once: one message and one wake-up for each batch, not each removal.
# A batch keeps at most this many unlinked files open in the flush (their locks let go).
REAP_BATCH = 32
# Seconds the end of a run waits for the reaper to close what it holds (the kernel frees the files of one
# that is killed): a reaper stopped by its user, or stuck on a hung disk, must not keep the flush lock.
FINISH_TIMEOUT = 60.0
# What a batch asks besides its closes: nothing more, or an fsync of the directories (after the closes are
# queued; the unlinks it makes durable were made before the batch was sent).
_CLOSE = b"c"
_SYNC = b"s"


class Reaper:
    """The reaper of one flush run: `hand_over` descriptors to close, `finish` at the end of the run."""

    def __init__(self, directories: tuple[str, ...]) -> None:
        self.directories = directories  # fsynced when a batch asks
        self._channel: socket.socket | None = None
        self._pid: int | None = None
        self._tried = False  # one attempt to start it per run: a fork that failed is not tried again

    @property
    def running(self) -> bool:
        return self._channel is not None

    def hand_over(self, fds: list[int], sync: bool = False) -> None:
        """Have `fds` closed (they are no longer the caller's), and the directories fsynced after them when
        `sync`: by the reaper, started now when it is not yet, else here."""
        if not self._tried:
            self._tried = True
            self._start()
        if self._channel is not None:
            try:
                socket.send_fds(self._channel, [_SYNC if sync else _CLOSE], fds)
            except OSError:
                self.finish()  # it has gone: what it did not get is closed here
            else:
                for fd in fds:
                    os.close(fd)  # never the last copy: the reaper closes its own after the next batch
                return
        close_all(fds)
        if sync:
            self.sync()

    def finish(self) -> None:
        """End the reaper and wait until it has closed everything it was handed."""
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()  # its end of the run: it closes what it holds, then exits
        pid, self._pid = self._pid, None
        if pid is not None:
            try:
                privileges.reap(pid, FINISH_TIMEOUT)  # a reaper stopped or stuck is killed: nothing is lost
            except ChildProcessError:
                pass

    def sync(self) -> None:
        """fsync the directories. A failure is not the run's: at worst a power loss brings those delivered
        messages back, to be delivered again."""
        for directory in self.directories:
            try:
                fsync_dir(directory)
            except OSError:
                continue

    def _start(self) -> None:
        # What the reaper imports, imported here: a thread of the flush (the hostname lookup) may hold the
        # import lock at the fork, and the child would wait for it for ever.
        import queue  # noqa: F401
        import threading  # noqa: F401

        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError:
            return
        try:
            self._pid = privileges.fork_child(lambda: self._serve(theirs.fileno()), failed=1)
        except OSError:
            ours.close()
            return
        finally:
            theirs.close()
        self._channel = ours

    def _serve(self, channel: int) -> int:  # pragma: no cover - runs in the reaper (tests see its work)
        """The reaper's life: keep only `channel`, close what comes over it, fsync when asked, end at EOF."""
        import queue
        import threading

        gc.disable()  # no finalizer of the flush's objects runs here: their descriptors are not ours
        os.closerange(3, channel)
        os.closerange(channel + 1, max(os.sysconf("SC_OPEN_MAX"), channel + 2))
        work: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()

        def closer() -> None:
            while (batch := work.get()) is not None:
                close_all(batch)

        closers = [threading.Thread(target=closer, daemon=True) for _ in range(REAPERS)]
        for thread in closers:
            thread.start()
        source = socket.socket(fileno=channel)
        held: list[int] = []  # the last batch: the flush closes its copies only after sending it
        while True:
            try:
                what, fds, _, _ = socket.recv_fds(source, 1, REAP_BATCH)
            except OSError:
                break
            if held:  # the flush sends a batch only once it closed its copies of the one before
                work.put(held)
            held = fds
            if not what:
                break  # the flush's end closed: its copies of the last batch are gone too
            if what == _SYNC:
                self.sync()
        if held:
            work.put(held)
        for _ in closers:
            work.put(None)
        for thread in closers:
            thread.join()
        return 0


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            continue
