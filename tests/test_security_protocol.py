"""Hostile input across the privilege split, with real users (issue 10: H2, M2 and two Low items).

The root process of a system-mode flush serves local deliveries for the delivery process (`pymta`) and
forks a child per recipient that runs as the recipient. What is proved here, on a real install
(`tests/system_install.py`):

- a path SMTP cannot carry (over 256 octets, RFC 5321 4.5.3.1.3) is refused by `sendmail` with 67 and
  one line, and nothing is queued;
- the same sender written straight into new/ by alice (70,000 characters, or 11,000 'é' that JSON
  escaping makes six times longer) wedges nothing: the flush ends, the flush lock is free for the next
  run, bob's mail is delivered and the bad message is not;
- a recipient who stops her own delivery child (SIGSTOP) delays only her own message: the child is
  killed at once, her message deferred and delivered by a later run, everyone else's delivered;
- a pre-created mailbox others may read is not written, and the fix says chown and chmod.

The protocol itself (random, truncated, oversized and hostile frames) is fuzzed in
`tests/test_privsep_protocol.py`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from system_install import SystemInstall
from test_security import MESSAGE, drop_file, flush, mbox_messages, submit, write_as

EX_NOUSER = 67
DOMAIN_PART = "@example.org"
LONG_SENDER = "a" * 70_000 + DOMAIN_PART
WIDE_SENDER = "é" * 11_000 + DOMAIN_PART  # 22,000 octets; as JSON (\u00e9) 66,000 characters
LONGEST = "a" * (254 - len(DOMAIN_PART)) + DOMAIN_PART  # <...> around it makes 256 octets


# --- refused at submission ---


@pytest.mark.parametrize(
    "args",
    [
        ["-f", LONG_SENDER, "{bob}"],
        ["-f", WIDE_SENDER, "{bob}"],
        ["-f", "x" + LONGEST, "{bob}"],
        ["{bob}", "b" + LONGEST],
    ],
    ids=["70000-char sender", "11000 x é sender", "257-octet sender", "257-octet recipient"],
)
def test_a_path_smtp_cannot_carry_is_refused_at_submission(system: SystemInstall, args: list[str]) -> None:
    argv = [arg.format(bob=system.bob.name) for arg in args]

    result = system.sendmail(system.alice, *argv, input=MESSAGE)

    assert result.returncode == EX_NOUSER, result.stderr
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("sendmail: ") and "256 octets" in line and len(line) < 400, line
    assert system.names("new") == [] and system.names("tmp") == []


def test_the_longest_path_smtp_carries_is_queued(system: SystemInstall) -> None:
    submit(system, system.alice, "-f", LONGEST, system.bob.name, LONGEST)
    assert len(system.names("new")) == 1


# --- written straight into new/: the flush goes on ---


@pytest.mark.parametrize("sender", [LONG_SENDER, WIDE_SENDER], ids=["70000 chars", "11000 x é"])
def test_a_dropped_sender_smtp_cannot_carry_wedges_nothing(system: SystemInstall, sender: str) -> None:
    alice, bob = system.alice, system.bob
    bad, data = drop_file(sender, [bob.name])
    write_as(system, alice, system.spool / "new" / bad, data)
    good = submit(system, alice, bob.name, message=b"Subject: good\n\nfor bob\n")

    log = flush(system)  # on the old code: root waited for the delivery process, which waited for root

    [delivered] = mbox_messages(system.mail_spool / bob.name)
    assert delivered["Subject"] == "good" and good in delivered["Message-ID"], log
    again = system.flush()  # the lock is free: this run works instead of finding "another flush"
    assert again.returncode == 0 and b"another flush" not in again.stderr, again.stderr
    assert len(mbox_messages(system.mail_spool / bob.name)) == 1  # the bad one reached no mailbox
    # Never lost silently: failed (bounced to what it claims), or set aside in corrupt/ with a log line.
    assert f"id={bad} " in log or (f"refused new/{bad}: " in log and system.names("corrupt") == [bad])
    for entry in system.entries():
        if entry.id != bad:  # its bounce, waiting for a smarthost
            assert entry.sender == "" and [r.address for r in entry.recipients] == [sender]


# --- the recipient's own delivery child ---


@contextmanager
def stopping_her_children(system: SystemInstall) -> Iterator[None]:
    """alice, in a loop, stops every process of hers that runs `pymta flush`: her delivery child."""
    alice = system.alice
    loop = f'while :; do pkill -STOP -u {alice.uid} -f "[p]ymta flush"; sleep 0.02; done'
    process = subprocess.Popen(
        ["/bin/sh", "-c", loop],
        user=alice.uid,
        group=alice.gid,
        extra_groups=[],
        env=system.environment(alice),
        cwd=alice.home,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.kill()
        process.wait()


def test_a_recipient_who_stops_her_delivery_child_delays_only_her_own_mail(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    for_alice = submit(system, bob, alice.name, message=b"Subject: for alice\n\nhello alice\n")
    for_bob = submit(system, alice, bob.name, message=b"Subject: for bob\n\nhello bob\n")
    dotlock = system.mail_spool / f"{alice.name}.lock"
    write_as(system, alice, dotlock, b"")  # her mail reader holds the mailbox: the child waits a while

    with stopping_her_children(system):
        log = flush(system)  # on the old code: 330 s for the stopped child, past the test's timeout
    dotlock.unlink()

    [delivered] = mbox_messages(system.mail_spool / bob.name)
    assert for_bob in delivered["Message-ID"], log
    [waiting] = system.entries()
    assert waiting.id == for_alice and waiting.state == "deferred", log
    assert waiting.last_error and "stopped" in waiting.last_error and "killed" in waiting.last_error

    log = flush(system)  # --now: the retry, with alice no longer interfering

    assert system.entries() == [], log
    messages = mbox_messages(system.mail_spool / alice.name)  # a copy cut short may come first
    assert messages and for_alice in messages[-1]["Message-ID"], log
    assert messages[-1].get_payload() == "hello alice\n"


# --- a mailbox someone pre-created for the recipient ---


def test_a_mailbox_others_may_read_is_not_written_and_the_fix_says_chmod(system: SystemInstall) -> None:
    alice, bob = system.alice, system.bob
    box = system.mail_spool / bob.name
    write_as(system, alice, box, b"")  # alice was first: /var/mail/bob is hers
    os.chmod(box, 0o666)
    queue_id = submit(system, alice, bob.name)

    flush(system)

    [entry] = system.entries()
    assert entry.id == queue_id and entry.state == "deferred" and entry.last_error
    assert f"chown {bob.name} {box}" in entry.last_error and f"chmod 600 {box}" in entry.last_error
    os.chown(box, bob.uid, -1)  # half the advice: bob's now, but still 0666, readable by alice
    flush(system)
    [entry] = system.entries()
    assert entry.last_error and "may be written by anyone" in entry.last_error and box.read_bytes() == b""
    assert f"chmod 600 {box}" in entry.last_error
    os.chmod(box, 0o600)  # the whole advice
    flush(system)
    assert system.entries() == [] and len(mbox_messages(box)) == 1
