"""Issue 6, per user: each user's view of the queue in system mode, and `max_queued_per_user`.

A spool owned by `nobody` stands for the one `pymta setup` gives to `pymta`; uids without passwd entries
(ALICE, BOB, CAROL) stand for ordinary users, whose drops are files in new/ that root gives them with chown.
What a user runs (`sendmail`, `mailq`, `pymta queue`) runs in a forked child that has switched to that user:
this environment's Python lies under /root, where no such user can read, so the modules the child needs are
imported before the fork (`PRELOAD`).
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import MtaEnv, local_sandbox

from pymta.config import paths as quickconfig
from pymta.config.limits import DEFAULT_MAX_QUEUED_PER_USER, parse_queue_limit
from pymta.config.load import load, loads
from pymta.config.model import Config
from pymta.errors import ConfigError
from pymta.queue import listing, views
from pymta.queue.directory import encode_json
from pymta.queue.spool import Spool

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: it gives files to other users")

NOBODY = pwd.getpwnam("nobody")  # the spool's owner, as `pymta` after `pymta setup`
ALICE, BOB, CAROL = 54321, 54322, 54323  # users with no passwd entry
MAX_SIZE = 35_000_000
MESSAGE = b"Subject: hello\n\nbody\n"
LOG = logging.getLogger("pymta.test_views")

# Everything the user's child process imports lazily: it cannot read this Python's files after the switch.
PRELOAD = (
    "calendar",
    "_strptime",
    "email.header",
    "fcntl",
    "json",
    "pwd",
    "select",
    "stat",
    "threading",
    "pymta.mail.address",
    "pymta.config.aliases",
    "pymta.cli.main",
    "pymta.config.load",
    "pymta.config.identity",
    "pymta.queue.listing",
    "pymta.delivery.local",
    "pymta.log",
    "pymta.mail.message",
    "pymta.delivery.privsep",
    "pymta.cli.queue",
    "pymta.queue.ops",
    "pymta.config.routing",
    "pymta.cli.sendmail",
    "pymta.submission.invocation",
    "pymta.submission.submit",
    "pymta.submission.smtpd",
    "pymta.queue.views",
)


# --- helpers ---


def system_spool(path: Path) -> Spool:
    """A system-mode spool at `path`: owned by nobody, new/ and tmp/ 1733, the rest 0700."""
    spool = Spool(str(path))
    spool.create_private()
    for directory in [path, *path.iterdir()]:
        os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    path.chmod(0o755)
    (path / "new").chmod(0o1733)
    (path / "tmp").chmod(0o1733)
    return spool


def drop(spool: Spool, uid: int, to: str = "friend@example.net", claimed_uid: int | None = None) -> str:
    """A file in new/ as user `uid`'s sendmail leaves it (its envelope claims `claimed_uid`, else `uid`)."""
    envelope: dict[str, object] = {
        "sender": f"u{uid}@example.org",
        "recipients": [to],
        "submitted_by": f"u{uid}",
        "uid": uid if claimed_uid is None else claimed_uid,
        "queued_at": time.time() + len(os.listdir(spool.dir("new"))) / 1000,
    }
    name = spool.submit(envelope, MESSAGE, create=False)
    os.chown(os.path.join(spool.dir("new"), name), uid, uid)
    return name


def pick_up(spool: Spool, limit: int | None = None) -> tuple[list[str], list[str]]:
    """A pick-up as the flush does it, then queue/ and state/ given to the spool's owner (the delivery
    process that does it in production runs as that owner)."""
    reports: list[str] = []
    picked = spool.pick_up(MAX_SIZE, reports.append, max_queued_per_user=limit)
    give_to_owner(spool)
    return picked, reports


def give_to_owner(spool: Spool) -> None:
    for directory in ("queue", "state"):
        for name in os.listdir(spool.dir(directory)):
            os.chown(os.path.join(spool.dir(directory), name), NOBODY.pw_uid, NOBODY.pw_gid)


def view_lines(spool: Spool, uid: int) -> tuple[dict[str, object], list[dict[str, object]]]:
    lines = Path(views.view_path(spool.path, uid)).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def expected_objects(spool: Spool) -> dict[str, dict[str, object]]:
    entries, problems = spool.entries()
    assert problems == []
    return {entry.id: listing.entry_to_json(entry) for entry in entries}


def run_as(uid: int, function: Callable[[], int], stdin: bytes = b"") -> tuple[int, str, str]:
    """Run `function` in a forked child that has switched to `uid`: its exit status, stdout and stderr."""
    for name in PRELOAD:
        importlib.import_module(name)
    time.strptime("2026-01-01T00:00:00Z", "%Y-%m-%dT%H:%M:%SZ")  # its first call builds a cache
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.close(write_end)
            os.dup2(read_end, 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = function()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(read_end)
    os.write(write_end, stdin)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with out, err:
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


@pytest.fixture
def spool(world: Path) -> Spool:
    """A system spool where its owner can reach it (publish reads the queue with the owner's rights)."""
    return system_spool(world / "spool")


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory outside tmp_path (whose parents are root's, 0700) that the users can reach."""
    path = Path(tempfile.mkdtemp(prefix="pymta-views-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def world_config(world: Path, extra: str = "") -> str:
    path = world / "pymta.yaml"
    path.write_text(f"spool: {world / 'spool'}\ndeliver: queue\n{local_sandbox(world)}{extra}")
    path.chmod(0o644)
    return str(path)


# --- publish: what each user's view holds ---


@needs_root
def test_each_user_gets_a_view_of_their_own_messages_only(spool: Spool) -> None:
    alice = [drop(spool, ALICE), drop(spool, ALICE, claimed_uid=BOB)]
    bob = [drop(spool, BOB, to="secret@example.net")]
    drop(spool, 0)  # root's own: root reads the queue itself
    drop(spool, NOBODY.pw_uid)  # the spool's owner's: likewise
    pick_up(spool)
    alice.append(drop(spool, ALICE))  # not picked up yet: it waits in new/, and is shown all the same
    expected = expected_objects(spool)
    before = time.time()
    views.publish(spool, Config(spool=spool.path, max_queued_per_user=7), LOG)
    status = Path(spool.path, "status")
    info = os.lstat(status)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o711
    assert (info.st_uid, info.st_gid) == (0, 0)  # root's: the spool's owner can move no view
    assert sorted(os.listdir(status)) == sorted([str(ALICE), str(BOB)])
    for uid, ids in ((ALICE, alice), (BOB, bob)):
        info = os.lstat(status / str(uid))
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o400
        assert (info.st_uid, info.st_nlink) == (uid, 1)
        header, messages = view_lines(spool, uid)
        published = header.pop("published")
        assert header == {"v": 1, "uid": uid, "count": len(ids), "limit": 7}
        assert isinstance(published, float) and before - 0.001 <= published <= time.time()  # to the ms
        assert messages == [expected[name] for name in ids]  # oldest first, as `pymta queue --json`
    assert "secret@example.net" not in (status / str(ALICE)).read_text()


@needs_root
def test_the_uid_comes_from_the_kernel_not_from_the_envelope(spool: Spool) -> None:
    name = drop(spool, ALICE, claimed_uid=0)
    pick_up(spool)
    queued = Path(spool.dir("queue"), name).read_bytes()
    assert queued.startswith(f'{{"v":1,"uid":{ALICE},'.encode())
    views.publish(spool, Config(spool=spool.path), LOG)
    assert [m["id"] for m in view_lines(spool, ALICE)[1]] == [name]
    assert not os.path.exists(views.view_path(spool.path, 0))


@needs_root
def test_a_queue_file_the_spool_owner_did_not_write_is_nobodys(spool: Spool) -> None:
    kept, planted = drop(spool, ALICE), drop(spool, ALICE)
    pick_up(spool)
    os.chown(os.path.join(spool.dir("queue"), planted), 0, 0)  # e.g. a hard link to a file of root's
    views.publish(spool, Config(spool=spool.path), LOG)
    assert [m["id"] for m in view_lines(spool, ALICE)[1]] == [kept]


@needs_root
def test_the_queue_is_read_with_the_owners_rights_not_roots(spool: Spool, tmp_path: Path) -> None:
    name = drop(spool, ALICE)
    pick_up(spool)
    secret = tmp_path / "root-only.json"  # a file of root's that the spool's owner may not read
    secret.write_text(json.dumps({"state": "deferred", "last_error": "root's secret"}))
    secret.chmod(0o600)
    os.symlink(secret, os.path.join(spool.dir("state"), name))  # planted by the spool's owner
    groups = os.getgroups()
    views.publish(spool, Config(spool=spool.path), LOG)
    assert (os.geteuid(), os.getegid(), os.getgroups()) == (0, 0, groups)
    # Unreadable to the owner, so the entry is skipped: root's file never reaches a view.
    assert not Path(spool.path, "status", str(ALICE)).exists()
    os.unlink(os.path.join(spool.dir("state"), name))
    views.publish(spool, Config(spool=spool.path), LOG)  # the same message, read as it should be
    assert [m["id"] for m in view_lines(spool, ALICE)[1]] == [name]


@needs_root
def test_publish_reads_each_envelope_once(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    for uid in (ALICE, BOB, ALICE, CAROL):
        drop(spool, uid)
    pick_up(spool)
    drop(spool, BOB)
    reads: list[str] = []
    original = spool.read_entry

    def counting(location: str, name: str, *descriptors: int | None) -> object:
        reads.append(name)
        return original(location, name, *descriptors)

    monkeypatch.setattr(spool, "read_entry", counting)
    views.publish(spool, Config(spool=spool.path), LOG)
    assert len(reads) == 5 and len(set(reads)) == 5


@needs_root
def test_publish_holds_one_queued_message_at_a_time(spool: Spool) -> None:
    """The root flush that publishes the views of a queue of 100,000 does not hold its entries at once
    (about 2 KB each: 200 MB): it reads them one at a time and keeps only the lines of the views. Counted
    by tracemalloc on 2,000 messages of root's, which are in no view; nothing here is timed."""
    import tracemalloc

    from pymta.queue.directory import new_id

    count = 2000
    now = time.time()
    for _ in range(count):
        name = new_id()
        envelope = {"v": 1, "uid": 0, "id": name, "sender": "root", "recipients": ["a@example.net"]}
        path = os.path.join(spool.dir("queue"), name)
        with open(path, "wb") as file:
            file.write(encode_json({**envelope, "submitted_by": "root", "queued_at": now}).encode() + b"\n")
            file.write(MESSAGE)
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    alice = drop(spool, ALICE)
    tracemalloc.start()
    try:
        views.publish(spool, Config(spool=spool.path), LOG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [m["id"] for m in view_lines(spool, ALICE)[1]] == [alice]
    assert peak < 400 * count, peak


@needs_root
def test_views_of_users_without_messages_are_removed(spool: Spool) -> None:
    alice, bob = drop(spool, ALICE), drop(spool, BOB)
    pick_up(spool)
    views.publish(spool, Config(spool=spool.path), LOG)
    status = Path(spool.path, "status")
    assert sorted(os.listdir(status)) == sorted([str(ALICE), str(BOB)])
    os.unlink(os.path.join(spool.dir("queue"), bob))  # delivered
    (status / "99999").write_text("an old view\n")
    (status / "README").write_text("not a view: left alone\n")
    (status / f"{views.TMP_PREFIX}0000").write_text("left by a killed run\n")
    os.utime(status / f"{views.TMP_PREFIX}0000", (time.time() - 7200,) * 2)
    (status / f"{views.TMP_PREFIX}1111").write_text("another run, writing now\n")
    views.publish(spool, Config(spool=spool.path), LOG)
    assert sorted(os.listdir(status)) == sorted([str(ALICE), "README", f"{views.TMP_PREFIX}1111"])
    assert [m["id"] for m in view_lines(spool, ALICE)[1]] == [alice]


@needs_root
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_planted_link_at_a_view_is_replaced_never_written_through(
    spool: Spool, tmp_path: Path, kind: str
) -> None:
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    drop(spool, ALICE)
    pick_up(spool)
    status = Path(spool.path, "status")
    status.mkdir(mode=0o711)
    os.chown(status, NOBODY.pw_uid, NOBODY.pw_gid)
    if kind == "symlink":
        (status / str(ALICE)).symlink_to(victim)
    else:
        os.link(victim, status / str(ALICE))
    views.publish(spool, Config(spool=spool.path), LOG)
    info = os.lstat(victim)
    assert victim.read_text() == "root:secret\n"
    assert (info.st_uid, stat.S_IMODE(info.st_mode), info.st_nlink) == (0, 0o600, 1)
    view = os.lstat(status / str(ALICE))
    assert stat.S_ISREG(view.st_mode) and view.st_ino != info.st_ino and view.st_uid == ALICE
    assert view_lines(spool, ALICE)[0]["count"] == 1


@needs_root
def test_a_status_directory_that_is_a_link_is_refused(
    spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    drop(spool, ALICE)
    pick_up(spool)
    os.symlink(elsewhere, os.path.join(spool.path, "status"))
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        views.publish(spool, Config(spool=spool.path), LOG)
    assert os.listdir(elsewhere) == []
    assert os.path.islink(os.path.join(spool.path, "status"))
    assert any("cannot publish the users' queue views" in r.getMessage() for r in caplog.records)


@needs_root
def test_a_status_directory_of_another_user_is_refused(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    drop(spool, ALICE)
    pick_up(spool)
    status = Path(spool.path, "status")
    status.mkdir(mode=0o777)
    os.chown(status, BOB, BOB)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        views.publish(spool, Config(spool=spool.path), LOG)
    assert os.listdir(status) == []
    assert any("belongs to uid 54322" in r.getMessage() for r in caplog.records)


@needs_root
def test_publish_fixes_the_owner_and_mode_of_the_status_directory(spool: Spool) -> None:
    drop(spool, ALICE)
    pick_up(spool)
    status = Path(spool.path, "status")
    status.mkdir(mode=0o777)  # root's, and open to all
    status.chmod(0o777)
    views.publish(spool, Config(spool=spool.path), LOG)
    info = os.lstat(status)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o711)
    status.chmod(0o777)  # one the spool's owner made (an older install, or it replaced root's) is taken over
    os.chown(status, NOBODY.pw_uid, NOBODY.pw_gid)
    views.publish(spool, Config(spool=spool.path), LOG)
    info = os.lstat(status)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o711)
    assert os.lstat(status / str(ALICE)).st_uid == ALICE


def test_publish_does_nothing_but_as_root_on_a_system_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(str(tmp_path / "spool"))
    spool.submit({"sender": "a", "recipients": ["b@example.net"], "uid": 1}, MESSAGE)
    views.publish(spool, Config(spool=spool.path), LOG)  # queue/ is ours: user mode (or root's own spool)
    assert not os.path.exists(os.path.join(spool.path, "status"))
    if IS_ROOT:
        os.chown(spool.dir("queue"), NOBODY.pw_uid, NOBODY.pw_gid)
        monkeypatch.setattr(views.os, "geteuid", lambda: 1000)
        views.publish(spool, Config(spool=spool.path), LOG)
        assert not os.path.exists(os.path.join(spool.path, "status"))


# --- the header sendmail reads ---


@needs_root
def test_queued_count_reads_the_header_and_quota_refusal_applies_the_limit(spool: Spool) -> None:
    for uid in (ALICE, ALICE, ALICE, BOB):
        drop(spool, uid)
    pick_up(spool)
    views.publish(spool, Config(spool=spool.path), LOG)
    assert [views.queued_count(spool.path, uid) for uid in (ALICE, BOB, CAROL)] == [3, 1, 0]
    Path(views.view_path(spool.path, CAROL)).write_bytes(b"not a view\n")
    assert views.queued_count(spool.path, CAROL) == 0
    assert views.quota_refusal(spool.path, ALICE, 3) == (
        "you have 3 messages waiting in the queue, the limit (max_queued_per_user) is 3; try again later"
    )
    assert views.quota_refusal(spool.path, ALICE, 4) is None
    assert views.quota_refusal(spool.path, ALICE, None) is None
    assert views.quota_refusal(spool.path, 0, 1) is None  # root has no limit
    os.chown(spool.dir("new"), 0, 0)  # the drop directory is ours: user mode, our own spool
    assert views.quota_refusal(spool.path, ALICE, 3) is None


# --- sendmail refuses a user at the limit ---


@needs_root
def test_sendmail_refuses_a_user_at_the_limit_and_queues_nothing(world: Path) -> None:
    from pymta.cli import sendmail

    cfg = world_config(world, "max_queued_per_user: 2\n")
    spool = system_spool(world / "spool")
    drop(spool, ALICE)
    drop(spool, ALICE)
    pick_up(spool)
    views.publish(spool, load(cfg), LOG)

    def submit() -> int:
        return sendmail.main(["sendmail", "-C", cfg, "friend@example.net"])

    code, out, err = run_as(ALICE, submit, MESSAGE)
    assert (code, out, err) == (
        75,
        "",
        "sendmail: you have 2 messages waiting in the queue, the limit (max_queued_per_user) is 2; "
        "try again later\n",
    )
    assert os.listdir(spool.dir("new")) == [] and os.listdir(spool.dir("tmp")) == []
    code, out, err = run_as(BOB, submit, MESSAGE)  # another user is not held back
    assert (code, err) == (0, "")
    assert [os.stat(os.path.join(spool.dir("new"), n)).st_uid for n in os.listdir(spool.dir("new"))] == [BOB]


@needs_root
def test_sendmail_bs_answers_mail_from_with_452_at_the_limit(world: Path) -> None:
    from pymta.cli import sendmail

    cfg = world_config(world, "max_queued_per_user: 1\n")
    spool = system_spool(world / "spool")
    drop(spool, ALICE)
    pick_up(spool)
    views.publish(spool, load(cfg), LOG)
    session = b"EHLO me\r\nMAIL FROM:<alice@example.org>\r\nQUIT\r\n"
    code, out, err = run_as(ALICE, lambda: sendmail.main(["sendmail", "-bs", "-C", cfg]), session)
    replies = out.splitlines()
    assert code == 0 and err == ""
    assert replies[-2] == (
        "452 4.3.1 you have 1 messages waiting in the queue, the limit (max_queued_per_user) is 1; "
        "try again later"
    )
    assert replies[-1].startswith("221 ")
    assert os.listdir(spool.dir("new")) == []


# --- the pick-up leaves a user over the limit waiting ---


def state_of(path: str) -> tuple[int, int, bytes]:
    info = os.lstat(path)
    return info.st_ino, info.st_mtime_ns, Path(path).read_bytes()


@needs_root
def test_pick_up_leaves_the_drops_of_a_user_over_the_limit_untouched(spool: Spool) -> None:
    drop(spool, ALICE)
    drop(spool, ALICE)
    pick_up(spool)
    waiting = [drop(spool, ALICE) for _ in range(3)]
    others = [drop(spool, BOB), drop(spool, 0), drop(spool, NOBODY.pw_uid)]
    before = {name: state_of(os.path.join(spool.dir("new"), name)) for name in waiting}
    picked, reports = pick_up(spool, limit=2)
    assert sorted(picked) == sorted(others)
    assert sorted(os.listdir(spool.dir("new"))) == sorted(waiting)
    assert {name: state_of(os.path.join(spool.dir("new"), name)) for name in waiting} == before
    assert reports == [
        f"user uid{ALICE} (uid {ALICE}) is over max_queued_per_user (2 queued): 3 messages wait in new/"
    ]
    # One warning per user per run (a Spool object); the next run says it again.
    assert pick_up(spool, limit=2) == ([], [])
    assert pick_up(Spool(spool.path), limit=2)[1] == reports
    # Once the queue drains, they are taken in.
    for name in os.listdir(spool.dir("queue")):
        if spool.read_entry("queue", name).uid == ALICE:
            os.unlink(os.path.join(spool.dir("queue"), name))
    picked, reports = pick_up(Spool(spool.path), limit=2)
    assert (len(picked), len(os.listdir(spool.dir("new")))) == (2, 1)
    assert reports == [
        f"user uid{ALICE} (uid {ALICE}) is over max_queued_per_user (2 queued): 1 message waits in new/"
    ]


@needs_root
def test_pick_up_takes_a_user_up_to_the_limit(spool: Spool) -> None:
    drop(spool, ALICE)
    pick_up(spool)
    drops = [drop(spool, ALICE) for _ in range(3)]
    picked, reports = pick_up(spool, limit=2)
    assert len(picked) == 1 and picked[0] in drops
    assert reports == [
        f"user uid{ALICE} (uid {ALICE}) is over max_queued_per_user (2 queued): 2 messages wait in new/"
    ]


@needs_root
def test_pick_up_without_a_limit_takes_everything(spool: Spool) -> None:
    drops = [drop(spool, ALICE) for _ in range(4)]
    picked, reports = pick_up(spool)
    assert (sorted(picked), reports, os.listdir(spool.dir("new"))) == (sorted(drops), [], [])


@needs_root
def test_queued_per_uid_counts_every_kind_of_queue_file(spool: Spool) -> None:
    for uid in (ALICE, ALICE, BOB, 0):
        drop(spool, uid)
    pick_up(spool)
    spool.submit({"sender": "", "recipients": ["u@example.org"], "uid": -1}, MESSAGE)  # a bounce
    older = {"v": 1, "id": "6b0a0000deadbeefdeadbeef", "sender": "x", "recipients": ["y@example.net"]}
    Path(spool.dir("queue"), older["id"]).write_bytes(  # as an older pymta wrote it: the uid last
        encode_json({**older, "uid": CAROL}).encode() + b"\n" + MESSAGE
    )
    pick_up(spool)
    assert spool.queued_per_uid() == {ALICE: 2, BOB: 1, 0: 1, -1: 1, CAROL: 1}


# --- what a user sees: mailq, pymta queue, show, and the commands they may not run ---


@pytest.fixture
def two_users(world: Path) -> tuple[str, Spool, list[str], list[str]]:
    """A system spool in `world` where ALICE has two messages (one picked up, one still in new/) and BOB one,
    and their views published: the config path, the spool, ALICE's ids and BOB's."""
    cfg = world_config(world, "max_queued_per_user: 2\n")
    spool = system_spool(world / "spool")
    alice = [drop(spool, ALICE, to="alice-friend@example.net")]
    bob = [drop(spool, BOB, to="bob-secret@example.net")]
    pick_up(spool)
    alice.append(drop(spool, ALICE, to="alice-friend@example.net"))
    views.publish(spool, load(cfg), LOG)
    return cfg, spool, alice, bob


def pymta(*args: str) -> Callable[[], int]:
    from pymta.cli.main import main

    return lambda: main(list(args))


def without_ages(listing_text: str) -> str:
    """A queue listing with its AGE column ("3s", "2m") blanked: two listings made moments apart compare."""
    return re.sub(r"(?m)^(\S+\s+)\d+[smhd]\b", r"\1AGE", listing_text)


@needs_root
def test_a_user_lists_only_their_own_messages(two_users: tuple[str, Spool, list[str], list[str]]) -> None:
    from pymta.cli import sendmail

    cfg, spool, alice, bob = two_users
    published = view_lines(spool, ALICE)[0]["published"]
    assert isinstance(published, float)
    note = (
        f"your messages as of {listing.clock(published)} (the last delivery run; mail sent since then shows "
        "after the next one); only root and nobody see"
    )
    code, out, err = run_as(ALICE, pymta("queue", "-C", cfg))
    lines = out.splitlines()
    assert (code, err) == (0, "")
    assert lines[0] == f"{note} the whole queue"
    assert lines[1] == (
        "you have reached max_queued_per_user (2): sendmail takes no new message from you until some of "
        "these are delivered"
    )
    assert lines[3:5] == ["", "2 queued: not tried yet"]  # grouped by why they wait
    assert [line.split()[0] for line in lines[5:7]] == sorted(alice)  # in submission order
    assert lines[7:] == ["", "-- 2 messages, 42B in total"]
    assert bob[0] not in out and "bob-secret" not in out
    mailq_code, mailq_out, mailq_err = run_as(ALICE, lambda: sendmail.main(["mailq", "-C", cfg]))
    assert (mailq_code, mailq_err) == (0, "")
    # mailq: the same notes, header, lines and total, without the grouping (a second may pass between)
    assert without_ages(mailq_out).splitlines() == without_ages(out).splitlines()[:3] + without_ages(
        out
    ).splitlines()[5:7] + [lines[-1]]
    code, out, err = run_as(ALICE, pymta("queue", "--json", "-C", cfg))
    assert (code, err) == (0, "")
    assert json.loads(out) == view_lines(spool, ALICE)[1]
    assert sorted(item["id"] for item in json.loads(out)) == sorted(alice)


@needs_root
def test_a_user_without_a_view_is_told_they_have_no_messages(
    two_users: tuple[str, Spool, list[str], list[str]],
) -> None:
    cfg, spool, alice, bob = two_users
    code, out, err = run_as(CAROL, pymta("queue", "-C", cfg))
    assert (code, err) == (0, "")
    assert out == (
        "you have no messages in the queue as of the last delivery run (mail sent since then shows after the "
        "next one); only root and nobody see the whole queue\n"
    )
    assert run_as(CAROL, pymta("queue", "--json", "-C", cfg)) == (0, "[]\n", "")


@needs_root
def test_a_user_shows_their_own_message_and_nobody_elses(
    two_users: tuple[str, Spool, list[str], list[str]],
) -> None:
    cfg, spool, alice, bob = two_users
    code, out, err = run_as(ALICE, pymta("queue", "show", alice[0][:16], "-C", cfg))
    assert (code, err) == (0, "")
    assert f"id:            {alice[0]}" in out and "alice-friend@example.net" in out
    assert "view:          your messages as of" in out and "headers:" not in out
    code, out, err = run_as(ALICE, pymta("queue", "show", bob[0], "-C", cfg))
    assert (code, out) == (67, "")
    assert err.startswith(f"pymta: {bob[0]}: no such message among yours as of ")
    assert "bob-secret" not in err
    code, out, err = run_as(ALICE, pymta("queue", "show", "--body", alice[0], "-C", cfg))
    assert (code, out) == (77, "") and "only root and nobody may read a queued message" in err
    code, out, err = run_as(ALICE, pymta("queue", "show", "--json", alice[0], "-C", cfg))
    shown = json.loads(out)[0]
    assert (
        code == 0
        and {key: shown[key] for key in view_lines(spool, ALICE)[1][0]} == (view_lines(spool, ALICE)[1][0])
    )


@needs_root
@pytest.mark.parametrize(
    "args",
    [["hold", "ID"], ["release", "ID"], ["retry", "ID"], ["delete", "ID"], ["bounce", "ID"],
     ["delete", "--all", "--yes"], ["retry", "--all"]],
)  # fmt: skip
def test_a_user_may_not_change_queued_messages(
    two_users: tuple[str, Spool, list[str], list[str]], args: list[str]
) -> None:
    cfg, spool, alice, bob = two_users
    argv = [alice[0] if arg == "ID" else arg for arg in args]
    before = sorted(os.listdir(spool.dir("queue"))), sorted(os.listdir(spool.dir("state")))
    code, out, err = run_as(ALICE, pymta("queue", *argv, "-C", cfg))
    verb = args[0]
    assert (code, out, err) == (
        77,
        "",
        f"pymta: {verb}: only root and nobody (the spool's owner) may change queued messages; "
        f"ask an administrator to run 'pymta queue {verb}'\n",
    )
    assert (sorted(os.listdir(spool.dir("queue"))), sorted(os.listdir(spool.dir("state")))) == before


# --- the config key ---


def test_max_queued_per_user_is_read_and_checked() -> None:
    assert Config().max_queued_per_user == DEFAULT_MAX_QUEUED_PER_USER == 1000
    assert loads("max_queued_per_user: 5\n", "f.yaml").max_queued_per_user == 5
    assert loads("max_queued_per_user: none\n", "f.yaml").max_queued_per_user is None
    assert loads("max_queued_per_user:\n", "f.yaml").max_queued_per_user == 1000
    for value, shown in (("0", "0"), ("-3", "-3"), ("true", "true"), ("lots", '"lots"'), ("1.5", "1.5")):
        with pytest.raises(ConfigError) as error:
            loads(f"max_queued_per_user: {value}\n", "f.yaml")
        assert str(error.value) == (
            "f.yaml: max_queued_per_user: must be a whole number of messages, at least 1, or none for no "
            f"limit, not {shown}"
        )
    with pytest.raises(ConfigError, match=r'not "5" \(remove the quotes\)$'):
        loads('max_queued_per_user: "5"\n', "f.yaml")
    with pytest.raises(ConfigError, match='did you mean "max_queued_per_user"'):
        loads("max_queue_per_user: 5\n", "f.yaml")


@pytest.mark.parametrize("value", ["none", "7"])
def test_max_queued_per_user_reads_back_from_masked(value: str) -> None:
    import yaml

    loaded = loads(f"max_queued_per_user: {value}\n", "f.yaml")
    assert loaded.masked()["max_queued_per_user"] == (value if value == "none" else int(value))
    again = loads(yaml.safe_dump(loaded.masked()), "f.yaml")
    assert again.max_queued_per_user == loaded.max_queued_per_user and again.masked() == loaded.masked()


@pytest.mark.parametrize("text", ["1", "1000", "none", " 7 ", "0", "-1", "1.5", "lots", "1_000", "0x10", "~"])
def test_sendmail_reads_max_queued_per_user_as_the_config_does(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pymta.yaml"
    path.write_text(f"max_queued_per_user: {text}\n")
    value = quickconfig.read_scalars(str(path), frozenset({"max_queued_per_user"})).get("max_queued_per_user")
    try:
        quick: object = DEFAULT_MAX_QUEUED_PER_USER if value is None else (parse_queue_limit(value))
    except ValueError:
        quick = "error"
    try:
        full: object = load(str(path)).max_queued_per_user
    except ConfigError:
        full = "error"
    assert quick == full, text


def test_sendmail_queues_all_the_same_with_a_broken_limit_and_says_so(mta: MtaEnv) -> None:
    mta.write_config("deliver: queue\nmax_queued_per_user: lots\n")
    result = mta.sendmail("friend@example.net", input=MESSAGE)
    assert result.returncode == 0
    assert result.stderr.decode().startswith(
        "sendmail: max_queued_per_user: 'lots' is not a number of messages, so 1000 applies; fix it and "
        "run 'pymta config check'; the message was queued all the same"
    )
    assert len(mta.entries()) == 1


# --- pymta setup makes, checks and purges status/ ---


def test_setup_makes_checks_and_purges_the_status_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pymta.cli.main import main

    root = tmp_path / "root"
    root.mkdir()
    status = root / "var/spool/pymta/status"
    assert main(["setup", "--root", str(root)]) == 0
    info = os.lstat(status)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o711
    assert info.st_uid == os.lstat(root / "var/spool/pymta/queue").st_uid
    status.chmod(0o755)
    capsys.readouterr()
    assert main(["setup", "--root", str(root), "--check"]) == 1
    assert f"[problem] {status} has mode 0755, should be 0711; fix: chmod 0711 {status}" in (
        capsys.readouterr().out.splitlines()
    )
    assert main(["setup", "--root", str(root), "--uninstall", "--purge"]) == 0
    assert not (root / "var/spool/pymta").exists()


def test_the_note_names_the_spool_owner_only_when_it_is_not_root() -> None:
    assert listing.whole_queue_note("pymta") == "only root and pymta see the whole queue"
    assert listing.whole_queue_note("root") == "only root sees the whole queue"
