"""Message handling at submission and delivery, on the inputs real callers send
(reference/sendmail-callers.md), with property tests for the invariants: no body byte lost, CRLF only, Bcc
never stored."""

from __future__ import annotations

import locale
import subprocess
import sys
import time
from collections.abc import Iterator
from email.header import decode_header, make_header
from pathlib import Path

import pytest
from conftest import nested_multipart
from hypothesis import example, given
from hypothesis import strategies as st

from pymta.errors import MessageError
from pymta.mail.linefit import fit_line_length
from pymta.mail.message import (
    MAX_LINE,
    LineEndings,
    complete,
    format_date,
    get_header,
    header_fields,
    header_read,
    normalise_line_endings,
    prepare_submission,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def crlf(text: bytes) -> bytes:
    """A test literal written with LF line ends, as the CRLF bytes it stands for."""
    return text.replace(b"\n", b"\r\n")


LONG_LINE = b"x" * 5000

DEBIAN_CRON = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <root@host> /usr/local/bin/r\xc3\xa9sum\xc3\xa9 --all\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\n"
    b"X-Cron-Env: <HOME=/root>\n"
    b"X-Cron-Env: <PATH=/usr/bin:/bin>\n"
    b"\n"
    b"job output\n.\n..\n" + LONG_LINE + b"\n\x00nul\tbyte\nend"
)

# (caller, input, -t, expected stored copy, expected header recipients)
SUBMISSIONS = [
    (
        "Debian cron: 8-bit Subject, X-Cron-Env, no final newline",
        DEBIAN_CRON,
        False,
        crlf(DEBIAN_CRON) + b"\r\n",
        [],
    ),
    (
        "cronie -t",
        b'From: "(Cron Daemon)" <alice>\nTo: alice,bob@example.org\nSubject: Cron <alice@h> ls\n'
        b"Auto-Submitted: auto-generated\nPrecedence: bulk\n\nout\n",
        True,
        crlf(
            b'From: "(Cron Daemon)" <alice>\nTo: alice,bob@example.org\nSubject: Cron <alice@h> ls\n'
            b"Auto-Submitted: auto-generated\nPrecedence: bulk\n\nout\n"
        ),
        ["alice", "bob@example.org"],
    ),
    (
        "logwatch: several To lines, bare From",
        b"To: root\nTo: admin@example.org\nTo: ops@example.org\n"
        b"From: Logwatch\nSubject: Logwatch for host (Linux)\n\n ### Logwatch ###\n.\n",
        True,
        crlf(
            b"To: root\nTo: admin@example.org\nTo: ops@example.org\nFrom: Logwatch\n"
            b"Subject: Logwatch for host (Linux)\n\n ### Logwatch ###\n.\n"
        ),
        ["root", "admin@example.org", "ops@example.org"],
    ),
    (
        "bsd-mailx -t with Bcc",
        b"To: a@x.example, root\nSubject: hi\nCc: c@x.example\nBcc: secret@x.example\n"
        b"MIME-Version: 1.0\n\nbody\n",
        True,
        crlf(b"To: a@x.example, root\nSubject: hi\nCc: c@x.example\nMIME-Version: 1.0\n\nbody\n"),
        ["a@x.example", "root", "c@x.example", "secret@x.example"],
    ),
    (
        "PHP mail(): CRLF header, LF body, folded Bcc",
        b"To: user@example.org\r\nSubject: Order\r\n"
        b"From: shop@example.org\r\nBcc: audit@example.org,\r\n\tlog@example.org\r\n\r\nline 1\nline 2\n",
        True,
        crlf(b"To: user@example.org\nSubject: Order\nFrom: shop@example.org\n\nline 1\nline 2\n"),
        ["user@example.org", "audit@example.org", "log@example.org"],
    ),
    (
        "mdadm",
        b"From: mdadm monitoring <root@shorthost>\nTo: root\nSubject: Fail event on /dev/md0:shorthost\n\n"
        b"Personalities : [raid1]\n",
        True,
        crlf(
            b"From: mdadm monitoring <root@shorthost>\nTo: root\n"
            b"Subject: Fail event on /dev/md0:shorthost\n\nPersonalities : [raid1]\n"
        ),
        ["root"],
    ),
    (
        "zed: no header at all",
        b"ZFS has finished a scrub:\n\n   eid: 5\n  pool: tank\n",
        False,
        crlf(b"ZFS has finished a scrub:\n\n   eid: 5\n  pool: tank\n"),
        [],
    ),
    (
        "zed with -t finds nothing",
        b"ZFS has finished a scrub:\nTo: root\n",
        True,
        crlf(b"ZFS has finished a scrub:\nTo: root\n"),
        [],
    ),
    (
        "rkhunter: Subject and To only",
        b"Subject: [rkhunter] Warnings found\nTo: root\n\nWarning: x\n",
        False,
        crlf(b"Subject: [rkhunter] Warnings found\nTo: root\n\nWarning: x\n"),
        [],
    ),
    (
        "busybox crond -ti",
        b"To: admin@example.org\nSubject: cron: ls\n\nout\n",
        True,
        crlf(b"To: admin@example.org\nSubject: cron: ls\n\nout\n"),
        ["admin@example.org"],
    ),
    (
        "sudo -t, bare From",
        b"To: root\nFrom: alice\nAuto-Submitted: auto-generated\n"
        b"Subject: *** SECURITY information for h ***\n\nh : alice : command not allowed\n",
        True,
        crlf(
            b"To: root\nFrom: alice\nAuto-Submitted: auto-generated\n"
            b"Subject: *** SECURITY information for h ***\n\nh : alice : command not allowed\n"
        ),
        ["root"],
    ),
    (
        "folded To",
        b"To: alice@example.org,\n\tbob@example.org,\n carol\nSubject: x\n\nb\n",
        True,
        crlf(b"To: alice@example.org,\n\tbob@example.org,\n carol\nSubject: x\n\nb\n"),
        ["alice@example.org", "bob@example.org", "carol"],
    ),
    (
        "mutt only-Bcc group",
        b"To: undisclosed-recipients:;\nBcc: hidden@example.org\n\nb\n",
        True,
        crlf(b"To: undisclosed-recipients:;\n\nb\n"),
        ["hidden@example.org"],
    ),
    (
        "named group",
        b"To: team: a@x.example, b@x.example;\nCc: c@x.example\n\nb\n",
        True,
        crlf(b"To: team: a@x.example, b@x.example;\nCc: c@x.example\n\nb\n"),
        ["a@x.example", "b@x.example", "c@x.example"],
    ),
    (
        "Resent-* wins over To/Cc/Bcc",
        b"Resent-From: fwd@example.org\nResent-To: new@example.org\n"
        b"Resent-Bcc: hidden@example.org\nTo: original@example.org\nBcc: old-hidden@example.org\n\nb\n",
        True,
        crlf(b"Resent-From: fwd@example.org\nResent-To: new@example.org\nTo: original@example.org\n\nb\n"),
        ["new@example.org", "hidden@example.org"],
    ),
    (
        "duplicates removed, order kept",
        b"To: a@x, B@x\nCc: b@x, A@X, c@x\n\nb\n",
        True,
        crlf(b"To: a@x, B@x\nCc: b@x, A@X, c@x\n\nb\n"),
        ["a@x", "B@x", "c@x"],
    ),
    (
        "Return-Path and Content-Length dropped",
        b"Return-Path: <forged@x>\nSubject: s\nContent-Length: 3\ncontent-length: 9\n\nbody\n",
        False,
        crlf(b"Subject: s\n\nbody\n"),
        [],
    ),
    (
        "Bcc dropped without -t, any case",
        b"BCC: a@x\nTo: b@x\nbcc : c@x\n\nb\n",
        False,
        crlf(b"To: b@x\n\nb\n"),
        [],
    ),
    (
        "mbox From line dropped",
        b"From alice Sat Nov 28 14:18:51 2026\nSubject: s\n\nFrom here on\n",
        False,
        crlf(b"Subject: s\n\nFrom here on\n"),
        [],
    ),
    (
        ">From line dropped",
        b">From alice Sat Nov 28\nSubject: s\n\nb\n",
        False,
        crlf(b"Subject: s\n\nb\n"),
        [],
    ),
    (
        "missing empty line inserted",
        b"Subject: disk report\nTo: root\nall disks fine\nTo: not-a-header\n",
        True,
        crlf(b"Subject: disk report\nTo: root\n\nall disks fine\nTo: not-a-header\n"),
        ["root"],
    ),
    ("header only, no body", b"Subject: ping\nTo: root", True, crlf(b"Subject: ping\nTo: root\n"), ["root"]),
    (
        "first line indented: all body",
        b"  To: root\n  Subject: x\n\nb\n",
        True,
        crlf(b"  To: root\n  Subject: x\n\nb\n"),
        [],
    ),
    ("first line empty: all body", b"\nTo: root\n", True, crlf(b"\nTo: root\n"), []),
    (
        "blank before colon is a field (obsolete syntax)",
        b"Subject : s\nTo : root\n\nb\n",
        True,
        crlf(b"Subject : s\nTo : root\n\nb\n"),
        ["root"],
    ),
    (
        "ISO-8859-1 body and header",
        b"Subject: Gr\xfc\xdfe\nTo: j\xfcrgen@x\n\nS\xe9bastien \xa4\n",
        True,
        crlf(b"Subject: Gr\xfc\xdfe\nTo: j\xfcrgen@x\n\nS\xe9bastien \xa4\n"),
        None,
    ),
    (
        "lone CR, mixed line ends",
        b"Subject: s\rTo: a@x\r\n\nl1\rl2\r\r\nl3\n\r",
        True,
        b"Subject: s\r\nTo: a@x\r\n\r\nl1\r\nl2\r\n\r\nl3\r\n\r\n",
        ["a@x"],
    ),
    ("lone dots kept", b"Subject: s\n\n.\n..\n.x\n", False, crlf(b"Subject: s\n\n.\n..\n.x\n"), []),
    (
        "NUL bytes and a long line",
        b"X: \x00\n\n\x00\x00\n" + LONG_LINE,
        False,
        crlf(b"X: \x00\n\n\x00\x00\n" + LONG_LINE + b"\n"),
        [],
    ),
    ("empty input", b"", True, b"", []),
    ("only an mbox From line", b"From alice Sat Nov 28 14:18:51 2026\n", True, b"", []),
    ("a lone newline", b"\n", True, b"\r\n", []),
]


@pytest.mark.parametrize(
    ("caller", "data", "extract", "stored", "recipients"), SUBMISSIONS, ids=[row[0] for row in SUBMISSIONS]
)
def test_prepare_submission(
    caller: str, data: bytes, extract: bool, stored: bytes, recipients: list[str] | None
) -> None:
    if recipients is None:  # not UTF-8: the header recipient must not pass as an address
        with pytest.raises(MessageError, match="not valid UTF-8"):
            prepare_submission(data, extract_recipients=extract)
        assert prepare_submission(data, extract_recipients=False) == (stored, [])
        return
    assert prepare_submission(data, extract_recipients=extract) == (stored, recipients)


def test_recipients_are_only_read_with_extract() -> None:
    message, recipients = prepare_submission(b"To: John Smith\nBcc: a@x\n\nb\n", extract_recipients=False)
    assert recipients == []
    assert message == crlf(b"To: John Smith\n\nb\n")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            b"To: John Smith\n\nb\n",
            'cannot read the recipients in "To: John Smith": no address in "John Smith"',
        ),
        (b"To: a@x\nCc: <broken@x\n\nb\n", 'cannot read the recipients in "Cc: <broken@x": unterminated'),
        (b"Bcc: x@y,\n John Smith\n\nb\n", 'in "Bcc: x@y, John Smith": no address'),
        (b"To: <>\n\nb\n", "null address"),
        (b"Resent-To: a b\nTo: ok@x\n\nb\n", '"Resent-To: a b"'),
    ],
)
def test_unreadable_recipient_fields_name_the_field(data: bytes, message: str) -> None:
    with pytest.raises(MessageError) as caught:
        prepare_submission(data, extract_recipients=True)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_with_a_list_for_them_the_readable_members_of_an_unreadable_field_are_kept() -> None:
    unreadable: list[str] = []
    data = b'To: "Smith, J" <j@x>, John Smith, (a, comment) k@x\nCc: a@x, <b@x\n\nbody\n'
    _, recipients = prepare_submission(data, extract_recipients=True, unreadable=unreadable)
    assert recipients == ["j@x", "k@x", "a@x"]  # commas in quotes and comments do not split a member
    assert len(unreadable) == 2
    assert unreadable[0].startswith('cannot read "John Smith" in "To: ') and "no address" in unreadable[0]
    assert unreadable[1].startswith('cannot read "<b@x" in "Cc: a@x, <b@x"')


def test_broken_fields_outside_the_recipient_set_are_ignored() -> None:
    # With Resent- fields present, -t reads only them: a broken To does not matter.
    _, recipients = prepare_submission(b"Resent-To: r@x\nTo: John Smith\n\nb\n", extract_recipients=True)
    assert recipients == ["r@x"]


def test_normalise_line_endings() -> None:
    assert normalise_line_endings(b"") == b""
    assert normalise_line_endings(b"a") == b"a\r\n"
    assert normalise_line_endings(b"a\rb\nc\r\nd\r\r\n") == b"a\r\nb\r\nc\r\nd\r\n\r\n"


# --- complete() -----------------------------------------------------------------------------------------

QUEUED_AT = 1795871931.25  # Sat, 28 Nov 2026 13:18:51 UTC
BERLIN = "CET-1CEST,M3.5.0,M10.5.0/3"  # a POSIX TZ string: needs no tzdata on the test machine


@pytest.fixture
def berlin_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is Europe/Berlin (UTC+1 in November) for the test."""
    monkeypatch.setenv("TZ", BERLIN)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def completed(message: bytes, **changes: str) -> bytes:
    arguments = {
        "message_id": "20261128131851.abc123",
        "sender": "alice",
        "submitted_by": "alice",
        "full_name": "",
        "domain": "example.org",
        "hostname": "mx.example.org",
    }
    arguments.update(changes)
    return complete(message, queued_at=QUEUED_AT, **arguments)


GENERATED = b"Date: Sat, 28 Nov 2026 14:18:51 +0100\r\nMessage-ID: <20261128131851.abc123@mx.example.org>\r\n"


def test_complete_debian_cron_message(berlin_time: None) -> None:
    stored, _ = prepare_submission(DEBIAN_CRON, extract_recipients=False)
    header, body = stored.split(b"\r\n\r\n", 1)
    header = header.replace(b"From: root (Cron Daemon)", b"From: root@example.org (Cron Daemon)")
    header = header.replace(b"To: root\r\n", b"To: root@example.org\r\n")
    assert completed(stored) == header + b"\r\n" + GENERATED + b"\r\n" + body


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"From: root (Cron Daemon)", b"From: root@example.org (Cron Daemon)"),
        (b'From: "(Cron Daemon)" <alice>', b'From: "(Cron Daemon)" <alice@example.org>'),
        (b"From: Anacron <root>", b"From: Anacron <root@example.org>"),
        (b"From: Logwatch", b"From: Logwatch@example.org"),
        (b"From: mdadm monitoring <root@shorthost>", b"From: mdadm monitoring <root@shorthost>"),
        (b"From: J\xfcrgen (\xe4) <juergen>", b"From: J\xfcrgen (\xe4) <juergen@example.org>"),
        (b"To: undisclosed-recipients:;", b"To: undisclosed-recipients:;"),
        (b"To: team: a, b@x;", b"To: team: a@example.org, b@x;"),
        (b"To: alice,\r\n\tbob ,  carol@x", b"To: alice@example.org,\r\n\tbob@example.org ,  carol@x"),
        (b"Cc:root", b"Cc:root@example.org"),
        (b"Reply-To: <>", b"Reply-To: <>"),
        (b"Sender: alice", b"Sender: alice@example.org"),
        (b"Resent-From: alice", b"Resent-From: alice@example.org"),
        (b"Resent-To: bob", b"Resent-To: bob@example.org"),
        (b"Resent-Cc: bob", b"Resent-Cc: bob@example.org"),
        (b"Resent-Sender: bob", b"Resent-Sender: bob@example.org"),
        (b'To: "a@b" (quoted)', b'To: "a@b"@example.org (quoted)'),
        (b"To: John Smith", b"To: John Smith"),  # unparseable: left alone, delivery must not fail
        (b"To: <root", b"To: <root"),
        (b"Subject: root", b"Subject: root"),
        (b"X-Cron-Env: <USER=root>", b"X-Cron-Env: <USER=root>"),
        (b"In-Reply-To: <root>", b"In-Reply-To: <root>"),
    ],
)
def test_complete_qualifies_bare_addresses_in_place(field: bytes, expected: bytes, berlin_time: None) -> None:
    has_from = field.lower().startswith(b"from:")
    result = completed(field + b"\r\n\r\nbody\r\n")
    header = expected + b"\r\n" + GENERATED + (b"" if has_from else b"From: alice@example.org\r\n")
    assert result == header + b"\r\nbody\r\n"


def test_complete_keeps_existing_date_message_id_and_from() -> None:
    stored = crlf(b"Date: Fri, 1 Jan 2021 00:00:00 +0000\nmessage-id: <x@y>\nFROM: a@b\n\nb\n")
    assert completed(stored) == stored


def test_complete_message_without_header_block(berlin_time: None) -> None:
    stored, _ = prepare_submission(b"ZFS has finished a scrub:\n\n eid: 5\n", extract_recipients=False)
    assert completed(stored) == GENERATED + b"From: alice@example.org\r\n\r\n" + stored


def test_complete_empty_message(berlin_time: None) -> None:
    assert completed(b"") == GENERATED + b"From: alice@example.org\r\n\r\n"


def test_complete_header_without_body(berlin_time: None) -> None:
    stored, _ = prepare_submission(b"Subject: ping", extract_recipients=False)
    assert completed(stored) == b"Subject: ping\r\n" + GENERATED + b"From: alice@example.org\r\n"


def test_complete_is_deterministic() -> None:
    stored = crlf(b"Subject: s\n\nb\n")
    assert completed(stored) == completed(stored)
    assert get_header(completed(stored), "Message-ID") == "<20261128131851.abc123@mx.example.org>"


def test_date_uses_local_zone_and_english_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    saved = locale.setlocale(locale.LC_TIME)
    for name in ("de_DE.UTF-8", "fr_FR.UTF-8", "C.UTF-8"):  # a non-English locale when the machine has one
        try:
            locale.setlocale(locale.LC_TIME, name)
            break
        except locale.Error:
            continue
    try:
        assert get_header(completed(b""), "Date") == "Sat, 28 Nov 2026 13:18:51 +0000"
    finally:
        locale.setlocale(locale.LC_TIME, saved)
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("sender", "submitted_by", "full_name", "expected"),
    [
        ("alice", "alice", "", "alice@example.org"),
        ("bounce@lists.example", "alice", "", "bounce@lists.example"),
        ("", "www-data", "", "www-data@example.org"),  # null sender: the submitting user
        ("root", "root", "CronDaemon", "CronDaemon <root@example.org>"),
        ("root", "root", "Cron Daemon", "Cron Daemon <root@example.org>"),
        ("alice", "alice", "Doe, Alice (ops)", '"Doe, Alice (ops)" <alice@example.org>'),
        ("alice", "alice", 'Al "Bo" \\ Cy.', '"Al \\"Bo\\" \\\\ Cy." <alice@example.org>'),
        ("alice", "alice", "Eve\r\nBcc: victim@x", '"Eve  Bcc: victim@x" <alice@example.org>'),
    ],
)
def test_generated_from(sender: str, submitted_by: str, full_name: str, expected: str) -> None:
    result = completed(
        b"Subject: s\r\n\r\nb\r\n", sender=sender, submitted_by=submitted_by, full_name=full_name
    )
    assert get_header(result, "From") == expected
    assert [name for name, _ in header_fields(result)] == ["Subject", "Date", "Message-ID", "From"]


@pytest.mark.parametrize("full_name", ["Jürgen Müller", "Jürgen Müller, Raum 3", "Zoë " * 20, "J\udcfcrgen"])
def test_generated_from_encodes_non_ascii_names(full_name: str) -> None:
    result = completed(b"", full_name=full_name)
    raw_from = dict(header_fields(result))["From"]
    assert raw_from.isascii()
    assert raw_from.endswith(b" <alice@example.org>\r\n")
    decoded = str(make_header(decode_header(get_header(result, "From") or "")))
    expected_name = full_name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()
    assert decoded == f"{expected_name} <alice@example.org>"


@pytest.mark.parametrize(
    "changes",
    [
        {"full_name": "Al\ud800ice"},  # an unpaired surrogate: no byte stands behind it
        {"sender": "al\udfffice"},
        {"submitted_by": "\ud83d", "sender": ""},
        {"domain": "ex\ud800ample.org"},
        {"message_id": "id\udbff"},
    ],
)
def test_complete_writes_a_character_no_byte_stands_for_as_a_replacement(changes: dict[str, str]) -> None:
    # A library caller may pass any str; argv and the queue carry bytes as surrogateescape (\udc80-\udcff).
    result = completed(b"To: bob\r\nSubject: s\r\n\r\nbody\r\n", **changes)
    assert result.endswith(b"\r\n\r\nbody\r\n")
    assert "\ufffd" in result.decode("utf-8", "surrogateescape") or b"=?utf-8?" in result
    # A byte carried as surrogateescape is still written as that byte.
    assert b"From: al\xfcice@example.org\r\n" in completed(b"Subject: s\r\n\r\n", sender="al\udcfcice")


# --- header helpers -------------------------------------------------------------------------------------


def test_header_fields_and_get_header() -> None:
    message = crlf(
        b"Subject: Cron <root@h> caf\xc3\xa9\n  continued\nTo: a\nsubject: second\n\nSubject: body\n"
    )
    assert header_fields(message) == [
        ("Subject", b"Subject: Cron <root@h> caf\xc3\xa9\r\n  continued\r\n"),
        ("To", b"To: a\r\n"),
        ("subject", b"subject: second\r\n"),
    ]
    assert get_header(message, "SUBJECT") == "Cron <root@h> café  continued"
    assert get_header(message, "Cc") is None
    assert get_header(b"Subject: \xff\r\n", "Subject") == "\udcff"
    assert header_fields(b"body only\r\n") == []
    assert header_fields(b"") == []


# --- property tests -------------------------------------------------------------------------------------

_line_ends = st.sampled_from([b"\n", b"\r\n", b"\r"])
_header_lines = st.sampled_from(
    [
        b"To: a@x",
        b"Cc: b@x, c",
        b"Bcc: hidden@x",
        b"BCC : h2@x",
        b"Resent-Bcc: h3@x",
        b"Subject: s\xe4",
        b" folded",
        b"\tfolded",
        b"X-Empty:",
        b"From: root (Cron Daemon)",
        b"Return-Path: <r@x>",
    ]
)
_body_lines = st.one_of(
    st.binary(max_size=30).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"", b"Bcc: body@x", b"From x", b"To: b"]),
)


@st.composite
def _messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(whole message, its body): header fields, an empty line, body lines, each with a random line end."""
    lines = draw(st.lists(_header_lines, max_size=6))
    if lines and lines[0][:1] in (b" ", b"\t"):
        lines.insert(0, b"Subject: first")  # a first line that is no field would make everything body
    header = b"".join(line + draw(_line_ends) for line in lines)
    body = b"".join(line + draw(_line_ends) for line in draw(st.lists(_body_lines, max_size=6)))
    if draw(st.booleans()):
        body = body.rstrip(b"\r\n")  # no final newline
    # CRLF as the empty line: after a lone CR, a bare LF would merge with it into one line end.
    return header + b"\r\n" + body, body


def _only_crlf(data: bytes) -> bool:
    return b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")


def _stored_bcc(message: bytes) -> list[str]:
    return [name for name, _ in header_fields(message) if name.lower() in ("bcc", "resent-bcc")]


@given(_messages())
def test_prepare_keeps_the_body_and_drops_bcc(generated: tuple[bytes, bytes]) -> None:
    data, body = generated
    stored, _ = prepare_submission(data, extract_recipients=False)
    assert stored.endswith(normalise_line_endings(body))
    assert _only_crlf(stored)
    assert _stored_bcc(stored) == []
    assert b"hidden@x" not in stored and b"h2@x" not in stored and b"h3@x" not in stored


@given(st.binary(), st.booleans())
def test_prepare_on_arbitrary_bytes(data: bytes, extract: bool) -> None:
    try:
        stored, _ = prepare_submission(data, extract_recipients=extract)
    except MessageError:
        assert extract
        return
    assert _only_crlf(stored)
    assert _stored_bcc(stored) == []
    if not data.startswith((b"From ", b">From ")):  # an mbox From line alone leaves nothing
        if data and not stored:  # nothing is lost, except fields that are always dropped
            fields = header_fields(normalise_line_endings(data))
            assert fields and all(
                name.lower() in {"bcc", "resent-bcc", "return-path", "content-length"} for name, _ in fields
            )
        if not data:
            assert stored == b""


# The bytes where streaming can go wrong: line ends split between blocks, folds, mbox lines, Bcc.
_stream_pieces = st.sampled_from(
    [
        b"To: a@b",
        b"Bcc: h@x",
        b"Subject: x",
        b" cont",
        b"From x",
        b"text",
        b"\r",
        b"\n",
        b"\r\n",
        b":",
        b"\xff",
    ]
)


@given(st.lists(_stream_pieces, max_size=30), st.integers(0, 200), st.lists(st.integers(1, 20), max_size=30))
@example([b"To: a", b"\r\n", b"\r\n", b"x\r", b"\nz"], 12, [2])  # a block ends between CR and LF
def test_a_message_streamed_in_blocks_is_stored_as_the_whole_would_be(
    pieces: list[bytes], read: int, blocks: list[int]
) -> None:
    # sendmail (pymta.submission.submit.read_message) looks for the header block in what it has read, then
    # prepares those whole lines and streams the rest through LineEndings, in blocks of any size.
    data = b"".join(pieces)
    whole = prepare_submission(data, extract_recipients=True, unreadable=[])
    cut = header_read(data[:read])
    if not cut:
        return
    head, recipients = prepare_submission(data[:cut], extract_recipients=True, unreadable=[])
    endings = LineEndings()
    rest, streamed = data[cut:], [head]
    for size in blocks:
        block, rest = rest[:size], rest[size:]
        streamed.append(endings.feed(block))
    streamed += [endings.feed(rest), endings.end()]
    assert (b"".join(streamed), recipients) == whole


def test_the_header_block_is_read_once_the_line_that_ends_it_has_come() -> None:
    assert header_read(b"To: a\nSubject: b\n") == 0  # the next line may continue the field
    assert header_read(b"To: a\nSubject: b\n cont") == 0
    assert header_read(b"To: a\n\nbody") == len(b"To: a\n\n")
    assert header_read(b"To: a\r") == 0 and header_read(b"To: a\r\rb") == len(b"To: a\r\r")  # CR, LF?
    assert header_read(b"From me\n") == 0 and header_read(b"bare text\nmore") == len(b"bare text\n")


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"To: a", b"Subject: x", b" cont", b"", b"text", b"X:\xff", b"\x00"]), _line_ends
        ),
        max_size=8,
    )
)
def test_prepare_changes_only_line_ends_and_a_missing_separator(lines: list[tuple[bytes, bytes]]) -> None:
    data = b"".join(line + end for line, end in lines)
    stored, _ = prepare_submission(data, extract_recipients=False)
    normalised = normalise_line_endings(data)
    if stored == normalised:
        return
    # The only other change allowed: one empty line inserted where a header block ends without one.
    split = next(
        index for index, (ours, theirs) in enumerate(zip(stored, normalised, strict=False)) if ours != theirs
    )
    assert stored[split : split + 2] == b"\r\n"
    assert stored[:split] + stored[split + 2 :] == normalised
    assert header_fields(stored[:split])


@given(_messages(), st.text(max_size=20), st.sampled_from(["", "root", "a@b"]))
def test_complete_keeps_the_body(generated: tuple[bytes, bytes], full_name: str, sender: str) -> None:
    stored, _ = prepare_submission(generated[0], extract_recipients=False)
    header_length = sum(len(field) for _, field in header_fields(stored))
    body = stored[header_length:]
    result = completed(stored, full_name=full_name, sender=sender)
    assert result.endswith(body)
    assert _only_crlf(result)
    names = [name.lower() for name, _ in header_fields(result)]
    assert {"date", "message-id", "from"} <= set(names)


def test_import_pulls_in_nothing_heavy() -> None:
    """sendmail runs for every cron job: these modules must not import re, typing, email, ... at start-up."""
    # -S: without site, so what the environment's .pth files import cannot hide or fake a heavy import.
    code = "import pymta.mail.message, pymta.mail.address, sys; print(' '.join(sorted(sys.modules)))"
    output = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = set(output.split())
    assert {"pymta.mail.message", "pymta.mail.address"} <= loaded
    heavy = {"re", "typing", "dataclasses", "enum", "email", "json", "smtplib", "ssl", "socket"}
    assert loaded & heavy == set()
    assert not any(name.startswith("email.") for name in loaded)


# --- lines over 998 octets, on their way to a smarthost ---

_line = st.binary(min_size=0, max_size=3000).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _lines_of(message: bytes) -> list[bytes]:
    return message.split(b"\r\n")


def test_a_message_whose_lines_fit_is_returned_as_it_is() -> None:
    message = b"Subject: s\r\n\r\n" + b"x" * 998 + b"\r\n"
    assert fit_line_length(message) is message


@given(st.lists(_line, min_size=1, max_size=4), st.sampled_from(["", "text/plain; charset=latin-1"]))
def test_a_long_text_body_goes_quoted_printable_and_decodes_to_every_byte(
    lines: list[bytes], content_type: str
) -> None:
    import email
    import email.policy

    body = b"\r\n".join(lines) + b"\r\n" + b"y" * 999 + b"\r\n"
    header = b"Subject: cron\r\n" + (f"Content-Type: {content_type}\r\n".encode() if content_type else b"")
    fitted = fit_line_length(header + b"\r\n" + body)
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    parsed = email.message_from_bytes(fitted, policy=email.policy.compat32)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable" and parsed["MIME-Version"] == "1.0"
    assert parsed.get_payload(decode=True) == body
    assert parsed["Subject"] == "cron" and fitted.isascii()


def test_a_long_header_is_folded_at_blanks_and_unfolds_to_what_it_was() -> None:
    subject = " ".join(f"word{n}" for n in range(400))
    fitted = fit_line_length(f"Subject: {subject}\r\nTo: a@example.org\r\n\r\nshort\r\n".encode())
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    assert get_header(fitted, "subject") == subject
    assert fitted.endswith(b"\r\nTo: a@example.org\r\n\r\nshort\r\n")  # the body needed nothing


def test_a_utf8_body_without_content_type_is_labelled_utf8_when_encoded() -> None:
    fitted = fit_line_length(b"Subject: s\r\n\r\n" + ("ä" * 600 + "\r\n").encode())
    assert get_header(fitted, "content-type") == "text/plain; charset=utf-8"


@given(st.lists(_line, min_size=1, max_size=4))
def test_a_text_part_of_a_multipart_goes_quoted_printable_and_the_rest_stays_byte_for_byte(
    lines: list[bytes],
) -> None:
    import email
    import email.policy

    text = b"\r\n".join(lines) + b"\r\n" + b"z" * 2500 + b"\r\n"
    attachment = b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
    message = (
        b'Content-Type: multipart/mixed; boundary="=_b"\r\n\r\npreamble\r\n--=_b\r\n'
        + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + text
        + b"--=_b\r\n"
        + attachment
        + b"--=_b--\r\nepilogue\r\n"
    )
    fitted = fit_line_length(message)
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    parsed = email.message_from_bytes(fitted, policy=email.policy.compat32)
    first, second = parsed.get_payload()
    assert first["Content-Transfer-Encoding"] == "quoted-printable" and first["MIME-Version"] is None
    # Every byte as the sender wrote it (the CRLF before a delimiter is the delimiter's, RFC 2046 5.1.1).
    assert first.get_payload(decode=True) == text[:-2]
    assert fitted.endswith(b"--=_b\r\n" + attachment + b"--=_b--\r\nepilogue\r\n")  # untouched
    assert fitted.startswith(b'Content-Type: multipart/mixed; boundary="=_b"\r\n\r\npreamble\r\n--=_b\r\n')


@given(st.lists(_line, min_size=1, max_size=4))
def test_a_body_that_cannot_be_reencoded_has_its_long_lines_broken_with_a_space(lines: list[bytes]) -> None:
    body = b"\r\n".join(lines) + b"\r\n" + b"z" * 2500 + b"\r\n"
    message = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body
    fitted = fit_line_length(message)
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    # Nothing but the inserted line breaks: taking out each CRLF SP gives the message back.
    assert fitted.replace(b"\r\n ", b"") == message.replace(b"\r\n ", b"")


@given(st.binary(min_size=1200, max_size=4000))
def test_a_quoted_printable_body_gets_soft_breaks_and_decodes_as_before(data: bytes) -> None:
    import binascii

    encoded = binascii.b2a_qp(data, quotetabs=False, istext=False, header=False)
    line = encoded.replace(b"=\r\n", b"").replace(b"=\n", b"")  # one long, valid quoted-printable line
    assert b"\r" not in line and b"\n" not in line  # binary mode encodes line breaks as =0D, =0A
    message = (
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + line + b"\r\n"
    )
    fitted = fit_line_length(message)
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    body = fitted.split(b"\r\n\r\n", 1)[1]
    assert binascii.a2b_qp(body) == binascii.a2b_qp(message.split(b"\r\n\r\n", 1)[1])


def test_a_broken_line_never_splits_a_utf8_character() -> None:
    message = (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "ä".encode() * 1500  # 2-byte characters: byte 997 is the middle of one
        + b"\r\n"
    )
    fitted = fit_line_length(message)
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    for line in _lines_of(fitted):
        line.decode("utf-8")  # raises if a character was cut in two


def test_parts_nested_deeper_than_the_limit_are_fitted_as_opaque_text() -> None:
    import email
    import email.policy

    message = nested_multipart(400)
    fitted = fit_line_length(message)  # RecursionError before: every flush stopped at this message
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    # Nothing but the inserted line breaks and their spaces; no part was lost or reordered.
    assert fitted.replace(b"\r\n ", b"") == message.replace(b"\r\n ", b"")
    # The levels within the limit are still parsed: a text part there is re-encoded, not cut.
    shallow = fit_line_length(nested_multipart(3))
    inner = email.message_from_bytes(shallow, policy=email.policy.compat32)
    for _ in range(3):
        [inner] = inner.get_payload()
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert inner.get_payload(decode=True) == b"x" * 1200


def test_big_parts_are_parsed_fewer_levels_deep(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each level costs a few passes over what it holds: a 30 MB message nested 50 deep took 40 s at
    # every delivery attempt. A part is parsed only while its depth times its size stays under a bound.
    from pymta.mail import linefit

    monkeypatch.setattr(linefit, "MAX_PART_WORK", 100_000)
    fitted = fit_line_length(nested_multipart(10, 20_000))  # within MAX_PART_DEPTH, over the bound
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE
    assert b"quoted-printable" not in fitted  # the inner text part was reached only as opaque text
    assert b"quoted-printable" in fit_line_length(nested_multipart(3, 20_000))


def test_a_body_without_a_final_line_end_gets_no_bare_lf() -> None:
    fitted = fit_line_length(b"Subject: s\r\n\r\n" + b"x" * 2000)
    assert b"\n" not in fitted.replace(b"\r\n", b"")
    assert max(len(line) for line in _lines_of(fitted)) <= MAX_LINE


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
@example(1.9999995231628418)  # rounds up to the next second at the microsecond, as datetime does
def test_format_date_writes_what_email_utils_writes(moment: float) -> None:
    """One date writer: the import-free format_date is what email.utils.formatdate (which the DSN used)
    writes, so either can stand for the other."""
    from email.utils import formatdate

    assert format_date(moment) == formatdate(moment, localtime=True)


@given(
    st.lists(st.sampled_from([b"x" * 997, b"y" * 998, b"z" * 999, b"\r", b"\n", b"\r\n", b"a"]), max_size=40),
    st.integers(min_value=1, max_value=3000),
)
def test_a_long_line_is_found_across_the_slices_of_a_large_text(pieces: list[bytes], scan: int) -> None:
    """Sliced (`LINE_SCAN`, small here), the look for a line over 998 octets sees what one split sees."""
    import pymta.mail.linefit as linefit

    data = b"".join(pieces)
    whole = max(map(len, data.split(b"\r\n"))) > 998
    saved, linefit.LINE_SCAN = linefit.LINE_SCAN, scan
    try:
        assert linefit._long_lines(data) == whole
    finally:
        linefit.LINE_SCAN = saved
