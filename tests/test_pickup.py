"""The pick-up's checks of a drop and the flush's barrier around each message (issue 10 H3, M1; issue 11
items 6 and 8; ARCHITECTURE.md invariants 10 and 11).

`validate_drop` is tried with the hostile envelopes found in review and with hypothesis: whatever a drop's
envelope holds, the check either keeps it, in ranges every later reader can convert, or refuses it with
ValueError; an envelope as sendmail writes it is always kept. The barrier is tried with a real Flusher and a
real smarthost: a message whose handling raises is deferred with the reason, and the others are delivered in
the same run. The pick-up killed between its link and its unlink is tried with real processes.
"""

from __future__ import annotations

import json
import logging
import mailbox
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MtaEnv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailservers import HOST, SmtpServer

from pymta.config.load import load
from pymta.delivery.flush import Flusher
from pymta.delivery.local import LocalOutcome
from pymta.delivery.record import Recorder
from pymta.fsutil import read_all as _read_all
from pymta.queue.directory import encode_json, is_queue_id, new_id, quoted
from pymta.queue.entry import MAX_TIME, QueueEntry
from pymta.queue.listing import entry_to_json
from pymta.queue.pickup import MAX_ADDRESS, MAX_PICKUP_PER_USER, validate_drop
from pymta.queue.spool import Spool

NOW = 1_800_000_000.0
GOOD: dict[str, object] = {
    "v": 1,
    "uid": 1000,
    "id": "6b1600000000000000000000",
    "sender": "alice",
    "recipients": ["bob@example.org", "carol"],
    "submitted_by": "alice",
    "full_name": "Alice Liddell",
    "queued_at": NOW - 5,
    "notify": "failure,delay",
    "ret": "hdrs",
    "envid": "QQ314159",
    "body_type": "8BITMIME",
}


# --- the envelope check ---


def test_an_envelope_as_sendmail_writes_it_is_kept_without_what_the_kernel_tells() -> None:
    kept = validate_drop(dict(GOOD), NOW)
    assert kept == {
        key: value for key, value in GOOD.items() if key not in ("v", "uid", "id", "submitted_by")
    }


BAD: dict[str, tuple[dict[str, object], str]] = {
    "queued_at of 400 digits": ({"queued_at": 10**400}, "'queued_at' is out of range"),
    "queued_at 1e300": ({"queued_at": 1e300}, "'queued_at' is out of range"),
    "queued_at NaN": ({"queued_at": math.nan}, "'queued_at' is out of range"),
    "queued_at infinite": ({"queued_at": math.inf}, "'queued_at' is out of range"),
    "queued_at negative": ({"queued_at": -1}, "'queued_at' is not a time"),
    "queued_at text": ({"queued_at": "now"}, "'queued_at' is not a number"),
    "queued_at true": ({"queued_at": True}, "'queued_at' is not a number"),
    "no queued_at": ({"queued_at": None}, "'queued_at' is not a number"),
    "sender with a newline": ({"sender": "a\nFrom b"}, "'sender' holds a control character"),
    "sender too long": ({"sender": "a" * (MAX_ADDRESS + 1)}, "'sender' is longer than 998 characters"),
    "sender a list": ({"sender": ["a"]}, "'sender' is not text"),
    "no recipients": ({"recipients": []}, "no recipient list"),
    "recipients text": ({"recipients": "bob"}, "no recipient list"),
    "a recipient with CR": ({"recipients": ["bob\r"]}, "'recipients' holds an address that holds a control"),
    "an empty recipient": ({"recipients": [""]}, "'recipients' holds an address that is empty"),
    "a recipient a number": ({"recipients": [1]}, "'recipients' holds something that is not text"),
    "nested recipients": ({"recipients": [["bob"]]}, "'recipients' holds something that is not text"),
    "full name a list": ({"full_name": [[[]]]}, "'full_name' is not text"),
    "ret unknown": ({"ret": "everything"}, "'ret' is not one of hdrs, full"),
    "body type unknown": ({"body_type": "BINARYMIME"}, "'body_type' is not one of"),
    "notify unknown": ({"notify": "always"}, "'notify' is not"),
    "notify empty": ({"notify": ""}, "'notify' is not"),
    "envid with a space": ({"envid": "a b"}, "'envid' is not"),
    "envid with CRLF": ({"envid": "a\r\nRSET"}, "'envid' is not"),
    "envid too long": ({"envid": "a" * 101}, "'envid' is not"),
    "a field of the flush's": ({"dsn_of": "6b1600000000000000000000"}, "dsn_of is not one sendmail writes"),
    "a field with a newline": ({"x\ny": 1}, "'x\\ny' is not one sendmail writes"),
}


@pytest.mark.parametrize(("change", "reason"), BAD.values(), ids=BAD.keys())
def test_a_hostile_envelope_is_refused_with_the_field_named(change: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError) as refused:
        validate_drop({**GOOD, **change}, NOW)
    assert reason in str(refused.value) and "\n" not in str(refused.value)


def test_a_queued_at_in_the_future_becomes_the_pick_up_time() -> None:
    assert validate_drop({**GOOD, "queued_at": NOW + 86400}, NOW)["queued_at"] == NOW


def test_the_fields_the_kernel_tells_are_not_looked_at() -> None:
    claims = {"v": 1, "uid": 10**400, "id": ["x"], "submitted_by": {"root": True}}
    assert "uid" not in validate_drop({**GOOD, **claims}, NOW)


def _containers(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20), _containers, max_leaves=12
)
field_names = st.sampled_from([*GOOD, "dsn_of", "x"])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values, max_size=6))
def test_any_envelope_is_kept_in_range_or_refused_with_value_error(changes: dict[str, object]) -> None:
    """Only ValueError escapes; what is kept can be stored, read back and listed like any queued message."""
    try:
        kept = validate_drop({**GOOD, **changes}, NOW)
    except ValueError:
        return
    envelope = {"v": 1, "uid": 1000, "id": GOOD["id"], "submitted_by": "alice", **kept}
    line = encode_json(envelope).encode("ascii")
    entry = QueueEntry("queue", "/nonexistent", json.loads(line), None, 10, 1000)
    assert 0 <= entry.queued_at <= NOW
    entry_to_json(entry)


addresses = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Cc")),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300)
@given(
    sender=st.just("") | addresses,
    recipients=st.lists(addresses, min_size=1, max_size=5),
    full_name=st.text(max_size=40),
    queued_at=st.floats(min_value=0, max_value=NOW),
    notify=st.none()
    | st.just("never")
    | st.sampled_from(["success", "failure,delay", "success,failure,delay"]),
    ret=st.sampled_from([None, "hdrs", "full"]),
    body_type=st.sampled_from([None, "7BIT", "8BITMIME"]),
)
def test_what_sendmail_writes_is_never_refused(
    sender: str,
    recipients: list[str],
    full_name: str,
    queued_at: float,
    notify: str | None,
    ret: str | None,
    body_type: str | None,
) -> None:
    envelope = {
        "v": 1,
        "uid": 1000,
        "id": new_id(),
        "sender": sender,
        "recipients": recipients,
        "submitted_by": "alice",
        "full_name": full_name,
        "queued_at": queued_at,
        "notify": notify,
        "ret": ret,
        "envid": None,
        "body_type": body_type,
    }
    kept = validate_drop(json.loads(encode_json(envelope)), NOW)
    assert kept["recipients"] == recipients and kept["queued_at"] == queued_at


@given(st.text(max_size=30))
def test_a_quoted_name_is_one_printable_line(name: str) -> None:
    shown = quoted(name)
    assert shown.isprintable() and shown.isascii() and " " not in shown.strip("'\"") or shown == ascii(name)
    assert "\n" not in shown and "\r" not in shown
    assert is_queue_id(name) <= (shown == name)


def test_only_what_new_id_makes_is_a_queue_id() -> None:
    assert is_queue_id(new_id())
    assert not any(
        is_queue_id(name) for name in ("", "x" * 24, new_id().upper(), new_id() + "\n", new_id()[1:])
    )


def test_a_drop_grown_to_64_gib_costs_no_more_than_the_limit(tmp_path: Path) -> None:
    """M1: the pick-up reads through `_read_all` with a limit, whatever the file's size has become."""
    path = tmp_path / "drop"
    with open(path, "wb") as handle:
        handle.truncate(64 << 30)  # sparse: no disk used
    fd = os.open(path, os.O_RDONLY)
    try:
        assert len(_read_all(fd, limit=3 << 20)) == 3 << 20
        assert len(_read_all(fd, 1 << 20, limit=0)) == 0
    finally:
        os.close(fd)


def test_a_queued_entry_with_a_time_past_the_calendar_is_unreadable_not_a_crash(mta: MtaEnv) -> None:
    """What reaches queue/ without the check (an older pymta's pick-up) is one unreadable entry."""
    spool = Spool(str(mta.spool))
    spool.create_private()
    name = new_id()
    envelope = {**GOOD, "id": name, "queued_at": 1e300}
    (mta.spool / "queue" / name).write_bytes(encode_json(envelope).encode() + b"\n\nx\n")
    entries, problems = spool.entries()
    assert entries == [] and problems == [f"queue/{name}: envelope field 'queued_at' is out of range"]
    assert MAX_TIME < 1e300


# --- the barrier around each message ---


@pytest.fixture
def plain() -> Iterator[SmtpServer]:
    with SmtpServer("plain") as server:
        yield server


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def queue(mta: MtaEnv, *recipients: str) -> str:
    result = mta.sendmail("-v", "-i", *recipients, input=b"Subject: hi\n\nhello\n")
    assert result.returncode == 0, result.stderr
    found = re.search(rb"queued as (\w+)", result.stderr)
    assert found
    return found.group(1).decode()


def configured(mta: MtaEnv, server: SmtpServer) -> None:
    host = {"host": HOST, "port": server.port, "security": "none", "timeout": "3s"}
    mta.write_config(
        "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
        f"smarthosts: {json.dumps([host])}\nlocal:\n  mailbox: mbox\n  mail_spool: {mta.root / 'mail'}\n"
    )
    (mta.root / "mail").mkdir(exist_ok=True)


def test_a_message_whose_delivery_raises_is_deferred_and_the_run_goes_on(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    """Issue 11 item 6: an exception while one message is handled (here its local delivery) ends neither the
    run nor the delivery of the messages on either side of it; the message is deferred with the reason."""
    configured(mta, plain)
    first = queue(mta, "one@example.net")
    doomed = queue(mta, "root", "two@example.net")
    last = queue(mta, "three@example.net")
    logger = logging.Logger("pymta-test", logging.INFO)
    captured = Captured()
    logger.addHandler(captured)

    def local_delivery(user: str, message: bytes, **_: object) -> LocalOutcome:
        raise RecursionError("maximum recursion depth exceeded\nid=0 status=sent")  # no forged line

    report = Flusher(load(str(mta.config)), logger, local_delivery=local_delivery).run()

    assert sorted(m.rcpt_tos[0] for m in plain.handler.messages) == ["one@example.net", "three@example.net"]
    assert report.sent == 2 and report.deferred == 2
    spool = Spool(str(mta.spool))
    [entry] = [e for e in spool.entries()[0] if e.location == "queue"]
    assert entry.id == doomed and entry.state == "deferred" and entry.attempts == 1
    assert all(r.status == "deferred" for r in entry.recipients)
    assert "RecursionError: maximum recursion depth exceeded id=0" in str(entry.last_error)
    [logged] = [line for line in captured.lines if line.startswith(f"id={doomed} 4.3.0 pymta failed")]
    assert "it is tried again later" in logged and first != last


def test_a_message_whose_smtp_finish_raises_is_deferred_and_the_next_goes_out_on_a_new_connection(
    mta: MtaEnv, plain: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure hits a message in flight (its commands sent, pipelined): it is parked, the session it was
    on is not trusted any more, and the message started behind it goes out on a new connection."""
    from pymta.delivery.smtp import session as smtp

    configured(mta, plain)
    ids = {queue(mta, "one@example.net"): "one@example.net", queue(mta, "two@example.net"): "two@example.net"}
    doomed, other = sorted(ids)  # the first due is the first in flight
    original = smtp.SmtpSession.finish
    calls = []

    def finish(self: smtp.SmtpSession, transaction: smtp.Transaction, **kwargs: object) -> object:
        calls.append(transaction)
        if len(calls) == 1:
            raise KeyError("a bug in reading the reply")
        return original(self, transaction, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(smtp.SmtpSession, "finish", finish)
    logger = logging.Logger("pymta-test", logging.INFO)

    report = Flusher(load(str(mta.config)), logger).run()

    assert [m.rcpt_tos for m in plain.handler.messages] == [[ids[other]]]
    assert report.sent == 1 and len(plain.handler.ehlo_names) == 2  # the second on a new connection
    [entry] = [e for e in Spool(str(mta.spool)).entries()[0] if e.location == "queue"]
    assert entry.id == doomed and entry.state == "deferred"
    assert "the smarthost may have it already" in str(entry.last_error)


def test_a_failure_while_an_attempt_is_recorded_keeps_who_it_delivered(
    mta: MtaEnv, plain: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 3 under the barrier: the failure comes after the smarthost and the mailbox took the
    message, while its outcome is recorded; no recipient gets it twice, in this run or the next."""
    configured(mta, plain)
    first = queue(mta, "root", "two@example.net", "bad@example.net")
    plain.handler.rejections = {"bad@example.net": "550 5.1.1 no such user"}
    calls = []

    def bounce(self: Recorder, *args: object) -> str:
        calls.append(args)
        raise RuntimeError("a bug in the bounce")

    monkeypatch.setattr(Recorder, "_bounce", bounce)
    Flusher(load(str(mta.config)), logging.Logger("pymta-test")).run()
    monkeypatch.undo()
    Flusher(load(str(mta.config)), logging.Logger("pymta-test")).run(force=True)

    assert [m.rcpt_tos for m in plain.handler.messages if m.mail_from != ""] == [["two@example.net"]]
    box = mailbox.mbox(str(mta.root / "mail" / "root"), create=False)
    subjects = sorted(str(message["Subject"]) for message in box)
    box.close()
    assert calls and subjects.count("hi") == 1  # one copy for root, and the bounce (about bad@) after
    assert len(subjects) == 2
    entries = {e.id: e for e in Spool(str(mta.spool)).entries()[0]}
    statuses = {r.address: r.status for r in entries[first].recipients}
    assert statuses == {"root": "delivered", "two@example.net": "delivered", "bad@example.net": "failed"}


# --- a pick-up killed between its link and its unlink (issue 11 item 8) ---

# Run as a separate process: the pick-up, stopped (SIGSTOP to itself) right after new/ID is linked to
# queue/ID and before new/ID is unlinked; the test kills it there with SIGKILL.
STOP_BETWEEN_LINK_AND_UNLINK = """
import os, signal, sys
from pymta.queue.spool import Spool

real_link = os.link
def link(*args, **kwargs):
    real_link(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGSTOP)
os.link = link
Spool(sys.argv[1]).pick_up(1 << 20, print)
"""


def test_a_pick_up_killed_between_link_and_unlink_delivers_the_message_once(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    configured(mta, plain)
    queued = queue(mta, "once@example.net")
    picker = subprocess.Popen([sys.executable, "-c", STOP_BETWEEN_LINK_AND_UNLINK, str(mta.spool)])
    try:
        deadline = time.monotonic() + 20
        while _state(picker.pid) != "T":  # stopped: the link is made, the unlink not
            assert picker.poll() is None and time.monotonic() < deadline, "the pick-up never got to its link"
            time.sleep(0.01)
        os.kill(picker.pid, signal.SIGKILL)
    finally:
        picker.kill()
        picker.wait()
    assert os.path.exists(mta.spool / "new" / queued) and os.path.exists(mta.spool / "queue" / queued)

    flushed = mta.run("pymta", ["flush", "-v"])
    assert flushed.returncode == 0, flushed.stderr
    again = mta.run("pymta", ["flush", "--now", "-v"])
    assert again.returncode == 0, again.stderr

    assert [m.rcpt_tos for m in plain.handler.messages] == [["once@example.net"]]
    assert os.listdir(mta.spool / "new") == [] and os.listdir(mta.spool / "queue") == []


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_a_listing_reads_no_more_than_the_budget_of_one_users_drops(mta: MtaEnv) -> None:
    """300,000 drops of one user made every listing and view read them all: one line says how many more."""
    spool = Spool(str(mta.spool))
    spool.create_private()
    data = encode_json({**GOOD, "queued_at": time.time()}).encode() + b"\n\nx\n"
    for _ in range(MAX_PICKUP_PER_USER + 3):
        path = mta.spool / "new" / new_id()
        path.write_bytes(data)
        os.chown(path, 54321, 54321)

    entries, problems = spool.entries()

    assert len(entries) == MAX_PICKUP_PER_USER
    assert problems == [
        f"uid 54321 has more than {MAX_PICKUP_PER_USER} files in new/: 3 are left for later "
        "(a run looks at no more of one user's)"
    ]


class ExplodingPolicy:
    """A sender policy that fails on one sender: a stand-in for any bug the pick-up meets in one drop."""

    def check_drop(self, owner: str, sender: str, message: bytes) -> tuple[str, bytes]:
        if sender == "boom":
            raise RuntimeError("a bug")
        return "", message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_a_drop_that_makes_the_pick_up_fail_is_set_aside_and_the_others_are_picked_up(mta: MtaEnv) -> None:
    spool = Spool(str(mta.spool))
    spool.create_private()
    names = {}
    for sender in ("boom", "alice"):
        name = names[sender] = new_id()
        path = mta.spool / "new" / name
        path.write_bytes(encode_json({**GOOD, "sender": sender}).encode() + b"\n\nx\n")
        os.chown(path, 54321, 54321)
    lines: list[str] = []

    picked = spool.pick_up(1 << 20, lines.append, sender_policy=ExplodingPolicy())  # type: ignore[arg-type]

    assert picked == [names["alice"]]
    assert os.listdir(mta.spool / "corrupt") == [names["boom"]]
    assert lines == [
        f"refused new/{names['boom']}: it made the pick-up fail (RuntimeError); "
        "moved to corrupt/ for the admin"
    ]


# --- what the pick-up of our own drops costs (issue 12): no look for queue/ID before its link ---


def _own_drops(spool: Spool, count: int) -> list[str]:
    names = []
    for _ in range(count):
        name = new_id()
        envelope = {**GOOD, "id": name, "uid": os.geteuid(), "queued_at": time.time()}
        (Path(spool.dir("new")) / name).write_bytes(encode_json(envelope).encode() + b"\n\nx\n")
        names.append(name)
    return sorted(names)


def test_our_own_drops_are_linked_without_a_look_for_queue_id_first(
    mta: MtaEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link fails with EEXIST when queue/ID exists, so an open, lstat or stat of it first only costs
    system calls; new/ID is looked at with one lstat and not opened (nothing of it is read: an open, an
    fstat and a close would tell the same), and the run's uid is asked once."""
    spool = Spool(str(mta.spool))
    spool.create_private()
    names = _own_drops(spool, 3)
    looked: list[tuple[str, str]] = []
    for call in ("open", "lstat", "stat"):
        real = getattr(os, call)

        def watched(
            path: object, *args: object, _real: object = real, _call: str = call, **kwargs: object
        ) -> object:
            looked.append((_call, os.fsdecode(path) if isinstance(path, (str, bytes)) else str(path)))
            return _real(path, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(os, call, watched)
    euids = []
    real_geteuid = os.geteuid
    monkeypatch.setattr(os, "geteuid", lambda: euids.append(1) or real_geteuid())

    picked = spool.pick_up(1 << 20, print)

    assert picked == names
    assert sorted(os.listdir(spool.dir("queue"))) == names and os.listdir(spool.dir("new")) == []
    queue = spool.dir("queue") + "/"
    assert [(call, path) for call, path in looked if path.startswith(queue)] == []
    assert [call for call, path in looked if path.startswith(spool.dir("new") + "/")] == ["lstat"] * 3
    assert len(euids) <= 2  # once for the run, once for the budget: not once per drop


def test_an_own_drop_whose_id_is_queued_already_is_set_aside_and_the_queued_one_kept(mta: MtaEnv) -> None:
    """Without a look first, the link's EEXIST is what keeps queue/ID: neither it nor a symbolic link
    planted there is replaced or followed, and the drop goes to corrupt/ with its line."""
    spool = Spool(str(mta.spool))
    spool.create_private()
    queued, linked, fresh = _own_drops(spool, 3)
    queue = Path(spool.dir("queue"))
    (queue / queued).write_bytes(b"the one queued before\n")
    (queue / linked).symlink_to(mta.root / "elsewhere")
    lines: list[str] = []

    picked = spool.pick_up(1 << 20, lines.append)

    assert picked == [fresh]
    assert (queue / queued).read_bytes() == b"the one queued before\n"
    assert (queue / linked).is_symlink() and not (mta.root / "elsewhere").exists()
    assert sorted(os.listdir(spool.dir("corrupt"))) == sorted([queued, linked])
    assert os.listdir(spool.dir("new")) == []
    assert sorted(lines) == sorted(
        f"refused new/{name}: a queued message has this id already; moved to corrupt/ for the admin"
        for name in (queued, linked)
    )
