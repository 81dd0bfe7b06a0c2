"""The spool's commit protocol: whole entries or none, the right modes, and clear errors."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posix
import pwd
import resource
import shutil
import signal
import socket
import stat
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymta import privileges
from pymta.errors import EX_CANTCREAT, EX_TEMPFAIL, SpoolError, SpoolFullError
from pymta.queue import locks
from pymta.queue import reaper as reaper_module
from pymta.queue.directory import encode_json, new_id
from pymta.queue.entry import Expiry, MessageState, RecipientStatus
from pymta.queue.reaper import REAP_BATCH
from pymta.queue.spool import Names, Spool

ENVELOPE: dict[str, object] = {
    "sender": "alice",
    "recipients": ["root", "bob@example.org"],
    "submitted_by": "alice",
    "uid": 1000,
    "full_name": "Alice",
    "queued_at": 1_700_000_000.5,
    "notify": None,
    "ret": None,
    "envid": None,
    "body_type": None,
}


def test_submit_commits_one_entry_with_envelope_and_message(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    queue_id = spool.submit(ENVELOPE, b"Subject: hi\r\n\r\nbody\r\n")
    entries, problems = spool.entries()
    assert problems == []
    assert [entry.id for entry in entries] == [queue_id]
    entry = entries[0]
    assert entry.location == "new"
    assert entry.sender == "alice"
    assert [r.address for r in entry.recipients] == ["root", "bob@example.org"]
    assert entry.state == "queued"
    assert entry.size == len(b"Subject: hi\r\n\r\nbody\r\n")
    assert spool.read_message(entry) == b"Subject: hi\r\n\r\nbody\r\n"
    assert os.listdir(spool.dir("tmp")) == []


def test_user_mode_spool_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        spool = Spool(str(tmp_path / "spool"))
        queue_id = spool.submit(ENVELOPE, b"x\r\n")
    finally:
        os.umask(old)
    for name in ("tmp", "new", "queue", "state"):
        assert stat.S_IMODE(os.stat(spool.dir(name)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(spool.dir("new"), queue_id)).st_mode) == 0o600


def test_ids_are_unique_sortable_and_unguessable() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 24 and all(c in "0123456789abcdef" for c in i) for i in ids)
    assert len({i[8:] for i in ids}) == 1000  # the random part alone is unique


def test_missing_parent_is_a_clear_error_and_creates_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "no" / "such" / "spool"))
    with pytest.raises(SpoolError) as caught:
        spool.submit(ENVELOPE, b"x\r\n")
    assert caught.value.exit_code == EX_CANTCREAT
    assert "does not exist" in str(caught.value)
    assert not (tmp_path / "no").exists()


def test_spool_without_layout_is_not_silently_reused(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "something-else").write_text("not ours")
    with pytest.raises(SpoolError, match="no new/ directory"):
        Spool(str(tmp_path / "spool")).submit(ENVELOPE, b"x\r\n")


def test_a_spool_another_sendmail_is_still_making_is_finished_not_refused(tmp_path: Path) -> None:
    # Found by the torture suite: eight cron jobs' first messages at once. One sendmail had made the spool
    # and tmp/ but not yet new/ when another looked, found a non-empty directory without new/, and exited 73.
    (tmp_path / "spool" / "tmp").mkdir(parents=True)
    Spool(str(tmp_path / "spool")).submit(ENVELOPE, b"x\r\n")
    assert len(os.listdir(tmp_path / "spool" / "new")) == 1
    assert sorted(os.listdir(tmp_path / "spool")) == ["corrupt", "new", "queue", "state", "tmp"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_unwritable_spool_is_cantcreat(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_private()
    os.chmod(spool.dir("tmp"), 0o500)
    try:
        with pytest.raises(SpoolError) as caught:
            spool.submit(ENVELOPE, b"x\r\n")
    finally:
        os.chmod(spool.dir("tmp"), 0o700)
    assert caught.value.exit_code == EX_CANTCREAT
    assert "Permission denied" in str(caught.value)
    assert spool.entries() == ([], [])


def test_file_size_limit_is_tempfail_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_private()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(SpoolFullError) as caught:
            spool.submit(ENVELOPE, b"x" * 100_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert caught.value.exit_code == EX_TEMPFAIL
    assert "free some space" in str(caught.value)
    assert spool.entries() == ([], [])
    assert os.listdir(spool.dir("tmp")) == []


def test_unreadable_entries_are_reported_not_fatal(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    good = spool.submit(ENVELOPE, b"x\r\n")
    Path(spool.dir("new"), "garbage").write_bytes(b"not an envelope")
    Path(spool.dir("new"), "halfjson").write_bytes(b'{"v": 1, "id": \n')
    os.symlink("/etc/passwd", os.path.join(spool.dir("new"), "link"))
    entries, problems = spool.entries()
    assert [entry.id for entry in entries] == [good]
    assert sorted(problem.split(":")[0] for problem in problems) == [
        "new/garbage",
        "new/halfjson",
        "new/link",
    ]


def test_tmp_files_are_never_listed(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.create_private()
    Path(spool.dir("tmp"), new_id()).write_bytes(json.dumps(ENVELOPE).encode() + b"\npartial")
    assert spool.entries() == ([], [])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@given(json_values)
def test_envelope_encoder_round_trips_through_json(value: object) -> None:
    encoded = encode_json(value)
    assert encoded.isascii()
    assert "\n" not in encoded
    assert json.loads(encoded) == value


# --- System mode: a drop directory its writers may not read (1733) ---


def _as_nobody(work: Callable[[], object]) -> int:
    """Run `work` in a forked child that has switched to nobody; its exit status (0: it returned)."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            work()
            status = 0
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture
def shared_spool() -> Iterator[Spool]:
    """A system-mode spool (drop directories 1733, owned by root) where nobody can reach it."""
    base = Path(tempfile.mkdtemp(prefix="pymta-spool-", dir="/tmp"))
    try:
        base.chmod(0o755)
        spool = Spool(str(base / "spool"))
        spool.create_private()
        Path(spool.path).chmod(0o755)
        for name in ("new", "tmp"):
            Path(spool.dir(name)).chmod(0o1733)
        yield spool
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_user_who_cannot_read_the_drop_directory_still_commits(shared_spool: Spool) -> None:
    """The directory cannot be opened for its fsync: the file is fsynced after the rename instead."""
    assert _as_nobody(lambda: shared_spool.submit(ENVELOPE, b"Subject: hi\r\n\r\nbody\r\n")) == 0
    [name] = os.listdir(shared_spool.dir("new"))
    assert os.stat(os.path.join(shared_spool.dir("new"), name)).st_uid == pwd.getpwnam("nobody").pw_uid
    assert os.listdir(shared_spool.dir("tmp")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_drop_the_flush_cannot_read_is_set_aside_and_the_rest_picked_up(shared_spool: Spool) -> None:
    nobody = pwd.getpwnam("nobody")
    for sub in ("", "queue", "state", "new", "tmp", "corrupt"):
        os.chown(os.path.join(shared_spool.path, sub), nobody.pw_uid, nobody.pw_gid)
    unreadable = shared_spool.submit(ENVELOPE, b"Subject: 1\r\n\r\n1\r\n")  # root's drop, then mode 000
    os.chmod(os.path.join(shared_spool.dir("new"), unreadable), 0)
    secret = Path(shared_spool.path).parent / "secret"
    secret.write_text("root only\n")
    secret.chmod(0o600)
    linked = new_id()
    os.link(secret, os.path.join(shared_spool.dir("new"), linked))
    fine = shared_spool.submit(ENVELOPE, b"Subject: 2\r\n\r\n2\r\n")

    assert _as_nobody(lambda: shared_spool.pick_up(1 << 20, print)) == 0

    assert os.listdir(shared_spool.dir("queue")) == [fine]
    assert os.listdir(shared_spool.dir("corrupt")) == [unreadable]
    assert os.listdir(shared_spool.dir("new")) == []  # the hard link removed, never followed
    assert secret.read_text() == "root only\n"


# --- the flush's hot path: load through the lock, removal ---


def _queued(tmp_path: Path, message: bytes = b"Subject: hi\r\n\r\nbody\r\n") -> tuple[Spool, str]:
    spool = Spool(str(tmp_path / "spool"))
    queue_id = spool.submit(ENVELOPE, message)
    assert spool.pick_up(1 << 20, print) == [queue_id]
    return spool, queue_id


def test_load_reads_through_the_lock_descriptor_whatever_its_offset(tmp_path: Path) -> None:
    spool, queue_id = _queued(tmp_path, b"Subject: hi\r\n\r\n" + b"x" * 200_000 + b"\r\n")
    lock = spool.lock_message(queue_id)
    assert lock is not None
    try:
        os.read(lock, 10)
        entry, message = spool.load(queue_id, lock)
        opened, read = spool.load(queue_id)  # the same, with a file of its own
        assert (entry.id, message) == (opened.id, read)
        assert message.endswith(b"x" * 1000 + b"\r\n") and entry.size == len(message)
        os.fstat(lock)  # still open: the lock is the caller's
    finally:
        spool.unlock_message(lock)


def test_load_through_a_lock_on_a_deleted_file_says_it_is_gone(tmp_path: Path) -> None:
    """A queue command deleted the message between the flush's open and its lock."""
    spool, queue_id = _queued(tmp_path)
    lock = spool.lock_message(queue_id)
    assert lock is not None
    try:
        os.unlink(os.path.join(spool.dir("queue"), queue_id))
        with pytest.raises(FileNotFoundError):
            spool.load(queue_id, lock)
    finally:
        spool.unlock_message(lock)


def test_remove_unlinks_at_once_and_frees_the_file_in_the_background(tmp_path: Path) -> None:
    spool, queue_id = _queued(tmp_path)
    lock = spool.lock_message(queue_id)
    assert lock is not None
    entry, _ = spool.load(queue_id, lock)
    spool.write_state(queue_id, MessageState.from_json({"state": "deferred"}), 0)
    entry.has_state = True
    spool.remove(entry, lock)
    assert os.listdir(spool.dir("queue")) == []  # the unlink is the decision
    assert os.listdir(spool.dir("state")) == []
    spool.finish_removals()
    with pytest.raises(OSError):
        os.fstat(lock)  # the lock went along, and was closed by the background thread


def test_a_removal_is_made_durable_by_the_end_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a power loss an unlink that no fsync of its directory covered may be undone, and a delivered
    message delivered again: the run fsyncs queue/ and state/ after its last removal (ARCHITECTURE.md,
    invariant 3), and at the first removal REMOVAL_SYNC_INTERVAL or more after the last fsync."""
    spool, queue_id = _queued(tmp_path)
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(posix, "fsync", fsync)  # pymta.queue.commit calls it by that name
    directories = {name: os.stat(spool.dir(name)) for name in ("queue", "state")}
    entry, _ = spool.load(queue_id)
    spool.remove(entry)
    spool.finish_removals()
    for name, info in directories.items():
        assert (info.st_dev, info.st_ino) in synced, f"{name}/ was not fsynced after the removal"


def test_remove_lets_go_of_the_lock_at_once(tmp_path: Path) -> None:
    """The descriptor of a removed message waits for the reapers with others (REAP_BATCH), its lock let go:
    a queue command that opened the message before its removal is not kept waiting by it."""
    spool, queue_id = _queued(tmp_path)
    lock = spool.lock_message(queue_id)
    assert lock is not None
    waiting = os.open(os.path.join(spool.dir("queue"), queue_id), os.O_RDONLY)
    try:
        entry, _ = spool.load(queue_id, lock)
        spool.remove(entry, lock)
        fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the flush holds it
    finally:
        os.close(waiting)
        spool.finish_removals()


def _many_queued(tmp_path: Path, count: int) -> Spool:
    spool = Spool(str(tmp_path / "spool"))
    for _ in range(count):
        spool.submit(ENVELOPE, b"Subject: hi\r\n\r\nbody\r\n")
    assert len(spool.pick_up(1 << 20, print)) == count
    return spool


def _remove_all(spool: Spool) -> None:
    for name in os.listdir(spool.dir("queue")):
        lock = spool.lock_message(name)
        assert lock is not None
        spool.remove(spool.load(name, lock)[0], lock)


def _open_removed(spool: Spool) -> list[str]:
    """The files of queue/ that this process holds open after their removal."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(spool.dir("queue") + "/") and target.endswith(" (deleted)"):
                found.append(target)
    return found


def test_removals_go_to_the_reaper_a_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The descriptors of removed messages go to the reaper process REAP_BATCH at a time, one message on its
    socket each (issue 12: a thread woken per message took the interpreter lock from the delivery loop), and
    the flush keeps none of them: the reaper's copy is the last, and it is gone by `finish_removals`."""
    handed: list[int] = []
    send_fds = socket.send_fds

    def counted(sock: socket.socket, buffers: list[bytes], fds: list[int], *args: object) -> int:
        handed.append(len(fds))
        return send_fds(sock, buffers, fds, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "send_fds", counted)
    spool = _many_queued(tmp_path, 3 * REAP_BATCH + 1)
    try:
        _remove_all(spool)
        assert len(_open_removed(spool)) == 1  # the rest of the last batch; the others went
    finally:
        spool.finish_removals()
    assert os.listdir(spool.dir("queue")) == [] and _open_removed(spool) == []
    assert handed[:3] == [REAP_BATCH] * 3 and sum(handed) == 3 * REAP_BATCH + 1 and len(handed) <= 5


def test_the_reaper_keeps_nothing_of_the_flush(tmp_path: Path) -> None:
    """The forked reaper holds only its socket and what it was handed: not the flush lock, not a message
    lock of the flush's, not its connections (their ends would outlive the flush's own closes)."""
    spool = _many_queued(tmp_path, REAP_BATCH)
    flush_lock = spool.lock_flush()
    assert flush_lock is not None
    try:
        _remove_all(spool)
        reaper = spool._reaper
        assert reaper is not None and reaper._pid is not None
        deadline = time.monotonic() + 10
        while True:  # until it has let go of what the fork gave it, its first act
            held = []
            for fd in os.listdir(f"/proc/{reaper._pid}/fd"):
                with contextlib.suppress(OSError):
                    if int(fd) > 2:  # stdin, stdout and stderr are kept
                        held.append(os.readlink(f"/proc/{reaper._pid}/fd/{fd}"))
            kept = [t for t in held if not t.startswith(("socket:", spool.dir("queue") + "/"))]
            if not kept or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert kept == [] and len(held) <= 1 + REAP_BATCH
    finally:
        spool.finish_removals()
        spool.release_flush(flush_lock)


def test_a_few_removals_fork_no_reaper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that removes fewer than a batch closes them itself at its end: a fork would cost more."""
    forked: list[object] = []
    monkeypatch.setattr(privileges, "fork_child", lambda *args: forked.append(args) or 0)
    spool = _many_queued(tmp_path, 3)
    _remove_all(spool)
    spool.finish_removals()
    assert forked == [] and os.listdir(spool.dir("queue")) == []


def test_a_few_removals_with_an_fsync_due_fork_no_reaper_and_are_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removals a second or more apart make their fsync due at once: a run of a few such (a slow smarthost)
    fsyncs queue/ and state/ itself at that removal, and forks no reaper for a handful of descriptors."""
    forked: list[object] = []
    monkeypatch.setattr(privileges, "fork_child", lambda *args: forked.append(args) or 0)
    spool = _many_queued(tmp_path, 3)
    synced: list[int] = []
    real_fsync = posix.fsync
    monkeypatch.setattr(posix, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    clock = [time.monotonic()]
    monkeypatch.setattr(locks, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    queue_dir = os.stat(spool.dir("queue")).st_ino
    for number, queue_id in enumerate(sorted(os.listdir(spool.dir("queue")))):
        entry, _ = spool.load(queue_id)
        spool.remove(entry)
        if number:
            assert synced.count(queue_dir) == number, "a removal with an fsync due was not made durable"
        clock[0] += 2 * locks.REMOVAL_SYNC_INTERVAL
    spool.finish_removals()
    assert forked == [] and os.listdir(spool.dir("queue")) == []


def test_a_reaper_that_is_stopped_is_killed_at_the_end_of_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaper runs as the spool's owner, who may stop it (SIGSTOP): the end of the run does not wait
    for it for ever (it would hold the flush lock), it kills it; the kernel frees what it held."""
    monkeypatch.setattr(reaper_module, "FINISH_TIMEOUT", 1.0)
    spool = _many_queued(tmp_path, REAP_BATCH)
    _remove_all(spool)
    reaper = spool._reaper
    assert reaper is not None and reaper._pid is not None
    pid = reaper._pid
    os.kill(pid, signal.SIGSTOP)
    spool.finish_removals()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert os.listdir(spool.dir("queue")) == [] and _open_removed(spool) == []


def test_remove_without_a_lock(tmp_path: Path) -> None:
    spool, queue_id = _queued(tmp_path)
    entry, _ = spool.load(queue_id)
    spool.remove(entry)
    spool.finish_removals()
    assert os.listdir(spool.dir("queue")) == []
    with pytest.raises(FileNotFoundError):
        spool.remove(entry)  # gone already


# --- a large queue (issue 12, "Scale") ---


def test_names_is_a_sequence_of_the_names_in_their_order() -> None:
    names = sorted(new_id() for _ in range(50)) + ["", "not-an-id", "ü"]
    held = Names(names)
    assert len(held) == len(names) and list(held) == names and held == names and held == tuple(names)
    assert [held[number] for number in range(len(names))] == names
    assert held[-1] == "ü" and held[-3] == "" and held[0] == names[0]
    with pytest.raises(IndexError):
        held[len(names)]
    assert Names() == [] and not Names() and Names(iter(["a", "b"])) == ["a", "b"] and held != names[:-1]


def test_a_flush_holds_the_ids_it_delivers_in_less_memory_than_a_list(tmp_path: Path) -> None:
    """`Spool.schedule` keeps the due ids as `Names`: under 40 bytes an id, where a list of strings
    takes 88. Counted by tracemalloc, which sees every Python allocation: nothing here is timed."""
    import tracemalloc

    spool = Spool(str(tmp_path / "spool"))
    for sub in ("queue", "state"):
        os.makedirs(spool.dir(sub), mode=0o700)
    count = 5000
    for _ in range(count):
        Path(spool.dir("queue"), new_id()).touch()  # never tried: due at once
    tracemalloc.start()
    try:
        due, parked = spool.schedule(time.time())
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(due) == count and list(due) == sorted(os.listdir(spool.dir("queue"))) and parked == []
    assert held < 40 * count, held


def test_the_schedule_stats_only_the_states_that_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message never tried has no state/ID: one listing of state/ tells so, where a stat of each failed
    (a system call and an exception a message). What has a state is still looked at by its stat."""
    from pymta.queue.entry import NEVER

    spool = Spool(str(tmp_path / "spool"))
    for sub in ("queue", "state"):
        os.makedirs(spool.dir(sub), mode=0o700)
    now = time.time()
    fresh = sorted(new_id() for _ in range(20))
    deferred, parked, retried = new_id(), new_id(), new_id()
    for name in [*fresh, deferred, parked, retried]:
        Path(spool.dir("queue"), name).touch()
    for name, mtime in ((deferred, now + 600), (parked, NEVER), (retried, now - 60)):
        path = Path(spool.dir("state"), name)
        path.write_text("{}")
        os.utime(path, (mtime, mtime))
    looked: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, **kw: looked.append(path) or real_stat(path, **kw))

    due, parked_ids = spool.schedule(now)

    assert due == sorted([*fresh, retried]) and parked_ids == [parked]
    # The filter may let a name through that has no state (one in many thousands here): never one fewer.
    assert {deferred, parked, retried} <= set(looked) and len(looked) < 8, looked


def _checked_state(data: dict[str, object], queued_at: float) -> dict[str, object]:
    """What `MessageState.from_json` made of `data` before its fast path: every field through the
    checks of `pymta.queue.entry` (the reference the fast path must agree with)."""
    from pymta.queue import entry as e

    return MessageState(
        state=e._text(data, "state") or "queued",
        attempts=int(e._number(data, "attempts", 0)),
        next_attempt=None
        if data.get("next_attempt", 0) is None
        else e._time(data, "next_attempt", queued_at),
        last_attempt=e._optional_time(data, "last_attempt"),
        last_error=e._optional_text(data, "last_error"),
        relay=e._optional_text(data, "relay"),
        warned=data.get("warned") is True,
        bounce_due=data.get("bounce_due") is True,
        held_from=e._optional_text(data, "held_from"),
        held_at=e._optional_time(data, "held_at"),
        held_seconds=max(0.0, float(e._number(data, "held_seconds", 0))),
        failed_at=e._optional_time(data, "failed_at"),
    ).to_json()


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
STATE_KEYS = ("state", "attempts", "next_attempt", "last_attempt", "last_error", "relay", "warned")
STATE_KEYS += ("bounce_due", "held_from", "held_at", "held_seconds", "failed_at")


@given(st.dictionaries(st.sampled_from(STATE_KEYS), ODD_VALUES), st.sampled_from([0.0, 1_700_000_000.5]))
def test_a_state_is_read_as_the_checks_read_it_whatever_its_values(
    data: dict[str, object], queued_at: float
) -> None:
    """The fast path of `MessageState.from_json` (the usual values taken as they are) gives what the
    checks give, and refuses what they refuse, with their message."""
    try:
        expected: object = _checked_state(data, queued_at)
    except ValueError as exc:
        expected = str(exc)
    try:
        got: object = MessageState.from_json(data, queued_at).to_json()
    except ValueError as exc:
        got = str(exc)
    assert got == expected


@given(
    st.dictionaries(
        st.sampled_from(("id", "sender", "submitted_by", "full_name", "uid", "queued_at")), ODD_VALUES
    )
)
def test_an_envelope_is_read_as_the_checks_read_it_whatever_its_values(fields: dict[str, object]) -> None:
    from pymta.queue import entry as e

    envelope = {"recipients": ["a@example.org"], **fields}
    try:
        checked = [e._text(envelope, key) for key in ("id", "sender", "submitted_by", "full_name")]
        expected: object = (*checked, int(e._number(envelope, "uid", -1)), e._time(envelope, "queued_at", 0))
    except ValueError as exc:
        expected = str(exc)
    try:
        made = e.QueueEntry("queue", "", envelope, None, 0, 0)
        got: object = (made.id, made.sender, made.submitted_by, made.full_name, made.uid, made.queued_at)
    except ValueError as exc:
        got = str(exc)
    assert got == expected


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@given(
    st.one_of(
        st.text(max_size=20),
        st.tuples(
            st.sampled_from(["", " ", "\n", "\u00a0"]), JSON_VALUES, st.text(" \t\r\nx,]", max_size=3)
        ).map(lambda parts: parts[0] + json.dumps(parts[1]) + parts[2]),
    )
)
def test_state_and_envelope_json_is_read_as_json_loads_reads_it(text: str) -> None:
    """The parser of state files and envelope lines (`entry._json_value`, json.loads without its white
    space searches when there is nothing around the value) gives json.loads' value, or its error."""
    from pymta.queue.entry import _json_value

    def outcome(parse: Callable[[str], object]) -> object:
        try:
            return json.dumps(parse(text))
        except ValueError as exc:
            return f"{type(exc).__name__}: {exc}"

    assert outcome(_json_value) == outcome(json.loads)


def test_a_listing_reads_a_usual_state_without_an_fstat_and_still_knows_a_planted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file is read with one pread and no fstat (a listing reads 100,000 of them); what is not a
    usual state (a directory, a FIFO, an empty or a long file) still gets the checks' answer."""
    spool = Spool(str(tmp_path / "spool"))
    names = [spool.submit({**ENVELOPE, "recipients": ["a@example.org"]}, b"x\r\n") for _ in range(6)]
    for name in names:
        os.rename(os.path.join(spool.dir("new"), name), os.path.join(spool.dir("queue"), name))
    usual, long, empty, directory, fifo, missing = names
    deferred = MessageState(state="deferred", attempts=1, last_error="451 later")
    spool.write_state(usual, deferred, time.time() + 60)
    spool.write_state(long, MessageState(state="deferred", last_error="4" * 20000), time.time() + 60)
    Path(spool.dir("state"), empty).write_bytes(b"")
    os.mkdir(os.path.join(spool.dir("state"), directory))
    os.mkfifo(os.path.join(spool.dir("state"), fifo))
    fstats: list[int] = []
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: fstats.append(fd) or real_fstat(fd))
    found = {item.id: item for item in spool.scan() if not isinstance(item, str)}
    problems = sorted(item for item in spool.scan() if isinstance(item, str))
    assert found[usual].state == "deferred" and found[usual].last_error == "451 later"
    assert found[long].last_error == "4" * 20000
    assert found[missing].state == "queued"
    assert problems == sorted(
        [
            f"queue/{empty}: Expecting value: line 1 column 1 (char 0)",
            f"queue/{directory}: state file is not a regular file",
            f"queue/{fifo}: state file is not a regular file",
        ]
    )
    # Per scan: one fstat per queue file (its size and owner), and one per state that is not usual.
    assert len(fstats) == 2 * (len(names) + 4)


def test_a_scan_gives_every_name_oldest_first_across_the_runs_it_holds_them_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Spool.scan` holds the sorted names as strings of `_RUN` names: none is lost or reordered at the
    edge of one, in new/ or in queue/."""
    from pymta.queue import spool as spool_module

    monkeypatch.setattr(spool_module, "_RUN", 2)
    spool = Spool(str(tmp_path / "spool"))
    names = [spool.submit(ENVELOPE, b"x\r\n") for _ in range(7)]
    for name in names[::2]:
        os.rename(os.path.join(spool.dir("new"), name), os.path.join(spool.dir("queue"), name))
    listed = [item.id for item in spool.scan() if not isinstance(item, str)]
    assert listed == sorted(names)


def test_a_recipients_copy_has_every_field_and_changes_alone() -> None:
    """`RecipientStatus.copy` (the flush's one per recipient, in place of copy.copy) misses no field, a
    field added later included: each is set to something other than its default first."""
    original = RecipientStatus(
        "a@example.org", "failed", "550 no", "alias", True, Expiry("5d", "450 busy", "mx")
    )
    copied = original.copy()
    assert copied is not original
    assert {name: getattr(copied, name) for name in RecipientStatus.__slots__} == {
        name: getattr(original, name) for name in RecipientStatus.__slots__
    }
    assert all(
        getattr(original, name) != getattr(RecipientStatus("x"), name) for name in RecipientStatus.__slots__
    )
    copied.status, copied.reported = "delivered", False
    assert (original.status, original.reported) == ("failed", True)
