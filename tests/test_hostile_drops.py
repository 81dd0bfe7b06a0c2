"""Hostile files written straight into the drop directory by a real user (issue 10 H3, M1; issue 11 item 7).

Alice, a real user of a real system-mode install (`tests/system_install.py`), skips sendmail and writes into
new/ what she likes: an envelope whose numbers overflow a float, arrays nested 200,000 deep, a date past any
calendar, a file name that forges a log line, a file she grows after the flusher opened it. Bob sends a
message through sendmail as usual. Then root runs `pymta flush`, as the timer does, with a real smarthost
(aiosmtpd on loopback). What must hold (ARCHITECTURE.md invariants 10 and 11): the run ends well (exit 0),
bob's mail reaches the smarthost, alice's file lands in corrupt/ with exactly one log line naming it, and
root's `pymta queue` and alice's `mailq` still work. An admin removes what was set aside with `pymta queue
delete`.

Everything skips when not run as root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from mailservers import SmtpServer
from system_install import SystemInstall
from test_security import submit, write_as

from pymta.queue.directory import encode_json, new_id
from pymta.queue.entry import NEVER
from pymta.queue.pickup import MAX_PICKUP_PER_USER

MESSAGE = b"Subject: from bob\n\nhello\n"
EX_OK = 0


def envelope_text(**fields: object) -> bytes:
    """A drop's envelope line as sendmail writes it, with `fields` replacing or adding keys."""
    envelope: dict[str, object] = {
        "v": 1,
        "uid": 0,
        "id": "",
        "sender": "alice",
        "recipients": ["friend@example.net"],
        "submitted_by": "root",
        "full_name": "",
        "queued_at": time.time(),
        **fields,
    }
    return encode_json(envelope).encode()


def raw_field(name: str, raw: bytes) -> bytes:
    """An envelope whose field `name` is the JSON text `raw`, as no encoder would write it."""
    return envelope_text(**{name: "PLACEHOLDER"}).replace(b'"PLACEHOLDER"', raw)


HOSTILE: dict[str, tuple[str, bytes]] = {
    # name: (the start of its name, the file)
    "a queued_at of 400 digits": ("", raw_field("queued_at", b"1" + b"0" * 400) + b"\n" + MESSAGE),
    "arrays nested 200,000 deep": ("", raw_field("full_name", b"[" * 200_000) + b"\n" + MESSAGE),
    # Its name sorts first, so every other message waited behind it.
    "a queued_at of 1e300 and no Date": ("00000000", envelope_text(queued_at=1e300) + b"\nSubject: x\n\nx\n"),
    "a queued_at that is NaN": ("", raw_field("queued_at", b"NaN") + b"\n" + MESSAGE),
    "a sender holding a newline": ("", envelope_text(sender="a\nFrom evil") + b"\n" + MESSAGE),
    "a field sendmail never writes": ("", envelope_text(dsn_of="0" * 24) + b"\n" + MESSAGE),
    "an envid that is no xtext": ("", envelope_text(envid="a b\r\nRCPT TO:<x@y>") + b"\n" + MESSAGE),
}


def bob_sends(system: SystemInstall) -> str:
    return submit(system, system.bob, "someone@example.net", message=MESSAGE)


def smarthost(server: SmtpServer) -> str:
    host = {"host": "127.0.0.1", "port": server.port, "security": "none", "timeout": "5s"}
    return f"smarthosts: {json.dumps([host])}\n"


def lines_naming(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def queue_commands_work(system: SystemInstall) -> None:
    """Root's `pymta queue --json` and alice's `mailq` both end well."""
    listing = system.run_as(None, [system.script("pymta"), "queue", "--json"])
    assert listing.returncode == EX_OK, listing.stderr
    json.loads(listing.stdout)
    mailq = system.run_as(system.alice, [system.script("mailq")])
    assert mailq.returncode == EX_OK, mailq.stderr


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_drop_goes_to_corrupt_and_the_run_delivers_the_others(
    system: SystemInstall, hostile: tuple[str, bytes]
) -> None:
    prefix, data = hostile
    name = prefix + new_id()[len(prefix) :]
    write_as(system, system.alice, system.spool / "new" / name, data)
    with SmtpServer("plain") as server:
        system.write_config(smarthost(server))
        queue_commands_work(system)  # before the flush: root lists the raw drop, alice her view
        innocent = bob_sends(system)

        flushed = system.flush()

        log = flushed.stderr.decode()
        assert flushed.returncode == EX_OK, log
        assert [m.rcpt_tos for m in server.handler.messages] == [["someone@example.net"]], log
        assert f"<{innocent}@mx.example.org>".encode() in server.handler.messages[0].data
    assert system.names("corrupt") == [name]
    assert system.names("new") == [] and system.names("queue") == []
    [refused] = lines_naming(log, name)
    assert f"refused new/{name}: " in refused and "moved to corrupt/" in refused
    queue_commands_work(system)


def test_a_drop_named_to_forge_a_log_line_is_quoted_set_aside_and_deletable(system: SystemInstall) -> None:
    name = f"{new_id()}\nid=0 to=<ceo@example.org> status=sent"
    write_as(system, system.alice, system.spool / "new" / name, envelope_text() + b"\n" + MESSAGE)
    with SmtpServer("plain") as server:
        system.write_config(smarthost(server))
        listing = system.run_as(None, [system.script("pymta"), "queue"])  # before the flush: named, quoted
        assert listing.returncode == EX_OK and b"status=sent" not in listing.stdout.split(b"\n", 1)[0]

        flushed = system.flush()

        log = flushed.stderr.decode()
        assert flushed.returncode == EX_OK, log
        assert server.handler.messages == []  # no message of alice's left under that name
    assert not any(line.startswith("id=0 ") for line in log.splitlines()), log  # no forged line
    [refused] = lines_naming(log, "not a queue id")
    assert repr(name) in refused or ascii(name) in refused, refused
    [kept] = re.findall(r"moved to corrupt/ as ([0-9a-f]{24}) ", refused)
    assert system.names("corrupt") == [kept] and system.names("new") == []

    deleted = system.run_as(None, [system.script("pymta"), "queue", "delete", kept])

    assert deleted.returncode == EX_OK, deleted.stderr
    assert system.names("corrupt") == []


# Run as alice: open her drop for writing, wait (inotify) until someone else opens it, then make it 64 GiB.
GROW_ON_OPEN = """
import ctypes, os, sys
path = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init()
assert watch >= 0 and libc.inotify_add_watch(watch, path.encode(), 0x20) >= 0  # IN_OPEN
mine = os.open(path, os.O_WRONLY)
os.read(watch, 4096)  # drains our own open
print("ready", flush=True)
os.read(watch, 4096)
os.ftruncate(mine, 64 << 30)
print("grown", flush=True)
"""


def test_a_drop_grown_after_the_flusher_opened_it_is_not_read_whole(system: SystemInstall) -> None:
    """M1: alice waits for the flusher to open her drop, then makes it 64 GiB (sparse). Whenever that lands,
    the run ends well: the drop was read before it grew (and is delivered), or no more than
    max_message_size and the envelope's allowance of it is read and it is set aside. Held messages the
    quota counts made the moment between the old pick-up's look at the size and its read a wide one (the
    quota is now counted before the open)."""
    fill_queue(system, 10_000)
    queued = system.names("queue")
    name = "00000000" + new_id()[8:]  # the first drop the quota applies to: the queue is counted for it
    path = system.spool / "new" / name
    write_as(system, system.alice, path, envelope_text() + b"\n" + MESSAGE)
    alice = system.alice
    grower = subprocess.Popen(
        [system.script("python"), "-c", GROW_ON_OPEN, str(path)],
        stdout=subprocess.PIPE,
        user=alice.uid,
        group=alice.gid,
        extra_groups=[],
        env=system.environment(alice),
    )
    try:
        assert grower.stdout is not None and grower.stdout.readline() == b"ready\n"
        with SmtpServer("plain") as server:
            system.write_config(smarthost(server) + "max_message_size: 1m\n")
            innocent = bob_sends(system)

            flushed = system.flush()

            log = flushed.stderr.decode()
            assert flushed.returncode == EX_OK, log
            received = {m.rcpt_tos[0]: m.data for m in server.handler.messages}
        assert grower.wait(timeout=10) == 0 and grower.stdout.read() == b"grown\n"
    finally:
        grower.kill()
        grower.wait()
        if grower.stdout is not None:
            grower.stdout.close()
    assert f"<{innocent}@mx.example.org>".encode() in received.pop("someone@example.net")
    assert system.names("new") == [] and system.names("queue") == queued
    if received:  # read whole before it grew: delivered as it was
        assert list(received) == ["friend@example.net"] and len(received["friend@example.net"]) < 4096
    else:  # grown before the read: set aside, and at most max_message_size and a little was read
        assert system.names("corrupt") == [name]
        [refused] = lines_naming(log, name)
        assert "over max_message_size" in refused and "moved to corrupt/" in refused


def fill_queue(system: SystemInstall, count: int) -> None:
    """`count` picked-up messages of a third user's, held (so not even `flush --now` takes them), as the
    spool's owner would have written them."""
    owner = system.spool_user
    later = float(NEVER)
    for _ in range(count):
        name = new_id()
        head = {"v": 1, "uid": system.stranger.uid, "id": name, "submitted_by": system.stranger.name}
        envelope = {**head, "sender": "bob", "recipients": ["x@example.net"], "queued_at": time.time()}
        for directory, data in (
            ("queue", encode_json(envelope).encode() + b"\n" + MESSAGE),
            ("state", b'{"state":"held","attempts":1,"next_attempt":null,"recipients":{}}'),
        ):
            file = system.spool / directory / name
            file.write_bytes(data)
            os.chown(file, owner.uid, owner.gid)
            os.chmod(file, 0o600)
        os.utime(system.spool / "state" / name, (later, later))


def test_a_user_with_many_drops_costs_a_run_a_bounded_amount(system: SystemInstall) -> None:
    """300,000 drops made each run open every one; now one run looks at MAX_PICKUP_PER_USER of one user's."""
    system.write_config("max_queued_per_user: none\n")
    data = envelope_text() + b"\n" + MESSAGE
    make = (
        'cd "$1" && i=0; while [ $i -lt "$2" ]; do printf %s "$3" > "$(printf %08x%016x 1 $i)"; '
        "i=$((i+1)); done"
    )
    count = MAX_PICKUP_PER_USER + 50
    made = system.run_as(
        system.alice, ["/bin/sh", "-c", make, "sh", str(system.spool / "new"), str(count), data.decode()]
    )
    assert made.returncode == EX_OK, made.stderr
    bob_sends(system)

    flushed = system.flush(timeout=120)

    log = flushed.stderr.decode()
    assert flushed.returncode == EX_OK, log
    queue = system.names("queue")
    alices = [name for name in queue if name.startswith("00000001")]
    assert len(alices) == MAX_PICKUP_PER_USER and len(queue) == MAX_PICKUP_PER_USER + 1
    assert len(system.names("new")) == 50
    [line] = lines_naming(log, f"uid {system.alice.uid} has more than {MAX_PICKUP_PER_USER} files")
    assert "50 are left for later" in line


# --- max_queued_per_user at submission (issue 11, item 7) ---


def alice_sends(system: SystemInstall) -> int:
    return system.sendmail(system.alice, "friend@example.net", input=MESSAGE).returncode


def test_messages_sent_in_a_row_before_any_run_count_against_the_quota(system: SystemInstall) -> None:
    """Ten messages in a row with max_queued_per_user: 3 and no delivery run between them: the view alone
    (as of the last run) let all ten in; the user's ledger of her own drops counts them."""
    system.write_config("max_queued_per_user: 3\n")

    codes = [alice_sends(system) for _ in range(10)]

    assert codes == [0, 0, 0] + [75] * 7
    ledger = system.spool / "tmp" / f".quota-{system.alice.uid}"
    assert ledger.stat().st_uid == system.alice.uid and ledger.stat().st_mode & 0o777 == 0o600
    assert system.sendmail(system.bob, "friend@example.net", input=MESSAGE).returncode == 0  # his own count
    system.flush()  # picks the three up (they wait: no smarthost) and publishes her view
    assert alice_sends(system) == 75
    deleted = system.run_as(None, [system.script("pymta"), "queue", "delete", *system.names("queue")])
    assert deleted.returncode == 0, deleted.stderr
    system.flush()  # her view goes: nothing of hers is left

    assert alice_sends(system) == 0  # what the ledger named was picked up and is gone: not counted


def test_another_users_file_in_place_of_the_ledger_only_leaves_the_view_to_count(
    system: SystemInstall,
) -> None:
    system.write_config("max_queued_per_user: 2\n")
    squat = system.spool / "tmp" / f".quota-{system.alice.uid}"
    made = system.run_as(system.bob, ["/bin/sh", "-c", 'printf "x 9e99\\n" > "$1"', "sh", str(squat)])
    assert made.returncode == 0, made.stderr

    assert [alice_sends(system) for _ in range(3)] == [0, 0, 0]  # bob can neither block nor read her
    assert squat.stat().st_uid == system.bob.uid and squat.read_bytes() == b"x 9e99\n"
