"""`pymta queue`, `pymta queue --json`, `mailq` and `sendmail -bp` as admins and monitoring scripts use them.

The JSON field names are a contract (DESIGN.md, "pymta queue --json"); the table is for people; unreadable
entries are reported without hiding the rest; a broken config and bad options get sysexits codes.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import MtaEnv, local_sandbox, script
from test_sendmail_cli import NOBODY, unprivileged, world_dir

from pymta.cli.main import cli

LOGIN = pwd.getpwuid(os.getuid()).pw_name
FIELDS = {
    "id",
    "state",
    "sender",
    "recipients",
    "size",
    "submitted_by",
    "queued_at",
    "next_attempt",
    "attempts",
    "last_error",
}
RECIPIENT_FIELDS = {"address", "status", "last_error"}
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
AGE = r"\d+[smhd]"

# (sendmail arguments, message): three senders, among them the null sender, and -t recipients
SUBMISSIONS: list[tuple[list[str], bytes]] = [
    (
        ["-f", "robot@example.org", "a@example.net", "b@example.net"],
        b"Subject: first\n\n" + b"long line of the first message\n" * 60,
    ),
    (["-f", "", "ops@example.net"], b"Subject: a bounce\n\nundeliverable\n"),
    (["-t", "extra@example.net"], b"To: x@example.net\nCc: Y <y@example.net>\nSubject: third\n\nthird\n"),
]


def parse_iso(text: str) -> float:
    assert ISO_UTC.fullmatch(text), text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def submit_three(mta: MtaEnv, env: dict[str, str] | None = None) -> list[str]:
    """Queue SUBMISSIONS one after the other; their ids in submission order."""
    ids = []
    for args, message in SUBMISSIONS:
        result = mta.sendmail("-v", *args, input=message, env=env)
        assert result.returncode == 0, result.stderr
        ids.append(result.stderr.decode().split("queued as ")[1].split()[0])
    return ids


def pymta(mta: MtaEnv, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return mta.run("pymta", args, env=env)


def without_age(listing: bytes) -> list[str]:
    """The table without its AGE column, which may tick between two runs."""
    return [re.sub(rf"^(\S{{24}})\s+{AGE}\s", r"\1 ", line) for line in listing.decode().splitlines()]


# --- pymta queue --json ---


@pytest.mark.parametrize("command", [["queue", "--json"], ["queue", "list", "--json"]])
def test_json_has_exactly_the_contract_fields(mta: MtaEnv, command: list[str]) -> None:
    started = time.time()
    # LOGNAME and USER lie: submitted_by must come from the operating system
    ids = submit_three(mta, env={**mta.env, "LOGNAME": "mallory", "USER": "mallory"})
    finished = time.time()
    result = pymta(mta, *command)
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    listed = json.loads(result.stdout)
    assert isinstance(listed, list) and [item["id"] for item in listed] == ids  # oldest first
    entries = {entry.id: entry for entry in mta.entries()}
    expected_senders = ["robot@example.org", "", LOGIN]
    for item, sender in zip(listed, expected_senders, strict=True):
        assert set(item) == FIELDS
        entry = entries[item["id"]]
        assert item["state"] == "queued"
        assert item["sender"] == sender
        assert item["submitted_by"] == LOGIN != "mallory"
        assert item["size"] == len(mta.message(entry)) > 0
        queued_at = parse_iso(item["queued_at"])
        assert int(started) <= queued_at <= finished
        assert item["next_attempt"] == item["queued_at"]  # never tried: due at once
        assert item["attempts"] == 0 and item["last_error"] is None
        assert [r["address"] for r in item["recipients"]] == [r.address for r in entry.recipients]
        for recipient in item["recipients"]:
            assert set(recipient) == RECIPIENT_FIELDS
            assert recipient["status"] == "pending" and recipient["last_error"] is None
    assert [r["address"] for r in listed[0]["recipients"]] == ["a@example.net", "b@example.net"]
    assert [r["address"] for r in listed[1]["recipients"]] == ["ops@example.net"]
    assert {r["address"] for r in listed[2]["recipients"]} == {
        "extra@example.net",
        "x@example.net",
        "y@example.net",
    }
    assert listed[0]["size"] > 1024 > listed[1]["size"]


def test_json_after_a_deferral_shows_the_reason(mta: MtaEnv) -> None:
    ids = submit_three(mta)
    flush = pymta(mta, "flush")
    assert flush.returncode == 0, flush.stderr
    listed = json.loads(pymta(mta, "queue", "--json").stdout)
    assert [item["id"] for item in listed] == ids
    for item in listed:
        assert set(item) == FIELDS
        assert item["state"] == "deferred" and item["attempts"] == 1
        assert "no smarthost" in item["last_error"]
        assert parse_iso(item["next_attempt"]) > parse_iso(item["queued_at"])
        for recipient in item["recipients"]:
            assert recipient["status"] == "deferred" and "no smarthost" in recipient["last_error"]
    table = mta.run("mailq").stdout.decode().splitlines()
    assert len(table) == 1 + 2 * 3 + 1  # each message is followed by its last error
    assert all(" deferred " in table[1 + 2 * i] for i in range(3))
    assert all(table[2 + 2 * i].strip().startswith("(no smarthost") for i in range(3))
    # `pymta queue` says the reason they share once, above them
    grouped = pymta(mta, "queue").stdout.decode().splitlines()
    assert len(grouped) == 1 + 1 + 1 + 3 + 1 + 1
    assert grouped[2] == f"3 deferred: {listed[0]['last_error']}"
    assert [line.split()[0] for line in grouped[3:6]] == ids
    assert sum("no smarthost" in line for line in grouped) == 1


def test_json_of_an_empty_or_missing_queue_is_an_empty_array(mta: MtaEnv) -> None:
    assert not mta.spool.exists()
    missing = pymta(mta, "queue", "--json")
    assert (missing.returncode, json.loads(missing.stdout), missing.stderr) == (0, [], b"")
    for name in ("tmp", "new", "queue", "state"):
        (mta.spool / name).mkdir(parents=True)
    empty = pymta(mta, "queue", "list", "--json")
    assert (empty.returncode, json.loads(empty.stdout), empty.stderr) == (0, [], b"")


def test_submitted_by_is_the_real_user_not_what_the_environment_claims(mta: MtaEnv) -> None:
    kwargs = unprivileged()
    if kwargs is None or kwargs.get("user") != NOBODY:
        pytest.skip("needs root and a user nobody that can run this interpreter")
    shared = world_dir()
    try:
        shared.chmod(0o777)
        config = shared / "pymta.yaml"
        config.write_text(f"spool: {shared / 'spool'}\ndeliver: queue\n{local_sandbox(shared)}")
        env = {**mta.env, "PYMTA_CONFIG": str(config), "HOME": str(shared), "LOGNAME": "root", "USER": "root"}
        result = subprocess.run(
            [script("sendmail"), "root"],
            input=b"Subject: x\n\ny\n",
            capture_output=True,
            env=env,
            timeout=30,
            **kwargs,
        )
        assert result.returncode == 0, result.stderr
        listed = json.loads(pymta(mta, "queue", "--json", "-C", str(config)).stdout)
        assert [(item["submitted_by"], item["sender"]) for item in listed] == [("nobody", "nobody")]
    finally:
        shutil.rmtree(shared)


# --- the table ---


def test_table_has_a_header_a_line_per_message_and_a_total(mta: MtaEnv) -> None:
    ids = submit_three(mta)
    entries = {entry.id: entry for entry in mta.entries()}
    result = mta.run("mailq")
    assert result.returncode == 0 and result.stderr == b""
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["ID", "AGE", "SIZE", "STATE", "SENDER", "->", "RECIPIENTS"]
    senders = ["robot@example.org", "<>", LOGIN]
    for line, entry_id, sender in zip(lines[1:4], ids, senders, strict=True):
        entry = entries[entry_id]
        size = f"{entry.size}B" if entry.size < 1024 else f"{entry.size / 1024:.1f}K"
        recipients = ", ".join(r.address for r in entry.recipients)
        assert re.fullmatch(
            rf"{entry_id}\s+{AGE}\s+{re.escape(size)}\s+queued\s+{re.escape(sender)} -> "
            rf"{re.escape(recipients)}",
            line,
        ), line
    total = sum(entry.size for entry in entries.values())
    assert lines[4] == f"-- 3 messages, {total / 1024:.1f}K in total"


def test_empty_queue_says_so(mta: MtaEnv) -> None:
    for result in (pymta(mta, "queue"), pymta(mta, "queue", "list"), mta.run("mailq"), mta.sendmail("-bp")):
        assert (result.returncode, result.stdout, result.stderr) == (0, b"Mail queue is empty\n", b"")


def test_mailq_bp_and_pymta_queue_agree(mta: MtaEnv) -> None:
    submit_three(mta)
    outputs = [without_age(r.stdout) for r in (mta.run("mailq"), mta.sendmail("-bp"), pymta(mta, "queue"))]
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 5
    # `pymta queue`: the same header, lines and total, the lines under the reason they share
    header, *lines, total = outputs[0]
    assert outputs[2] == [header, "", "3 queued: not tried yet", *lines, "", total]


@pytest.mark.parametrize("kind", ["garbage", "not an envelope", "a FIFO", "a directory"])
def test_unreadable_entry_is_reported_and_the_others_listed(mta: MtaEnv, kind: str) -> None:
    ids = submit_three(mta)
    bad = mta.spool / "new" / "00000000deadbeefdeadbeef"
    if kind == "garbage":
        bad.write_bytes(b"\x00\xff garbage\nmore\n")
    elif kind == "not an envelope":
        bad.write_bytes(b'{"v": 99, "id": "x"}\nSubject: x\n\nbody\n')
    elif kind == "a FIFO":
        os.mkfifo(bad)  # must not hang the listing
    else:
        bad.mkdir()
    for result in (pymta(mta, "queue"), mta.run("mailq"), mta.sendmail("-bp")):
        assert result.returncode == 0
        stderr = result.stderr.decode()
        assert stderr.count("\n") == 1 and "cannot read new/00000000deadbeefdeadbeef" in stderr, stderr
        assert all(entry_id in result.stdout.decode() for entry_id in ids)
        assert "-- 3 messages," in result.stdout.decode()
    listed = pymta(mta, "queue", "--json")
    assert listed.returncode == 0 and b"deadbeef" in listed.stderr
    assert [item["id"] for item in json.loads(listed.stdout)] == ids


def test_broken_state_file_is_reported_and_the_others_listed(mta: MtaEnv) -> None:
    ids = submit_three(mta)
    (mta.spool / "new" / ids[0]).rename(mta.spool / "queue" / ids[0])
    (mta.spool / "state" / ids[0]).write_bytes(b"{not json")
    result = pymta(mta, "queue", "--json")
    assert result.returncode == 0
    assert f"queue/{ids[0]}" in result.stderr.decode()
    assert [item["id"] for item in json.loads(result.stdout)] == ids[1:]


# --- errors and help ---


@pytest.mark.parametrize("command", [["queue"], ["queue", "--json"], ["queue", "list"]])
def test_broken_config_names_the_error_then_lists_what_mailq_lists_and_exits_78(
    mta: MtaEnv, command: list[str]
) -> None:
    ids = submit_three(mta)
    mta.write_config("retry:\n  schedule: [1m, 5m\n")
    result = pymta(mta, *command)
    stderr = result.stderr.decode()
    assert result.returncode == 78, stderr
    first, second = stderr.splitlines()
    assert first.startswith("pymta: ") and str(mta.config) in first, stderr
    assert f"listing {mta.spool}," in second and "broken" in second, stderr
    assert all(entry_id in result.stdout.decode() for entry_id in ids)
    assert all(entry_id in mta.run("mailq").stdout.decode() for entry_id in ids)


@pytest.mark.parametrize("command", [["queue", "hold"], ["queue", "show"]])
def test_broken_config_stops_the_commands_that_need_it_with_78(mta: MtaEnv, command: list[str]) -> None:
    entry_id = submit_three(mta)[0]
    mta.write_config("retry:\n  schedule: [1m, 5m\n")
    result = pymta(mta, *command, entry_id)
    stderr = result.stderr.decode()
    assert result.returncode == 78 and result.stdout == b"", stderr
    assert stderr.count("\n") == 1 and str(mta.config) in stderr, stderr
    assert "held" not in [entry.state for entry in mta.entries()]


def test_unknown_key_in_config_is_exit_78(mta: MtaEnv) -> None:
    mta.write_config("smarthost: smtp.example.org\n")
    result = pymta(mta, "queue")
    assert result.returncode == 78 and result.stderr.splitlines()[0].startswith(b"pymta: ")
    assert b"smarthost" in result.stderr.splitlines()[0]


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["queue", "--bogus"], "--bogus"),
        (["queue", "list", "--bogus"], "--bogus"),
        (["--bogus", "queue"], "--bogus"),
        (["queue", "nonsense"], "nonsense"),
        (["queue", "--json", "extra"], "extra"),
    ],
)
def test_unknown_option_is_exit_64_not_2(mta: MtaEnv, args: list[str], word: str) -> None:
    result = pymta(mta, *args)
    assert result.returncode == 64 and result.stdout == b"", result
    assert word in result.stderr.decode()


def test_help_exits_0(mta: MtaEnv) -> None:
    top = pymta(mta, "--help")
    assert top.returncode == 0 and top.stderr == b""
    assert "queue" in top.stdout.decode() and "flush" in top.stdout.decode()
    for args in (["queue", "--help"], ["queue", "list", "--help"]):
        result = pymta(mta, *args)
        assert result.returncode == 0 and result.stderr == b"", result
        assert "--json" in result.stdout.decode()


def _help_names_every_field(text: str) -> None:
    text = " ".join(text.split())
    for field in sorted(FIELDS | RECIPIENT_FIELDS):
        assert field in text, field


def test_queue_list_help_names_the_json_fields(mta: MtaEnv) -> None:
    _help_names_every_field(pymta(mta, "queue", "list", "--help").stdout.decode())


def test_queue_help_names_the_json_fields(mta: MtaEnv) -> None:
    _help_names_every_field(pymta(mta, "queue", "--help").stdout.decode())


def test_clirunner_json_matches_the_script(mta: MtaEnv) -> None:
    ids = submit_three(mta)
    runner = CliRunner()
    outputs: list[Any] = []
    for args in (
        ["queue", "--json", "-C", str(mta.config)],
        ["queue", "list", "--json", "-C", str(mta.config)],
    ):
        result = runner.invoke(cli, args, env={"PYMTA_CONFIG": None})
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout))
    assert outputs[0] == outputs[1] == json.loads(pymta(mta, "queue", "--json").stdout)
    assert [item["id"] for item in outputs[0]] == ids
