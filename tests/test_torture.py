"""The CI slice of the torture suite (bench/torture.py): every experiment of the full run, with small counts.

Real processes (the installed `sendmail` and `pymta`), a real SMTP server in its own process (aiosmtpd,
bench/torture_sink.py) and real files: each test fails on a lost, corrupt or unallowed duplicate message, on
an exit code that should not happen, or (fuzzing) on an exception other than pymta's own. The full run, with
the counts the README reports, is `python bench/torture.py`. Deselect this slice with `-m "not torture"`.
"""

from __future__ import annotations

import importlib.util
import os
import posix
import sys
from pathlib import Path

import pytest
from conftest import MtaEnv

BENCH = Path(__file__).resolve().parents[1] / "bench"
SEED = 7

pytestmark = pytest.mark.torture


def _load_torture():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("torture", BENCH / "torture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["torture"] = module  # the fuzz reproducers import it by this name
    spec.loader.exec_module(module)
    return module


torture = _load_torture()


def check(tally) -> None:  # type: ignore[no-untyped-def]
    print(tally.report())
    assert tally.ok, tally.report()


def test_sendmail_killed_at_random_moments_leaves_a_whole_entry_or_none():
    tally = torture.sendmail_kill(30, SEED, largest=512 * 1024, batch=15)
    check(tally)
    assert tally.acknowledged > 0


def test_flush_killed_at_random_moments_loses_nothing_and_duplicates_at_most_once_per_kill():
    tally = torture.flush_kill(10, SEED, queue=40)
    check(tally)
    assert tally.duplicates <= 10


def test_smarthost_cutting_connections_loses_nothing():
    check(torture.smarthost_drop(30, SEED, rate=0.3))


def test_concurrent_senders_and_flushes_deliver_each_message_exactly_once():
    tally = torture.concurrency(8, SEED, each=4, loops=4)
    check(tally)
    assert tally.acknowledged == 32 and tally.duplicates == 0


def test_full_disk_loses_no_acknowledged_message():
    check(torture.disk_full(2, SEED))


def test_fuzzed_inputs_raise_only_pymta_errors(tmp_path: Path):
    tally = torture.fuzz(2100, SEED, findings=tmp_path, time_limit=None)
    print(tally.report())
    assert not tally.breaches, "\n".join(tally.breaches)


def test_a_submission_interrupted_during_its_commit_leaves_no_entry(tmp_path: Path, monkeypatch):
    """Found by the torture suite (SIGINT at random moments): a Ctrl-C while the new entry's name is made
    durable (the fsync of new/, milliseconds) made sendmail say "interrupted; nothing was queued" and exit 75
    while the entry stayed in new/, to be delivered; the caller, told it failed, sends it again. The commit
    takes the entry back on any interruption, as it does when the fsync fails."""
    from pymta.queue import commit as commit_module
    from pymta.queue.spool import Spool

    def interrupted(directory: str, fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(commit_module, "_sync_new_name", interrupted)
    spool = Spool(str(tmp_path / "spool"))
    envelope = {"sender": "a@example.org", "recipients": ["b@example.org"], "uid": 0}
    with pytest.raises(KeyboardInterrupt):
        spool.submit(envelope, b"Subject: x\r\n\r\nbody\r\n")
    assert sorted(os.listdir(tmp_path / "spool" / "new")) == []
    assert sorted(os.listdir(tmp_path / "spool" / "tmp")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a spool of another user's needs root to make")
def test_a_submission_to_a_shared_spool_interrupted_during_its_commit_leaves_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The same for system mode's drop directory (a spool of another user's, committed through directory
    descriptors): a Ctrl-C during the fsync of new/ takes the entry back."""
    from pymta.queue.spool import Spool

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o755)
    for name in ("tmp", "new"):
        (spool_dir / name).mkdir()
        (spool_dir / name).chmod(0o1733)
        os.chown(spool_dir / name, 65534, 65534)
    os.chown(spool_dir, 65534, 65534)
    fsyncs = []
    real_fsync = posix.fsync  # the commit's: sendmail's path does without os (pymta.queue.commit)

    def fsync(fd: int) -> None:
        fsyncs.append(fd)
        if len(fsyncs) == 2:  # the file's, then the directory's
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(posix, "fsync", fsync)
    envelope = {"sender": "a@example.org", "recipients": ["b@example.org"], "uid": 0}
    spool = Spool(str(spool_dir))
    with pytest.raises(KeyboardInterrupt):
        spool.submit(envelope, b"Subject: x\r\n\r\nbody\r\n")
    assert not spool.private
    assert sorted(os.listdir(spool_dir / "new")) == []
    assert sorted(os.listdir(spool_dir / "tmp")) == []


def test_a_config_nested_too_deep_for_the_yaml_parser_still_queues(mta: MtaEnv):
    """Found by the torture suite (fuzzing config loading): a config whose YAML nests deeper than Python's
    recursion limit made sendmail exit 1 with a RecursionError traceback, queueing nothing; a broken
    config never stops a submission."""
    mta.write_config("deliver: queue\nbroken: " + "[" * 3000 + "\n")
    result = mta.sendmail("-oi", "someone@example.net", input=b"Subject: x\n\nbody\n")
    assert result.returncode == 0, result.stderr.decode()[-300:]
    assert b"Traceback" not in result.stderr
    assert b"pymta config check" in result.stderr  # the warning that says what to fix
    assert len(mta.entries()) == 1
