"""Sender identity (issue 6, item 3) and the message size limit at submission.

Who may set which envelope sender (`pymta.config.identity`): at pick-up of a drop file owned by another user
(system mode, simulated as root with os.chown to uid 65534) a foreign sender gets X-Authentication-Warning,
or under `sender_policy: strict` the file goes to corrupt/; `sendmail` itself refuses under strict (77).
The tests that run sendmail as an untrusted user make root untrusted with `trusted_users: []`: the user
nobody cannot run this environment's Python (it lies under /root).

`max_message_size` at submission: one byte over exits 65 and queues nothing, exactly at the limit queues,
and reading stops just past the limit.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import MtaEnv

from pymta.config import identity, routing
from pymta.config.identity import ACCEPT, REFUSE, WARN, SenderPolicy
from pymta.config.limits import DEFAULT_MAX_MESSAGE_SIZE, SIZE_UNITS, parse_size
from pymta.config.load import load, loads
from pymta.delivery.flush import Flusher
from pymta.errors import EX_DATAERR, EX_NOPERM
from pymta.mail.message import header_fields, prepend_field
from pymta.queue.directory import encode_json
from pymta.queue.spool import Spool
from pymta.submission import submit

LOGIN = pwd.getpwuid(os.getuid()).pw_name
NOBODY_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop a file as another user")
MESSAGE = b"Subject: hello\r\nTo: victim@example.net\r\n\r\nhello\r\n"
HOST = "mx.example.org"  # the mta fixture's hostname; its domain is example.org


def nobody() -> str:
    return pwd.getpwuid(NOBODY_UID).pw_name


def warning(login: str, sender: str) -> bytes:
    return f"X-Authentication-Warning: {HOST}: {login} set sender to {sender} using -f\r\n".encode()


POLICY = SenderPolicy(
    hostname=HOST,
    domain="example.org",
    local_domains=("lists.example.org",),
    trusted_users=("root", "www-data"),
)


# --- the decision ---


@pytest.mark.parametrize(
    "sender",
    [
        "alice",
        "alice@mx.example.org",
        "alice@example.org",
        "alice@Example.ORG",
        "alice@lists.example.org",
        "alice@localhost",
        "alice@localhost.localdomain",
    ],
)
def test_a_user_may_send_as_themselves(sender: str) -> None:
    assert POLICY.owns("alice", sender)
    assert POLICY.judge("alice", sender) == ACCEPT


@pytest.mark.parametrize(
    "sender", ["bob", "bob@example.org", "alice@example.net", "Alice@example.org", "alice@", "", "root"]
)
def test_another_sender_is_a_claim(sender: str) -> None:
    assert not POLICY.owns("alice", sender)
    assert POLICY.judge("alice", sender) == WARN
    strict = SenderPolicy(hostname=HOST, strict=True)
    assert strict.judge("alice", sender) == REFUSE


@pytest.mark.parametrize("login", ["root", "www-data"])
def test_trusted_users_may_set_any_sender_even_strict(login: str) -> None:
    strict = SenderPolicy(hostname=HOST, trusted_users=("root", "www-data"), strict=True)
    for sender in ("ceo@example.net", "", "bob"):
        assert strict.judge(login, sender) == ACCEPT


def test_with_no_trusted_users_root_is_untrusted_too() -> None:
    assert SenderPolicy(hostname=HOST, trusted_users=()).judge("root", "ceo@example.net") == WARN


def test_the_warning_field_and_the_refusal() -> None:
    assert POLICY.warning_field("alice", "ceo@example.net") == warning("alice", "ceo@example.net")
    assert POLICY.warning_field("alice", "") == warning("alice", "<>")
    assert POLICY.refusal("alice", "") == (
        "alice may not set the sender <>: with sender_policy: strict only trusted_users may set a sender "
        "other than their own (alice or alice@example.org)"
    )


@pytest.mark.parametrize("sender", ["a@x\r\nBcc: victim@example.net", "a\x00b@x", "a\udc80@x", "a\x7f@x"])
def test_a_drop_file_with_a_control_character_in_its_sender_is_refused(sender: str) -> None:
    refusal, message = POLICY.check_drop("alice", sender, MESSAGE)
    assert "control character" in refusal and message == MESSAGE


def test_check_drop_adds_the_field_only_when_due() -> None:
    assert POLICY.check_drop("alice", "alice@example.org", MESSAGE) == ("", MESSAGE)
    assert POLICY.check_drop("www-data", "ceo@example.net", MESSAGE) == ("", MESSAGE)
    assert POLICY.check_drop("alice", "ceo@example.net", MESSAGE) == (
        "",
        warning("alice", "ceo@example.net") + MESSAGE,
    )


@pytest.mark.parametrize(
    ("message", "stored"),
    [
        (MESSAGE, b"X: y\r\n" + MESSAGE),
        (b"\r\nbody only\r\n", b"X: y\r\n\r\nbody only\r\n"),
        (b"bare text, no header\r\n", b"X: y\r\n\r\nbare text, no header\r\n"),
        (b"  indented text\r\n", b"X: y\r\n\r\n  indented text\r\n"),  # not a continuation of X
        (b"", b"X: y\r\n"),
    ],
)
def test_prepend_field_never_turns_body_into_header(message: bytes, stored: bytes) -> None:
    assert prepend_field(message, b"X: y\r\n") == stored
    assert header_fields(prepend_field(message, b"X: y\r\n"))[0] == ("X", b"X: y\r\n")


def test_a_dotted_node_name_other_than_the_hostname_is_no_local_domain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uname = os.uname()
    fake = type(uname)((uname.sysname, "example.org", uname.release, uname.version, uname.machine))
    monkeypatch.setattr(os, "uname", lambda: fake)
    router = routing.Router(loads("hostname: mail.example.org\n"))
    assert router.local_part("alice@example.org") is None  # example.org's own mail goes out
    assert router.local_part("root@mail") == "root" and router.local_part("root@mail.example.org") == "root"
    single = type(uname)((uname.sysname, "vm", uname.release, uname.version, uname.machine))
    monkeypatch.setattr(os, "uname", lambda: single)
    assert identity.host_names("mail.example.org") == (
        "localhost",
        "localhost.localdomain",
        "mail.example.org",
        "mail",
        "vm",
    )


def test_the_short_host_name_and_the_node_name_are_this_hosts_names() -> None:
    policy = identity.SenderPolicy(hostname="myhost.example.org")
    assert policy.owns("alice", "alice@myhost") and policy.owns("alice", "alice@MyHost.example.org.")
    assert policy.owns("alice", "alice@localhost")
    if "." not in os.uname().nodename:  # a single-label node name is one of this host's names
        assert policy.owns("alice", f"alice@{os.uname().nodename}")
    assert not policy.owns("alice", "alice@example.org") and not policy.owns("alice", "alice@myhost.example")
    router = routing.Router(loads("hostname: myhost.example.org\n"))
    assert [router.local_part(a) for a in ("root@myhost", "root@localhost.", "root@MYHOST.example.org")] == [
        "root",
        "root",
        "root",
    ]
    assert router.local_part("root@myhost.example.net") is None


def test_policy_of_a_config() -> None:
    loaded = loads(
        "hostname: mx.example.org\ndomain: example.org\nlocal_domains: [lists.example.org]\n"
        "trusted_users: [www-data]\nsender_policy: strict\n",
        "/etc/pymta/pymta.yaml",
    )
    policy = identity.policy_of(loaded)
    assert policy.strict and policy.trusted_users == {"www-data"}
    assert policy.domains == {
        "localhost",
        "localhost.localdomain",
        HOST,
        HOST.partition(".")[0],
        *identity.host_names(""),  # the node name, here and in CI
        "example.org",
        "lists.example.org",
    }
    assert policy.judge("root", "ceo@example.net") == REFUSE


# --- at pick-up: a file dropped by another user (system mode) ---


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def drop_as_nobody(mta: MtaEnv, sender: str, name: str = "00000001" + "ab" * 8) -> str:
    """What a local user can do in system mode: create a file of their own in the drop directory new/,
    here with an envelope sender of their choice (as sendmail -f writes it)."""
    spool = Spool(str(mta.spool))
    spool.create_private()
    envelope = {
        "v": 1,
        "id": name,
        "sender": sender,
        "recipients": ["victim@example.net"],
        "submitted_by": "root",  # a lie: the pick-up takes the file's owner
        "uid": 0,
        "full_name": "",
        "queued_at": 2e9,
    }
    path = mta.spool / "new" / name
    path.write_bytes(encode_json(envelope).encode() + b"\n" + MESSAGE)
    os.chown(path, NOBODY_UID, NOBODY_UID)
    return name


def pick_up(mta: MtaEnv, extra: str = "") -> list[str]:
    """One in-process flush with the config plus `extra` (no smarthost: messages stay queued); its log."""
    mta.write_config(f"domain: example.org\nhostname: {HOST}\ndeliver: queue\n{extra}")
    logger = logging.Logger("pymta-test", logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    Flusher(load(str(mta.config)), logger).run()
    return handler.lines


def stored(mta: MtaEnv) -> bytes:
    entry = mta.only_entry()
    assert entry.submitted_by == nobody() and entry.uid == NOBODY_UID
    return mta.message(entry)


@needs_root
@pytest.mark.parametrize("sender", ["ceo@example.net", "root", "root@example.org"])
def test_a_foreign_sender_in_a_drop_file_gets_the_warning(mta: MtaEnv, sender: str) -> None:
    drop_as_nobody(mta, sender)
    pick_up(mta)
    assert stored(mta) == warning(nobody(), sender) + MESSAGE
    assert mta.only_entry().sender == sender  # marked, not changed


@needs_root
def test_the_null_sender_from_an_untrusted_user_gets_the_warning(mta: MtaEnv) -> None:
    drop_as_nobody(mta, "")
    pick_up(mta)
    assert stored(mta) == warning(nobody(), "<>") + MESSAGE


@needs_root
@pytest.mark.parametrize(
    "own",
    ["{login}", f"{{login}}@{HOST}", "{login}@example.org", "{login}@localhost", "{login}@lists.example"],
)
def test_the_owners_own_address_gets_no_warning(mta: MtaEnv, own: str) -> None:
    drop_as_nobody(mta, own.format(login=nobody()))
    pick_up(mta, "local_domains: [lists.example]\n")
    assert stored(mta) == MESSAGE


@needs_root
def test_a_trusted_owner_gets_no_warning(mta: MtaEnv) -> None:
    drop_as_nobody(mta, "ceo@example.net")
    pick_up(mta, f"trusted_users: [root, {nobody()}]\nsender_policy: strict\n")
    assert stored(mta) == MESSAGE


@needs_root
@pytest.mark.parametrize("sender", ["ceo@example.net", ""])
def test_strict_sets_a_foreign_drop_file_aside(mta: MtaEnv, sender: str) -> None:
    name = drop_as_nobody(mta, sender)
    lines = pick_up(mta, "sender_policy: strict\n")
    assert mta.entries() == []
    assert os.listdir(mta.spool / "corrupt") == [name]
    assert os.listdir(mta.spool / "new") == []
    shown = sender or "<>"
    assert lines == [
        f"refused new/{name}: {nobody()} may not set the sender {shown}: with sender_policy: strict only "
        f"trusted_users may set a sender other than their own ({nobody()} or {nobody()}@example.org); "
        "moved to corrupt/ for the admin"
    ]


@needs_root
def test_strict_takes_the_owners_own_address(mta: MtaEnv) -> None:
    drop_as_nobody(mta, f"{nobody()}@example.org")
    pick_up(mta, "sender_policy: strict\n")
    assert stored(mta) == MESSAGE


@needs_root
def test_a_header_injection_through_the_sender_of_a_drop_file_is_refused(mta: MtaEnv) -> None:
    name = drop_as_nobody(mta, "ceo@example.net\r\nBcc: everyone@example.net")
    lines = pick_up(mta)
    assert mta.entries() == [] and os.listdir(mta.spool / "corrupt") == [name]
    assert "control character" in lines[0]


@needs_root
def test_a_queue_command_that_picks_up_marks_the_sender_too(mta: MtaEnv) -> None:
    name = drop_as_nobody(mta, "ceo@example.net")
    mta.write_config(f"domain: example.org\nhostname: {HOST}\ndeliver: queue\n")
    result = mta.run("pymta", ["queue", "hold", name])
    assert result.returncode == 0, result.stderr
    assert stored(mta) == warning(nobody(), "ceo@example.net") + MESSAGE


def test_an_own_submission_is_not_judged(mta: MtaEnv) -> None:
    """User mode: the spool and the smarthost account are the user's own; nothing is marked."""
    mta.write_config("trusted_users: []\n")
    result = mta.sendmail("-f", "ceo@example.net", "victim@example.net", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    pick_up(mta, "trusted_users: []\n")
    assert mta.message(mta.only_entry()) == MESSAGE


# --- sendmail: strict refuses at once ---

UNTRUSTED = "trusted_users: []\n"  # root, who runs these tests, is then an untrusted user


def config_text(*lines: str) -> str:
    return f"domain: example.org\nhostname: {HOST}\ndeliver: queue\n" + "".join(lines)


@pytest.mark.parametrize("flag", ["-f", "-r"])
def test_strict_sendmail_refuses_a_foreign_sender_of_an_untrusted_user(mta: MtaEnv, flag: str) -> None:
    mta.write_config(config_text(UNTRUSTED, "sender_policy: strict\n"))
    result = mta.sendmail(flag, "ceo@example.net", "victim@example.net", input=MESSAGE)
    assert result.returncode == EX_NOPERM
    assert result.stderr.decode() == (
        f"sendmail: {LOGIN} may not set the sender ceo@example.net: with sender_policy: strict only "
        f"trusted_users may set a sender other than their own ({LOGIN} or {LOGIN}@example.org); ask the "
        f"admin to add {LOGIN} to trusted_users, or send without -f; nothing was queued\n"
    )
    assert not (mta.spool / "new").exists() or os.listdir(mta.spool / "new") == []


def test_strict_sendmail_refuses_the_null_sender_of_an_untrusted_user(mta: MtaEnv) -> None:
    mta.write_config(config_text(UNTRUSTED, "sender_policy: strict\n"))
    result = mta.sendmail("-f", "<>", "victim@example.net", input=MESSAGE)
    assert result.returncode == EX_NOPERM, result.stderr
    assert b"may not set the sender <>" in result.stderr


@pytest.mark.parametrize(
    "sender", [LOGIN, f"{LOGIN}@example.org", f"{LOGIN}@{HOST}", f"{LOGIN}@localhost", f"{LOGIN}@EXAMPLE.org"]
)
def test_strict_sendmail_takes_the_users_own_address(mta: MtaEnv, sender: str) -> None:
    mta.write_config(config_text(UNTRUSTED, "sender_policy: strict\n"))
    result = mta.sendmail("-f", sender, "victim@example.net", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert mta.only_entry().sender == sender


def test_strict_sendmail_takes_a_trusted_user(mta: MtaEnv) -> None:
    mta.write_config(config_text("sender_policy: strict\n"))  # trusted_users: [root] by default
    result = mta.sendmail("-f", "ceo@example.net", "victim@example.net", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert mta.only_entry().sender == "ceo@example.net"


def test_warn_sendmail_queues_a_foreign_sender(mta: MtaEnv) -> None:
    mta.write_config(config_text(UNTRUSTED))
    result = mta.sendmail("-f", "ceo@example.net", "victim@example.net", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert mta.only_entry().sender == "ceo@example.net"


def test_a_broken_config_never_stops_a_submission_even_strict(mta: MtaEnv) -> None:
    """The full config cannot be read, so sendmail cannot judge: it queues, and the pick-up judges."""
    mta.write_config(config_text(UNTRUSTED, "sender_policy: strict\nretry: {schedule: [soon]}\n"))
    result = mta.sendmail("-f", "ceo@example.net", "victim@example.net", input=MESSAGE)
    assert result.returncode == 0, result.stderr
    assert len(mta.entries()) == 1


def test_strict_sendmail_bs_refuses_a_foreign_mail_from(mta: MtaEnv) -> None:
    mta.write_config(config_text(UNTRUSTED, "sender_policy: strict\n"))
    session = (
        b"EHLO client\r\nMAIL FROM:<ceo@example.net>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"Subject: hi\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    result = mta.sendmail("-bs", input=session)
    assert b"554 5.6.0 not queued: " in result.stdout and b"may not set the sender" in result.stdout
    assert mta.entries() == []


# --- max_message_size at submission ---


def crlf_message(size: int) -> bytes:
    head = b"Subject: size\r\n\r\n"
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


@pytest.mark.parametrize(
    ("setting", "limit"), [("200", 200), ("1k", 1000), ("2KiB", 2048), ("0.01MB", 10000)]
)
def test_a_message_exactly_at_the_limit_is_queued(mta: MtaEnv, setting: str, limit: int) -> None:
    mta.write_config(config_text(f"max_message_size: {setting}\n"))
    result = mta.sendmail("victim@example.net", input=crlf_message(limit))
    assert result.returncode == 0, result.stderr
    assert mta.message(mta.only_entry()) == crlf_message(limit)


@pytest.mark.parametrize(("setting", "limit"), [("200", 200), ("1k", 1000), ("2KiB", 2048)])
def test_a_message_one_byte_over_the_limit_is_refused(mta: MtaEnv, setting: str, limit: int) -> None:
    mta.write_config(config_text(f"max_message_size: {setting}\n"))
    result = mta.sendmail("victim@example.net", input=crlf_message(limit + 1))
    assert result.returncode == EX_DATAERR
    assert result.stderr.decode() == (
        f"sendmail: message too large: more than {limit} bytes (max_message_size); nothing was queued\n"
    )
    assert not (mta.spool / "new").exists() or os.listdir(mta.spool / "new") == []


def test_the_size_is_counted_with_crlf_line_endings(mta: MtaEnv) -> None:
    mta.write_config(config_text("max_message_size: 200\n"))
    lf = crlf_message(200).replace(b"\r\n", b"\n")  # 197 bytes as given, 200 as stored and sent
    assert mta.sendmail("victim@example.net", input=lf).returncode == 0
    over = b"Subject: size\n\n" + b"x\n" * 92  # 199 bytes as given, 293 as stored
    assert mta.sendmail("victim@example.net", input=over).returncode == EX_DATAERR
    assert len(mta.entries()) == 1


def test_a_huge_message_is_refused_without_being_read(mta: MtaEnv) -> None:
    mta.write_config(config_text("max_message_size: 1k\n"))
    result = mta.sendmail("victim@example.net", input=b"Subject: big\n\n" + b"x" * 50_000_000)
    assert result.returncode == EX_DATAERR  # the rest of the input was never read (the writer got EPIPE)
    assert not (mta.spool / "new").exists() or os.listdir(mta.spool / "new") == []


def test_the_default_limit_applies_without_a_config(mta: MtaEnv) -> None:
    mta.config.unlink()
    big = crlf_message(DEFAULT_MAX_MESSAGE_SIZE + 1)
    result = mta.sendmail("victim@example.net", input=big)
    assert result.returncode == EX_DATAERR
    assert b"more than 35000000 bytes" in result.stderr


def test_an_unreadable_limit_falls_back_to_the_default(mta: MtaEnv) -> None:
    mta.write_config(config_text("max_message_size: lots\n"))
    result = mta.sendmail("victim@example.net", input=MESSAGE)
    assert result.returncode == 0
    assert result.stderr.decode().startswith(
        "sendmail: max_message_size: 'lots' is not a size, so 35000000 bytes applies; fix it and run "
        "'pymta config check'; the message was queued all the same"
    )


@pytest.fixture
def stdin_pipe() -> Iterator[int]:
    """A pipe on file descriptor 0 for in-process reads; its write end is yielded."""
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    os.close(read_end)
    try:
        yield write_end
    finally:
        os.dup2(saved, 0)
        os.close(saved)


@pytest.mark.parametrize("stop_at_dot", [False, True])
def test_reading_stops_just_past_the_limit(stdin_pipe: int, stop_at_dot: bool) -> None:
    data = b"Subject: x\n\n" + b"line of text\n" * 1000
    os.write(stdin_pipe, data)
    os.close(stdin_pipe)
    assert submit.read_stdin(stop_at_dot, limit=100) == data[:101]
    assert os.read(0, 1 << 20) == data[101:]  # the rest was left unread
    assert submit.read_stdin(stop_at_dot, limit=100) == b""


def test_reading_without_a_limit_takes_everything(stdin_pipe: int) -> None:
    os.write(stdin_pipe, b"x" * 50_000)
    os.close(stdin_pipe)
    assert submit.read_stdin(False) == b"x" * 50_000


# --- the import-light size parser reads the grammar the docs give ---

SIZES = [
    "35M", "35MB", "35mb", "35 M", "10k", "64KiB", "1.5G", "0.5k", "1.0005k", "1.9999b", "35000000", " 7 ",
    "0", "1b", "3gib", "2Mib",
    "", "M", "35 MB ", "35  M", "3.M", ".5M", "5.", "35X", "35Mx", "1,5M", "-1", "+1", "1e6", "35M B", "٣٥",
    "35\tM", "0x10", "35µ", "１０", "35\u212a",
]  # fmt: skip


def _size_by_grammar(text: str) -> int:
    """The size grammar as a regular expression: what parse_size, which sendmail imports without `re` or
    `fractions`, must read exactly (it used to be the config loader's own copy of the parser)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?) ?([A-Za-z]*)", text.strip())
    if not match or match.group(2).lower() not in SIZE_UNITS.keys() | {""}:
        raise ValueError(text)
    number, unit = match.groups()
    return int(Fraction(number) * SIZE_UNITS.get(unit.lower(), 1))


@pytest.mark.parametrize("text", SIZES)
def test_parse_size_reads_the_size_grammar(text: str) -> None:
    def outcome(parse: object) -> int | str:
        assert callable(parse)
        try:
            result = parse(text)
        except ValueError:
            return "error"
        assert isinstance(result, int)
        return result

    assert outcome(parse_size) == outcome(_size_by_grammar), text


# --- sendmail's start-up stays light on the -f paths ---

HEAVY = {"json", "yaml", "re", "typing", "dataclasses", "email", "socket", "logging", "click", "fractions"}
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("policy", "sender"),
    [("warn", "ceo@example.net"), ("strict", LOGIN), ("warn", ""), (None, "ceo@example.net")],
)
def test_sender_checks_import_nothing_heavy(mta: MtaEnv, policy: str | None, sender: str) -> None:
    mta.write_config(config_text(UNTRUSTED, f"sender_policy: {policy}\n" if policy else ""))
    code = (
        "import sys; from pymta.cli.sendmail import main; "
        f"sys.exit(main(['sendmail', '-f', {sender!r}, 'victim@example.net']))"
    )
    env = {**mta.env, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-S", "-X", "importtime", "-c", code],
        input=MESSAGE,
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.decode().splitlines()
        if line.startswith("import time:") and "|" in line and "imported package" not in line
    }
    assert "pymta.cli.sendmail" in modules
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    assert len(mta.entries()) == 1
