"""`pymta queue show|hold|release|retry|delete|bounce` and the expiry of failed messages, end to end.

Messages are queued with the real `sendmail`; state is written the way the flush writes it (or by a real
`pymta flush` with no smarthost, which defers everything); the commands run as the installed `pymta` script
(and a few through CliRunner). Each test checks what the command said, its exit status and what the spool
holds afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MtaEnv, script
from test_queue_cli import FIELDS

from pymta.cli.main import cli
from pymta.config.load import load
from pymta.queue import ids
from pymta.queue import ops as queue_ops
from pymta.queue.entry import NEVER, MessageState
from pymta.queue.spool import Spool

SIMPLE = b"Subject: hello\nTo: a@example.net\n\nhello\n"
CONTRACT = FIELDS  # the DESIGN.md field names, as tests/test_queue_cli.py lists them
RESULT_FIELDS = {"argument", "id", "ok", "result", "detail", "exit_code", "state", "candidates"}
BUSY = "is being delivered right now; try again in a moment"
NO_SMARTHOST = "no smarthost configured"
RELEASED = (
    "released: due now; the next flush delivers it (its time on hold does not count toward retry.lifetime)"
)


def gone(queue_id: str) -> str:
    """What a command says of a full id not in the queue; the mail log is named only where there is one."""
    hint = f"; look for id={queue_id} in the mail log" if os.path.exists("/dev/log") else ""
    return f"not in the queue (it may have been delivered, deleted or expired){hint}"


# --- helpers ---


def enqueue(mta: MtaEnv, *args: str, message: bytes = SIMPLE) -> str:
    """Queue one message with the real sendmail (left in new/); its id."""
    args = args or ("a@example.net", "b@example.net")
    result = mta.sendmail("-v", "-i", *args, input=message)
    assert result.returncode == 0, result.stderr
    return result.stderr.decode().split("queued as ")[1].split()[0]


def pymta(mta: MtaEnv, *args: str) -> subprocess.CompletedProcess[bytes]:
    return mta.run("pymta", args)


def flush(mta: MtaEnv, *args: str) -> None:
    result = pymta(mta, "flush", *args)
    assert result.returncode == 0, result.stderr


def spool(mta: MtaEnv) -> Spool:
    return Spool(str(mta.spool))


def pick_up(mta: MtaEnv) -> None:
    assert spool(mta).pick_up(10**7, pytest.fail)


def state_file(mta: MtaEnv, queue_id: str) -> Path:
    return mta.spool / "state" / queue_id


def state(mta: MtaEnv, queue_id: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(state_file(mta, queue_id).read_bytes())
    return loaded


def record(
    mta: MtaEnv,
    queue_id: str,
    statuses: dict[str, tuple[str, str | None]],
    *,
    attempts: int = 1,
    last_attempt: float | None = None,
    next_attempt: float | None = None,
) -> None:
    """Write the state the flush's `_record` writes after an attempt: deferred when a recipient is pending,
    else failed (next_attempt None, mtime NEVER), its failed recipients reported (their bounce queued)."""
    now = time.time()
    pending = any(status in ("pending", "deferred") for status, _ in statuses.values())
    errors = [error for _, error in statuses.values() if error]
    when = (now + 3600 if next_attempt is None else next_attempt) if pending else NEVER
    spool(mta).write_state(
        queue_id,
        MessageState.from_json(
            {
                "state": "deferred" if pending else "failed",
                "attempts": attempts,
                "last_attempt": now if last_attempt is None else last_attempt,
                "next_attempt": when if pending else None,
                "last_error": errors[-1] if errors else None,
                "relay": "smtp.example.net[192.0.2.1]:587",
                "recipients": {
                    a: {"status": s, "last_error": e, **({"reported": True} if s == "failed" else {})}
                    for a, (s, e) in statuses.items()
                },
            }
        ),
        when,
    )


def deferred(mta: MtaEnv, queue_id: str, **kwargs: Any) -> None:
    record(
        mta,
        queue_id,
        {
            "a@example.net": ("deferred", "451 4.7.1 try later"),
            "b@example.net": ("deferred", "451 4.7.1 later"),
        },
        **kwargs,
    )


def failed(mta: MtaEnv, queue_id: str, **kwargs: Any) -> None:
    record(
        mta,
        queue_id,
        {"a@example.net": ("failed", "550 5.1.1 no such user"), "b@example.net": ("delivered", None)},
        **kwargs,
    )


def listed(mta: MtaEnv) -> dict[str, dict[str, Any]]:
    result = pymta(mta, "queue", "--json")
    assert result.returncode == 0, result.stderr
    return {item["id"]: item for item in json.loads(result.stdout)}


def lines(result: subprocess.CompletedProcess[bytes]) -> tuple[list[str], list[str]]:
    return result.stdout.decode().splitlines(), result.stderr.decode().splitlines()


# --- hold and release ---


def test_held_message_is_not_tried_by_a_flush_while_the_others_are(mta: MtaEnv) -> None:
    held, other = enqueue(mta), enqueue(mta)
    flush(mta)  # no smarthost: both deferred after one attempt
    result = pymta(mta, "queue", "hold", held[:12])
    assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert (
        result.stdout.decode() == f"{held}: held: it is not delivered, and does not expire, until released\n"
    )
    saved = state(mta, held)
    assert saved["state"] == "held" and saved["held_from"] == "deferred" and saved["next_attempt"] is None
    assert saved["attempts"] == 1 and NO_SMARTHOST in saved["last_error"]
    assert state_file(mta, held).stat().st_mtime == NEVER
    flush(mta, "--now")
    after = listed(mta)
    assert after[held]["state"] == "held" and after[held]["attempts"] == 1
    assert after[held]["next_attempt"] is None
    assert after[other]["state"] == "deferred" and after[other]["attempts"] == 2

    released = pymta(mta, "queue", "release", held)
    assert released.returncode == 0
    assert released.stdout.decode() == f"{held}: {RELEASED}\n"
    saved = state(mta, held)
    assert saved["state"] == "deferred" and "held_from" not in saved and "held_at" not in saved
    assert 0 <= saved["held_seconds"] < 60  # the time on hold, kept out of its lifetime
    assert abs(saved["next_attempt"] - time.time()) < 30
    assert state_file(mta, held).stat().st_mtime <= time.time()
    flush(mta)  # due now: tried without --now, the other one is not due
    after = listed(mta)
    assert after[held]["attempts"] == 2 and after[held]["state"] == "deferred"
    assert after[other]["attempts"] == 2


def test_hold_and_release_say_when_there_is_nothing_to_do(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    flush(mta)
    assert pymta(mta, "queue", "hold", queue_id).returncode == 0
    before = state_file(mta, queue_id).read_bytes()
    again = pymta(mta, "queue", "hold", queue_id)
    assert again.returncode == 0 and b": already held" in again.stdout
    assert state_file(mta, queue_id).read_bytes() == before
    assert pymta(mta, "queue", "release", queue_id).returncode == 0
    loose = pymta(mta, "queue", "release", queue_id)
    assert loose.returncode == 0 and loose.stdout.decode() == f"{queue_id}: not held; nothing to do\n"


def test_hold_picks_up_a_message_still_in_new(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    assert (mta.spool / "new" / queue_id).exists()
    result = pymta(mta, "queue", "hold", queue_id)
    assert result.returncode == 0, result.stderr
    assert not (mta.spool / "new" / queue_id).exists() and (mta.spool / "queue" / queue_id).exists()
    saved = state(mta, queue_id)
    assert saved["state"] == "held" and saved["held_from"] == "queued" and saved["attempts"] == 0
    assert saved["recipients"] == {
        "a@example.net": {"status": "pending", "last_error": None},
        "b@example.net": {"status": "pending", "last_error": None},
    }
    flush(mta, "--now")
    assert listed(mta)[queue_id]["attempts"] == 0
    assert pymta(mta, "queue", "release", queue_id).returncode == 0
    assert state(mta, queue_id)["state"] == "queued"
    flush(mta)
    assert listed(mta)[queue_id]["attempts"] == 1


def test_a_failed_message_held_does_not_expire_and_stays_failed_when_released(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    pick_up(mta)
    failed(mta, queue_id, last_attempt=time.time() - 30 * 86400)
    assert pymta(mta, "queue", "hold", queue_id).returncode == 0
    config = load(str(mta.config))
    assert queue_ops.expire_failed(spool(mta), config, time.time()) == []
    released = pymta(mta, "queue", "release", queue_id)
    assert b"stays failed" in released.stdout
    assert state(mta, queue_id)["state"] == "failed"
    assert state_file(mta, queue_id).stat().st_mtime == NEVER
    assert queue_ops.expire_failed(spool(mta), config, time.time()) == [queue_id]


# --- retry ---


def test_retry_makes_a_deferred_message_due_now(mta: MtaEnv) -> None:
    queue_id, later = enqueue(mta), enqueue(mta)
    pick_up(mta)
    deferred(mta, queue_id, next_attempt=time.time() + 3600)
    deferred(mta, later, next_attempt=time.time() + 3600)
    result = pymta(mta, "queue", "retry", queue_id)
    assert result.returncode == 0 and result.stdout.decode().startswith(f"{queue_id}: due now")
    saved = state(mta, queue_id)
    assert saved["state"] == "deferred" and saved["next_attempt"] <= time.time()
    assert saved["recipients"]["a@example.net"] == {"status": "deferred", "last_error": "451 4.7.1 try later"}
    flush(mta)
    after = listed(mta)
    assert after[queue_id]["attempts"] == 2 and after[later]["attempts"] == 1


def test_retry_all_takes_every_deferred_message_and_nothing_else(mta: MtaEnv) -> None:
    ids = [enqueue(mta) for _ in range(4)]
    pick_up(mta)
    for queue_id in ids[:2]:
        deferred(mta, queue_id)
    failed(mta, ids[2])
    assert pymta(mta, "queue", "hold", ids[3]).returncode == 0
    result = pymta(mta, "queue", "retry", "--all")
    assert result.returncode == 0
    assert sorted(line.split(":")[0] for line in lines(result)[0]) == sorted(ids[:2])
    assert all(state(mta, queue_id)["next_attempt"] <= time.time() for queue_id in ids[:2])
    assert state(mta, ids[2])["state"] == "failed" and state(mta, ids[3])["state"] == "held"


def test_retry_refuses_held_and_failed_messages(mta: MtaEnv) -> None:
    held, gone_bad = enqueue(mta), enqueue(mta)
    pick_up(mta)
    failed(mta, gone_bad)
    assert pymta(mta, "queue", "hold", held).returncode == 0
    before = state_file(mta, held).read_bytes(), state_file(mta, gone_bad).read_bytes()
    result = pymta(mta, "queue", "retry", held, gone_bad)
    out, err = lines(result)
    assert result.returncode == 64 and out == []
    assert err == [
        f"pymta: {held}: held: not retried; `pymta queue release {held}` makes it due now",
        f"pymta: {gone_bad}: failed: no recipient is left to try; `pymta queue delete` removes it",
    ]
    assert (state_file(mta, held).read_bytes(), state_file(mta, gone_bad).read_bytes()) == before


def test_retry_all_with_nothing_deferred(mta: MtaEnv) -> None:
    enqueue(mta)
    result = pymta(mta, "queue", "retry", "--all")
    assert (result.returncode, result.stdout) == (0, b"No deferred messages to retry\n")
    as_json = pymta(mta, "queue", "retry", "--all", "--json")
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])


# --- delete ---


def test_delete_removes_queued_and_new_messages_without_a_bounce(mta: MtaEnv) -> None:
    fresh, tried, kept = enqueue(mta), enqueue(mta), enqueue(mta)
    flush(mta)
    fresh2 = enqueue(mta)  # in new/, never picked up
    result = pymta(mta, "queue", "delete", tried, fresh2)
    out, err = lines(result)
    assert (result.returncode, err) == (0, [])
    assert out == [
        f"{tried}: deleted; no bounce is sent",
        f"{fresh2}: deleted before it was picked up; no bounce is sent",
    ]
    for name in ("new", "queue", "state"):
        assert not (mta.spool / name / tried).exists() and not (mta.spool / name / fresh2).exists()
    assert sorted(listed(mta)) == sorted([fresh, kept])  # no bounce was queued
    flush(mta, "--now")
    assert sorted(listed(mta)) == sorted([fresh, kept])
    again = pymta(mta, "queue", "delete", tried)
    assert again.returncode == 67
    assert again.stderr.decode() == f"pymta: {tried}: {gone(tried)}\n"


def test_delete_all_needs_a_state_or_yes(mta: MtaEnv) -> None:
    ids = [enqueue(mta) for _ in range(4)]
    pick_up(mta)
    failed(mta, ids[0])
    failed(mta, ids[1])
    deferred(mta, ids[2])
    for args in (["--all"], ["--state", "failed"], ["--all", "--state", "failed", ids[0]], []):
        refused = pymta(mta, "queue", "delete", *args)
        assert refused.returncode == 64 and refused.stdout == b"", args
        assert refused.stderr.count(b"Error: ") == 1, refused.stderr
    assert b"--yes" in pymta(mta, "queue", "delete", "--all").stderr
    assert len(listed(mta)) == 4
    result = pymta(mta, "queue", "delete", "--all", "--state", "failed")
    assert result.returncode == 0
    assert sorted(line.split(":")[0] for line in lines(result)[0]) == sorted(ids[:2])
    assert sorted(listed(mta)) == sorted(ids[2:])
    none_left = pymta(mta, "queue", "delete", "--all", "--state", "failed")
    assert (none_left.returncode, none_left.stdout) == (0, b"No failed messages to delete\n")
    everything = pymta(mta, "queue", "delete", "--all", "--yes", "--json")
    assert everything.returncode == 0
    assert sorted(item["id"] for item in json.loads(everything.stdout)) == sorted(ids[2:])
    assert listed(mta) == {}


# --- bounce ---


def test_bounce_fails_every_pending_recipient_and_owes_the_sender_a_dsn(mta: MtaEnv) -> None:
    queue_id = enqueue(mta, "-f", "robot@example.org", "a@example.net", "b@example.net", "c@example.net")
    pick_up(mta)
    record(
        mta,
        queue_id,
        {
            "a@example.net": ("delivered", None),
            "b@example.net": ("deferred", "451 4.7.1 try later"),
            "c@example.net": ("pending", None),
        },
    )
    result = pymta(mta, "queue", "bounce", queue_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"{queue_id}: bounced: 2 recipients failed; will be returned to the sender by the next flush\n"
    )
    saved = state(mta, queue_id)
    assert saved["state"] == "failed" and saved["bounce_due"] is True and saved["next_attempt"] is None
    assert saved["last_error"] == queue_ops.ADMIN_BOUNCE == "5.0.0 bounced by the administrator"
    assert abs(saved["failed_at"] - time.time()) < 30 and saved["attempts"] == 1
    assert saved["recipients"] == {
        "a@example.net": {"status": "delivered", "last_error": None},
        "b@example.net": {"status": "failed", "last_error": "5.0.0 bounced by the administrator"},
        "c@example.net": {"status": "failed", "last_error": "5.0.0 bounced by the administrator"},
    }
    # due, so that the next flush finds it and sends the bounce
    assert state_file(mta, queue_id).stat().st_mtime <= time.time()
    assert queue_id in spool(mta).due(time.time())
    assert listed(mta)[queue_id]["state"] == "failed"
    again = pymta(mta, "queue", "bounce", queue_id)
    assert again.returncode == 0 and b"already failed" in again.stdout
    # a bounce still owed is never expired
    assert queue_ops.expire_failed(spool(mta), load(str(mta.config)), time.time() + 365 * 86400) == []


def test_bounce_of_a_message_from_the_null_sender_goes_to_the_admin(mta: MtaEnv) -> None:
    queue_id = enqueue(mta, "-f", "", "root")
    result = pymta(mta, "queue", "bounce", queue_id)  # still in new/: picked up first
    assert result.returncode == 0, result.stderr
    assert b"bounced: 1 recipient failed; the sender is <>" in result.stdout and b"admin" in result.stdout
    assert state(mta, queue_id)["bounce_due"] is True


def test_bounce_keeps_what_else_a_recipient_record_holds_so_the_admin_is_not_told_again(
    mta: MtaEnv,
) -> None:
    """`boss` (the admin) is an alias; a message from <> to it waits under the alias target, which names
    it in `via`. The administrator's bounce keeps that `via`: the flush then sees the admin's own mail and
    tells postmaster, not the admin (the bounce-storm rule of `bounce.bounce_recipient`)."""
    (mta.root / "aliases").write_text("boss: admin-box@remote.test\npostmaster: root\n")
    mta.write_config(
        "domain: example.org\nhostname: mx.example.org\ndeliver: queue\nadmin: boss@example.org\n"
        "local_domains: [example.org]\n"
    )
    queue_id = enqueue(mta, "-f", "", "boss@example.org")
    flush(mta)  # no smarthost: the alias target waits
    assert state(mta, queue_id)["recipients"]["admin-box@remote.test"]["via"] == "boss@example.org"

    result = pymta(mta, "queue", "bounce", queue_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"{queue_id}: bounced: 1 recipient failed; the sender is <> (a bounce itself) and it was for the "
        "admin, so the next flush reports it to postmaster\n"
    )
    assert state(mta, queue_id)["recipients"]["admin-box@remote.test"] == {
        "status": "failed",
        "last_error": queue_ops.ADMIN_BOUNCE,
        "via": "boss@example.org",
    }
    flush(mta)
    # The notice went to postmaster (root's mailbox: the flush runs as root), not to the admin again.
    assert list(listed(mta)) == [queue_id]
    assert listed(mta)[queue_id]["state"] == "failed"
    assert b"Final-Recipient: rfc822; admin-box@remote.test" in (mta.mail_spool / "root").read_bytes()


def test_bounce_of_a_null_sender_message_without_an_admin_says_so(mta: MtaEnv) -> None:
    mta.write_config("domain: example.org\nhostname: mx.example.org\ndeliver: queue\n")
    queue_id = enqueue(mta, "-f", "", "someone@example.net")
    result = pymta(mta, "queue", "bounce", queue_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"{queue_id}: bounced: 1 recipient failed; the sender is <> (a bounce itself) and no admin is "
        "configured, so the next flush reports it to postmaster\n"
    )


@pytest.mark.parametrize("notify", ["never", "delay", "success"])
def test_bounce_says_no_notice_is_sent_when_the_sender_asked_for_none(mta: MtaEnv, notify: str) -> None:
    queue_id = enqueue(mta, "-f", "robot@example.org", "-N", notify, "a@example.net")
    result = pymta(mta, "queue", "bounce", queue_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"{queue_id}: bounced: 1 recipient failed; no notice is sent: the sender asked for none "
        f"(sendmail -N {notify})\n"
    )
    flush(mta)  # no smarthost: a notice would stay queued
    assert list(listed(mta)) == [queue_id]


def test_bounce_of_a_held_message_lets_it_go(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    assert pymta(mta, "queue", "hold", queue_id).returncode == 0
    assert pymta(mta, "queue", "bounce", queue_id).returncode == 0
    saved = state(mta, queue_id)
    assert saved["state"] == "failed" and "held_from" not in saved and saved["bounce_due"] is True


# --- ids ---


def unique_prefix(queue_id: str, ids: list[str], least: int) -> str:
    """The shortest prefix of `queue_id`, of at least `least` characters, that no other of `ids` shares (ids
    made in the same second share their first 8)."""
    others = [other for other in ids if other != queue_id]
    length = least
    while any(other.startswith(queue_id[:length]) for other in others):
        length += 1
    return queue_id[:length]


def test_ids_by_unique_prefix_ambiguous_prefix_and_unknown_id(mta: MtaEnv) -> None:
    ids = sorted(enqueue(mta) for _ in range(3))
    assert len({queue_id[:4] for queue_id in ids}) == 1  # queued within the same few seconds
    prefix = unique_prefix(ids[0], ids, 10)
    result = pymta(mta, "queue", "hold", prefix, ids[0][:4], "abc", "0000ffff", "xyz!", ids[1].upper())
    out, err = lines(result)
    assert result.returncode == 64  # the first failure: the ambiguous prefix
    assert out == [
        f"{ids[0]}: held: it is not delivered, and does not expire, until released",
        f"{ids[1]}: held: it is not delivered, and does not expire, until released",
    ]
    assert (
        err[0]
        == f"pymta: {ids[0][:4]}: ambiguous: matches 3 messages ({', '.join(ids)}); give more of the id"
    )
    assert err[1] == "pymta: abc: too short: give at least 4 characters of the id"
    assert err[2] == "pymta: 0000ffff: no such message in the queue"
    assert err[3].startswith("pymta: xyz!: not a queue id")
    assert len(err) == 4
    unknown = pymta(mta, "queue", "release", "0000ffff", ids[0][:4])
    assert unknown.returncode == 67  # the first failure: the unknown id


def test_json_results_have_one_object_per_id(mta: MtaEnv) -> None:
    ids = sorted(enqueue(mta) for _ in range(2))
    for args in (["queue", "hold", "--json"], ["queue", "--json", "hold"]):
        result = pymta(mta, *args, ids[0], ids[0][:4], "0000ffff")
        assert result.returncode == 64 and result.stderr == b""
        held, ambiguous, unknown = json.loads(result.stdout)
        assert set(held) == set(ambiguous) == set(unknown) == RESULT_FIELDS
        assert held["argument"] == held["id"] == ids[0] and held["ok"] is True and held["state"] == "held"
        assert held["result"] in ("held", "already held") and held["exit_code"] == 0
        assert ambiguous == {
            "argument": ids[0][:4],
            "id": None,
            "ok": False,
            "result": "ambiguous",
            "detail": f"ambiguous: matches 2 messages ({', '.join(ids)}); give more of the id",
            "exit_code": 64,
            "state": None,
            "candidates": ids,
        }
        assert unknown["result"] == "no such message" and unknown["exit_code"] == 67


def test_a_delivered_message_is_not_in_the_queue_and_no_cause_is_claimed(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    pick_up(mta)
    queue = spool(mta)
    queue.remove(queue.read_entry("queue", queue_id))  # as the flush does after the last 250
    queue.finish_removals()
    for command in ("show", "hold", "release", "retry", "delete", "bounce"):
        result = pymta(mta, "queue", command, queue_id)
        assert result.returncode == 67, command
        assert result.stderr.decode() == f"pymta: {queue_id}: {gone(queue_id)}\n"
    never = "abcdef0123456789abcdef01"  # a full id that was never queued: the same, for nobody can tell
    result = pymta(mta, "queue", "show", never)
    assert (result.returncode, result.stderr.decode()) == (67, f"pymta: {never}: {gone(never)}\n")


# --- show ---


def test_show_a_deferred_message(mta: MtaEnv) -> None:
    message = b"Subject: the report\nTo: a@example.net,\n b@example.net\nX-Evil: \x1b[31mred\n\nbody line\n"
    queue_id = enqueue(mta, "-f", "robot@example.org", "-N", "failure", "a@example.net", "b@example.net",
                       message=message)  # fmt: skip
    pick_up(mta)
    deferred(mta, queue_id, next_attempt=time.time() + 3600)
    result = pymta(mta, "queue", "show", queue_id[:16])
    assert result.returncode == 0 and result.stderr == b""
    text = result.stdout.decode()
    assert text.startswith(
        f"id:            {queue_id}\nstate:         deferred\nsender:        robot@example.org\n"
    )
    for expected in (
        "attempts:      1, the last at ",
        "via smtp.example.net[192.0.2.1]:587",
        "next attempt:  20",
        "(in 59m)",
        "last error:    451 4.7.1 later",
        "dsn:           notify=failure",
        "recipients:\n  deferred  a@example.net\n            451 4.7.1 try later\n",
        "  deferred  b@example.net\n            451 4.7.1 later\n",
        "headers:\n  Subject: the report\n  To: a@example.net, b@example.net\n  X-Evil: \\x1b[31mred\n",
    ):
        assert expected in text, expected
    assert "\x1b" not in text and "body line" not in text
    body = pymta(mta, "queue", "show", "--body", queue_id)
    assert body.returncode == 0
    stored = mta.message(spool(mta).read_entry("queue", queue_id))
    assert stored.replace(b"\r\n", b"\n") == message
    assert body.stdout.endswith(b"\nmessage:\n" + stored)  # the stored message, byte for byte
    assert b"headers:" not in body.stdout


def test_show_a_message_not_yet_picked_up_and_several_ids(mta: MtaEnv) -> None:
    first, second = enqueue(mta, "-f", "", "root"), enqueue(mta)
    result = pymta(mta, "queue", "show", first, "0000ffff", second)
    assert result.returncode == 67
    assert result.stderr == b"pymta: 0000ffff: no such message in the queue\n"
    shown = result.stdout.decode().split("\n\n")
    assert len(shown) == 2
    assert shown[0].startswith(f"id:            {first}\nlocation:      new/ (committed, not yet picked up")
    assert "sender:        <> (the null sender)" in shown[0] and "attempts:      0" in shown[0]
    assert "next attempt:  due now" in shown[0] and "  pending  root" in shown[0]
    assert shown[1].startswith(f"id:            {second}\n")
    assert (mta.spool / "new" / first).exists()  # show changes nothing


def test_show_json_is_the_queue_object_plus_details(mta: MtaEnv) -> None:
    queue_id, fresh = enqueue(mta), enqueue(mta)
    pick_up(mta)
    deferred(mta, queue_id)
    fresh_again = enqueue(mta)
    result = pymta(mta, "queue", "show", "--json", queue_id, fresh_again, "0000ffff")
    assert result.returncode == 67 and result.stderr == b""
    shown, new, unknown = json.loads(result.stdout)
    assert CONTRACT < set(shown)
    listed_item = listed(mta)[queue_id]
    assert {key: shown[key] for key in CONTRACT} == listed_item
    assert shown["location"] == "queue" and new["location"] == "new" and new["state"] == "queued"
    assert shown["relay"] == "smtp.example.net[192.0.2.1]:587" and shown["last_attempt"].endswith("Z")
    assert shown["bounce_due"] is False and shown["held_from"] is None and shown["ok"] is True
    assert shown["headers"] == [
        {"name": "Subject", "value": "hello"},
        {"name": "To", "value": "a@example.net"},
    ]
    assert "message" not in shown
    assert set(unknown) == RESULT_FIELDS and unknown["ok"] is False
    with_body = json.loads(pymta(mta, "queue", "show", "--json", "--body", fresh).stdout)
    assert with_body[0]["message"] == SIMPLE.decode().replace("\n", "\r\n")


# --- list --state ---


def test_list_by_state(mta: MtaEnv) -> None:
    ids = [enqueue(mta) for _ in range(4)]
    pick_up(mta)
    deferred(mta, ids[1])
    failed(mta, ids[2])
    assert pymta(mta, "queue", "hold", ids[3]).returncode == 0
    for state_name, expected in (("queued", 0), ("deferred", 1), ("failed", 2), ("held", 3)):
        for args in (["queue", "list", "--state", state_name], ["queue", "--state", state_name]):
            result = pymta(mta, *args, "--json")
            assert [item["id"] for item in json.loads(result.stdout)] == [ids[expected]], args
        table = pymta(mta, "queue", "list", "--state", state_name).stdout.decode()
        assert table.count("\n") in (6, 7) and ids[expected] in table  # header, group, line, total
        assert all(other not in table for other in ids if other != ids[expected])
    both = pymta(mta, "queue", "--state", "held", "--state", "failed", "--json")
    assert sorted(item["id"] for item in json.loads(both.stdout)) == sorted([ids[2], ids[3]])
    assert pymta(mta, "queue", "delete", ids[3]).returncode == 0
    none = pymta(mta, "queue", "list", "--state", "held")
    assert (none.returncode, none.stdout) == (0, b"No held messages in the queue\n")
    bad = pymta(mta, "queue", "list", "--state", "lost")
    assert bad.returncode == 64 and b"lost" in bad.stderr


# --- concurrency ---


def wait_until_it_holds_open(process: subprocess.Popen[bytes], path: Path, timeout: float = 30) -> None:
    """Poll /proc until `process` has `path` open: it has found the message and waits for its lock."""
    deadline = time.monotonic() + timeout
    fds = Path(f"/proc/{process.pid}/fd")
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if any(os.path.realpath(fd) == os.path.realpath(path) for fd in fds.iterdir()):
                return
        except OSError:
            pass  # an fd closed while we looked
        time.sleep(0.01)
    raise AssertionError(f"{process.args} never opened {path}")


def test_a_command_waits_for_a_delivery_then_says_so(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    flush(mta)
    before = state_file(mta, queue_id).read_bytes()
    queue = spool(mta)
    lock = queue.lock_message(queue_id)  # as the flush holds it while it delivers
    assert lock is not None
    try:
        for command in ("hold", "release", "retry", "delete", "bounce"):
            started = time.monotonic()
            result = pymta(mta, "queue", command, "--wait", "0.3", queue_id)
            assert time.monotonic() - started >= 0.3
            assert result.returncode == 75, (command, result.stderr)
            assert result.stderr.decode() == f"pymta: {queue_id}: {BUSY}\n"
        assert state_file(mta, queue_id).read_bytes() == before
        waiting = subprocess.Popen(
            [script("pymta"), "queue", "hold", "--wait", "20", queue_id],
            env=mta.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_until_it_holds_open(waiting, mta.spool / "queue" / queue_id)
        assert waiting.poll() is None  # still waiting for the lock
        assert state_file(mta, queue_id).read_bytes() == before
    finally:
        queue.unlock_message(lock)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert out.decode().startswith(f"{queue_id}: held")
    assert state(mta, queue_id)["state"] == "held"


def test_a_message_delivered_while_the_command_waits_is_reported_gone(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    flush(mta)
    queue = spool(mta)
    lock = queue.lock_message(queue_id)
    assert lock is not None
    try:
        waiting = subprocess.Popen(
            [script("pymta"), "queue", "hold", "--wait", "20", queue_id],
            env=mta.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        wait_until_it_holds_open(waiting, mta.spool / "queue" / queue_id)
        queue.remove(queue.read_entry("queue", queue_id))  # the delivery ends: every recipient accepted
        queue.finish_removals()
    finally:
        queue.unlock_message(lock)
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 67 and out == b""
    assert b"no longer in the queue" in err
    assert not state_file(mta, queue_id).exists()  # no state was written for a message that is gone


def test_a_message_in_new_waits_for_a_running_pick_up(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    queue = spool(mta)
    flush_lock = queue.lock_flush()  # a flush is running and has not picked it up yet
    assert flush_lock is not None
    try:
        result = pymta(mta, "queue", "hold", "--wait", "0.3", queue_id)
        assert result.returncode == 75
        assert b"is being picked up by a running flush; try again in a moment" in result.stderr
        deleted = pymta(mta, "queue", "delete", "--wait", "0.3", queue_id)
        assert deleted.returncode == 75 and (mta.spool / "new" / queue_id).exists()
    finally:
        queue.release_flush(flush_lock)
    assert pymta(mta, "queue", "hold", queue_id).returncode == 0


# --- failed_retention ---


def test_expire_failed_removes_failed_messages_past_the_retention(mta: MtaEnv) -> None:
    mta.write_config("domain: example.org\ndeliver: queue\nfailed_retention: 2d\n")
    config = load(str(mta.config))
    now = 1_900_000_000.0
    old, recent, bounced_long_ago, waiting, held = (enqueue(mta) for _ in range(5))
    pick_up(mta)
    failed(mta, old, last_attempt=now - 3 * 86400)
    failed(mta, recent, last_attempt=now - 86400)
    deferred(mta, waiting, last_attempt=now - 10 * 86400)
    failed(mta, held, last_attempt=now - 10 * 86400)
    assert pymta(mta, "queue", "hold", held).returncode == 0
    # bounced by the admin long ago, its bounce sent: the flush leaves it failed, mtime NEVER
    queue_ops.bounce(config, [bounced_long_ago], now=now - 5 * 86400)
    saved = state(mta, bounced_long_ago)
    del saved["bounce_due"]
    for recipient in saved["recipients"].values():
        if recipient["status"] == "failed":
            recipient["reported"] = True
    spool(mta).write_state(bounced_long_ago, MessageState.from_json(saved), NEVER)

    assert queue_ops.expire_failed(spool(mta), config, now) == sorted([old, bounced_long_ago])
    assert sorted(listed(mta)) == sorted([recent, waiting, held])
    for gone in (old, bounced_long_ago):
        assert not (mta.spool / "queue" / gone).exists() and not state_file(mta, gone).exists()
    assert queue_ops.expire_failed(spool(mta), config, now) == []
    assert queue_ops.expire_failed(spool(mta), config, now + 86400 + 1) == [recent]


def test_expire_failed_skips_a_message_that_is_locked(mta: MtaEnv) -> None:
    queue_id = enqueue(mta)
    pick_up(mta)
    failed(mta, queue_id, last_attempt=0.0)
    config = load(str(mta.config))
    queue = spool(mta)
    lock = queue.lock_message(queue_id)
    assert lock is not None
    try:
        assert queue_ops.expire_failed(queue, config, time.time()) == []
    finally:
        queue.unlock_message(lock)
    assert queue_ops.expire_failed(queue, config, time.time()) == [queue_id]


# --- help and CliRunner ---


@pytest.mark.parametrize("command", ["show", "hold", "release", "retry", "delete", "bounce"])
def test_help_explains_each_command(mta: MtaEnv, command: str) -> None:
    result = pymta(mta, "queue", command, "--help")
    assert result.returncode == 0 and result.stderr == b""
    text = " ".join(result.stdout.decode().split())
    assert "Exit status:" in text and "67 EX_NOUSER" in text and "--json" in text
    assert "never" in text.lower() and "unique prefix of at least 4" in text
    assert "--wait" not in text  # for tests only


def test_clirunner_agrees_with_the_script(mta: MtaEnv) -> None:
    ids = sorted(enqueue(mta) for _ in range(2))
    runner = CliRunner()
    config = ["-C", str(mta.config)]
    held = runner.invoke(cli, ["queue", "hold", *config, ids[0], "0000ffff"], env={"PYMTA_CONFIG": None})
    assert held.exit_code == 67
    assert held.stdout == f"{ids[0]}: held: it is not delivered, and does not expire, until released\n"
    assert held.stderr == "pymta: 0000ffff: no such message in the queue\n"
    shown = runner.invoke(cli, ["queue", *config, "--json", "show", ids[0]], env={"PYMTA_CONFIG": None})
    assert shown.exit_code == 0
    assert json.loads(shown.stdout) == json.loads(pymta(mta, "queue", "show", "--json", ids[0]).stdout)
    prefix = unique_prefix(ids[0], ids, 9)
    released = runner.invoke(cli, ["queue", "release", *config, prefix], env={"PYMTA_CONFIG": None})
    assert released.exit_code == 0 and state(mta, ids[0])["state"] == "queued"


def test_library_reports_results_without_printing(mta: MtaEnv, capsys: pytest.CaptureFixture[str]) -> None:
    queue_id = enqueue(mta)
    config = load(str(mta.config))
    results = queue_ops.hold(config, [queue_id, "0000ffff"], wait=0)
    assert [(r.ok, r.result, r.exit_code) for r in results] == [
        (True, "held", 0),
        (False, "no such message", 67),
    ]
    assert ids.exit_code(results) == 67 and ids.exit_code(results[:1]) == 0
    assert capsys.readouterr() == ("", "")
    assert os.path.exists(mta.spool / "queue" / queue_id)


def test_show_reads_header_fields_as_the_message_module_does() -> None:
    """`pymta queue show` unfolds what message.header_fields finds: folds joined, bad bytes replaced, a
    blank before the colon (obsolete syntax) dropped; the block ends at the first line that is no field."""
    message = b"Subject : a\r\n long\r\n\tsubject\r\nX-Raw: \xff\r\nnot a field\r\nTo: x@y.z\r\n\r\nbody\r\n"
    assert queue_ops.message_headers(message) == [("Subject", "a long subject"), ("X-Raw", "\ufffd")]
