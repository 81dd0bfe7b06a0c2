"""A large queue as an admin meets it (issue 12, "Scale"; issue 14, items 6 and 7): `pymta queue --json`
streams, `pymta queue` groups messages by why they wait, `--summary` counts them, the filters choose
messages for the listing and for every command, and "oldest first" holds below the second.

Real processes (the installed `pymta`, `mailq`, `sendmail`) on temporary spools; a real aiosmtpd server on
127.0.0.1 for the delivery order. How fast is for bench/compare.py: nothing here is timed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import MtaEnv, script
from mailservers import SmtpServer
from test_queue_ops import deferred, enqueue, failed, pick_up, pymta, record

from pymta.queue.directory import encode_json, is_queue_id, new_id
from pymta.queue.spool import Spool


@pytest.fixture
def plain() -> Iterator[SmtpServer]:
    with SmtpServer("plain") as server:
        yield server


def write_queued(mta: MtaEnv, name: str, number: int, queued_at: float, deferred_until: float) -> None:
    """A picked-up message in queue/ with a deferred state, as a flush leaves it after a 4xx (the format:
    `pymta.queue.spool`'s docstring), written straight: thousands of sendmail runs would take minutes."""
    envelope = {
        "v": 1,
        "uid": os.getuid(),
        "id": name,
        "sender": "robot@example.org",
        "recipients": [f"user{number}@example.net"],
        "submitted_by": "robot",
        "full_name": "",
        "queued_at": queued_at,
    }
    (mta.spool / "queue" / name).write_bytes(
        encode_json(envelope).encode() + b"\n" + b"Subject: %d\r\n\r\n" % number + b"x" * 300 + b"\r\n"
    )
    state = {
        "state": "deferred",
        "attempts": 1,
        "last_attempt": queued_at,
        "next_attempt": deferred_until,
        "last_error": "451 4.3.0 try again later",
        "recipients": {f"user{number}@example.net": {"status": "deferred", "last_error": "451 4.3.0"}},
    }
    path = mta.spool / "state" / name
    path.write_bytes(encode_json(state).encode())
    os.utime(path, (deferred_until, deferred_until))


def fill(mta: MtaEnv, count: int) -> list[str]:
    for sub in ("tmp", "new", "queue", "state", "corrupt"):
        (mta.spool / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    now = time.time()
    names = sorted(new_id() for _ in range(count))
    for number, name in enumerate(names):
        write_queued(mta, name, number, now - 3600, now + 86400)
    return names


# --- order: oldest first, below the second (issue 14, item 7) ---


def test_ids_made_within_one_second_sort_in_the_order_they_were_made() -> None:
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids) and all(is_queue_id(i) for i in ids)
    assert len({i[12:] for i in ids}) == len(ids)  # the random part alone tells them apart


def test_messages_are_listed_and_delivered_in_the_order_they_were_submitted(
    mta: MtaEnv, plain: SmtpServer
) -> None:
    mta.write_config(
        "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
        f'smarthosts: [{{"host": "127.0.0.1", "port": {plain.port}, "security": "none"}}]\n'
    )
    ids = [enqueue(mta, "a@example.net", message=b"Subject: %d\n\nbody\n" % n) for n in range(6)]
    pick_up(mta)
    listed = json.loads(pymta(mta, "queue", "--json").stdout)
    assert [item["id"] for item in listed] == ids
    assert [line.split()[0] for line in mta.run("mailq").stdout.decode().splitlines()[1:-1]] == ids
    assert pymta(mta, "flush").returncode == 0
    subjects = [re.search(rb"Subject: (\d+)", m.data).group(1) for m in plain.handler.messages]  # type: ignore[union-attr]
    assert subjects == [b"%d" % n for n in range(6)]


def test_ids_of_earlier_versions_still_list_and_sort_by_their_second(mta: MtaEnv) -> None:
    """An earlier version's id is 8 hex digits of the second and 16 random ones: it still lists, and sorts
    after the messages of earlier seconds and before those of later ones."""
    fill(mta, 0)
    now = int(time.time()) - 100
    names = [
        f"{now - 1:08x}{'f' * 4}{os.urandom(6).hex()}",
        f"{now:08x}{os.urandom(8).hex()}",  # an earlier version's
        f"{now + 1:08x}{'0' * 4}{os.urandom(6).hex()}",
    ]
    for number, name in enumerate(reversed(names)):
        write_queued(mta, name, number, now, now + 86400)
    listed = json.loads(pymta(mta, "queue", "--json").stdout)
    assert [item["id"] for item in listed] == names
    assert pymta(mta, "queue", "show", names[1][:12]).returncode == 0


# --- streaming (issue 12) ---


def test_json_of_a_large_queue_streams_each_message_as_it_is_read(mta: MtaEnv) -> None:
    """The first objects arrive before the last messages are read: the messages deleted after the first
    object came are not in the array, which is still whole and valid JSON, oldest first. (Built whole
    before printing, every message would be in it.)"""
    names = fill(mta, 3000)
    process = subprocess.Popen(  # unbuffered: communicate() reads on from where readline() stopped
        [script("pymta"), "queue", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=mta.env,
        bufsize=0,
    )
    assert process.stdout is not None
    head = process.stdout.readline() + process.stdout.readline()
    assert head.startswith(b"[\n{") and json.loads(head[1:].rstrip(b",\n"))["id"] == names[0]
    for name in names[1000:]:
        (mta.spool / "queue" / name).unlink()
    rest, errors = process.communicate(timeout=120)
    assert process.returncode == 0, errors
    listed = [item["id"] for item in json.loads(head + rest)]
    assert listed[0] == names[0] and listed == sorted(listed)
    assert 1 <= len(listed) <= 1000
    assert set(listed) <= set(names[:1000])


def test_mailq_and_the_grouped_listing_of_thousands_list_every_one(mta: MtaEnv) -> None:
    names = fill(mta, 2000)
    table = mta.run("mailq").stdout.decode().splitlines()
    assert [line.split()[0] for line in table[1:-1:2]] == names
    grouped = pymta(mta, "queue").stdout.decode().splitlines()
    assert grouped[2] == "2000 deferred: 451 4.3.0 try again later"
    assert [line.split()[0] for line in grouped[3:-2]] == names
    assert grouped[-1].startswith("-- 2000 messages, ")


# --- grouping, --summary and filters (issue 14, item 6) ---


def mixed_queue(mta: MtaEnv) -> list[str]:
    """Five messages: two deferred for one reason, one for another, one failed, one never tried."""
    ids = [enqueue(mta, "a@example.net", "b@example.net") for _ in range(4)]
    ids.append(enqueue(mta, "-f", "", "c@other.example"))
    pick_up(mta)
    deferred(mta, ids[0])
    deferred(mta, ids[2])
    record(
        mta, ids[1], {"a@example.net": ("deferred", "421 4.3.2 busy"), "b@example.net": ("delivered", None)}
    )
    failed(mta, ids[3])
    return ids


def test_the_listing_groups_messages_that_wait_for_the_same_reason(mta: MtaEnv) -> None:
    ids = mixed_queue(mta)
    lines = pymta(mta, "queue").stdout.decode().splitlines()
    groups = [line for line in lines if re.match(r"\d+ \w+", line)]
    assert groups == [
        "2 deferred: 451 4.7.1 later",
        "1 deferred: 421 4.3.2 busy",
        "1 failed: 550 5.1.1 no such user",
        "1 queued: not tried yet",
    ]
    first = lines.index(groups[0])
    assert [line.split()[0] for line in lines[first + 1 : first + 3]] == [ids[0], ids[2]]
    assert sum("451 4.7.1" in line for line in lines) == 1  # said once, not under each message
    assert lines[-1].startswith("-- 5 messages, ")


def test_summary_counts_by_state_domain_and_age(mta: MtaEnv) -> None:
    mixed_queue(mta)
    text = pymta(mta, "queue", "--summary").stdout.decode()
    assert re.search(r"^deferred\s+3$", text, re.M) and re.search(r"^failed\s+1$", text, re.M)
    # per domain of the recipients still to be delivered: example.net in four, other.example in one
    assert re.search(r"^example\.net\s+4\s+4(\s+0){6}$", text, re.M), text
    assert re.search(r"^other\.example\s+1\s+1(\s+0){6}$", text, re.M), text
    assert re.search(r"^TOTAL\s+5\s+5(\s+0){6}$", text, re.M), text
    summary = json.loads(pymta(mta, "queue", "--summary", "--json").stdout)
    assert summary["messages"] == 5
    assert summary["by_state"] == {"queued": 1, "deferred": 3, "held": 0, "failed": 1}
    assert summary["by_age"]["<5m"] == 5
    assert [(d["domain"], d["messages"]) for d in summary["by_domain"]] == [
        ("example.net", 4),
        ("other.example", 1),
    ]


def test_filters_choose_what_is_listed(mta: MtaEnv) -> None:
    ids = mixed_queue(mta)

    def listed(*args: str) -> list[str]:
        result = pymta(mta, "queue", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [item["id"] for item in json.loads(result.stdout)]

    assert listed("--sender", "<>") == [ids[4]]
    assert listed("--recipient", "@OTHER.example") == [ids[4]]
    assert listed("--recipient", "b@example.net") == [ids[0], ids[2]]  # delivered in ids[1] and ids[3]
    assert listed("--recipient", "a@example.net") == ids[:4]
    assert listed("--state", "deferred", "--recipient", "A@example.net") == ids[:3]
    assert listed("--older-than", "1h") == []
    assert listed("list", "--older-than", "0s") == ids
    assert pymta(mta, "queue", "--sender", "nobody@example.org").stdout == b"No messages in the queue match\n"
    bad = pymta(mta, "queue", "--older-than", "soon")
    assert bad.returncode == 64 and b"soon" in bad.stderr


def test_filters_choose_what_each_command_acts_on(mta: MtaEnv) -> None:
    ids = mixed_queue(mta)

    def states() -> dict[str, str]:
        return {item["id"]: item["state"] for item in json.loads(pymta(mta, "queue", "--json").stdout)}

    held = pymta(mta, "queue", "hold", "--recipient", "@other.example")
    assert held.returncode == 0 and [line.split(":")[0] for line in held.stdout.decode().splitlines()] == [
        ids[4]
    ]
    retried = pymta(mta, "queue", "retry", "--recipient", "a@example.net", "--older-than", "0s")
    assert retried.returncode == 0
    assert sorted(line.split(":")[0] for line in retried.stdout.decode().splitlines()) == sorted(
        [ids[0], ids[1], ids[2]]
    )
    assert set(Spool(str(mta.spool)).due(time.time())) == {ids[0], ids[1], ids[2]}
    bounced = pymta(mta, "queue", "bounce", "--sender", "<>")
    assert bounced.returncode == 0 and bounced.stdout.decode().startswith(f"{ids[4]}: bounced")
    assert states()[ids[4]] == "failed"
    deleted = pymta(mta, "queue", "delete", "--state", "failed", "--recipient", "a@example.net")
    assert deleted.returncode == 0
    assert [line.split(":")[0] for line in deleted.stdout.decode().splitlines()] == [ids[3]]
    assert ids[3] not in states()
    assert pymta(mta, "queue", "hold", "--sender", "nobody@example.org").stdout == (
        b"No messages in the queue match\n"
    )
    both = pymta(mta, "queue", "hold", ids[0], "--sender", "<>")
    assert both.returncode == 64 and b"not both" in both.stderr


def test_the_grouped_listing_gives_back_every_row_as_it_was_made_across_its_blocks() -> None:
    """`pymta queue` holds the rows of a large group in compressed blocks: what comes out is each row as
    `table_row` made it, in order, whatever the text (non-ASCII, a lone surrogate from a JSON escape)."""
    from pymta.queue.entry import MessageState, QueueEntry
    from pymta.queue.listing import grouped_text, table_header, table_row

    now = 1_800_000_000.0
    senders = ["robot@example.org", "j\u00f6rg@example.org", "odd\udc80\ud800@example.org"]
    entries = []
    for number in range(1300):
        envelope = {"id": f"{number:024x}", "sender": senders[number % 3], "recipients": ["a@example.net"]}
        envelope["queued_at"] = now - number
        state = MessageState(state="deferred", attempts=1, last_error="451 later", next_attempt=now + 60)
        entries.append(QueueEntry("queue", "", envelope, state, 1000 + number, 0))
    text = "".join(grouped_text(entries, now))
    rows = "".join(table_row(entry, now) + "\n" for entry in entries)
    assert text.startswith(f"{table_header()}\n\n1300 deferred: 451 later\n{rows}\n-- 1300 messages, ")
