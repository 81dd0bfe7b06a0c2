"""Address parsing: the shapes real sendmail callers write (reference/sendmail-callers.md), errors, and
property tests against the standard library's getaddresses."""

from __future__ import annotations

import string
from email.utils import getaddresses

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pymta.errors import AddressError
from pymta.mail.address import (
    Mailbox,
    excerpt,
    is_local_part_only,
    parse_envelope_address,
    parse_list,
    qualify,
    recipients_from_args,
)

# (caller or shape, header value or argument, expected (addr, display) pairs)
LIST_EXAMPLES = [
    ("Debian cron MAILTO comma list", "a@x.example,b@y.example", [("a@x.example", ""), ("b@y.example", "")]),
    ("crontab owner", "root", [("root", "")]),
    ("Debian cron From", "root (Cron Daemon)", [("root", "")]),
    ("cronie From", '"(Cron Daemon)" <alice>', [("alice", '"(Cron Daemon)"')]),
    ("anacron From", "Anacron <root>", [("root", "Anacron")]),
    ("logwatch From", "Logwatch", [("Logwatch", "")]),
    ("mdadm From", "mdadm monitoring <root@shorthost>", [("root@shorthost", "mdadm monitoring")]),
    ("systemd-cron From", "root@localhost (systemd-cron)", [("root@localhost", "")]),
    ("fail2ban From", "Fail2Ban <root@host.example.org>", [("root@host.example.org", "Fail2Ban")]),
    ("ArchWiki recipe From", "systemd <root@myhost>", [("root@myhost", "systemd")]),
    ("bsd-mailx -r", "Robot <robot@example.org>", [("robot@example.org", "Robot")]),
    ("bsd-mailx To", "a@x.example, root", [("a@x.example", ""), ("root", "")]),
    ("mutt only-Bcc To", "undisclosed-recipients:;", []),
    ("group", "team: a@x.example, b@y.example;", [("a@x.example", ""), ("b@y.example", "")]),
    ("group between members", "c@z, team: a@x;, d@w", [("c@z", ""), ("a@x", ""), ("d@w", "")]),
    ("group without final ;", "undisclosed-recipients:", []),
    (
        "RFC 2047 display",
        "=?UTF-8?B?SsO8cmdlbg==?= <j@x.example>",
        [("j@x.example", "=?UTF-8?B?SsO8cmdlbg==?=")],
    ),
    ("quoted display with comma", '"Doe, John" <j@x>, k@y', [("j@x", '"Doe, John"'), ("k@y", "")]),
    ("quoted display with escape", r'"a \"b\" c" <j@x>', [("j@x", r'"a \"b\" c"')]),
    ("quoted local part", '"john doe"@example.org', [('"john doe"@example.org', "")]),
    ("domain literal", "a@[192.0.2.1]", [("a@[192.0.2.1]", "")]),
    ("source route", "<@a.example,@b.example:x@y.example>", [("x@y.example", "")]),
    ("empty members", "a@x,,b@y,", [("a@x", ""), ("b@y", "")]),
    ("Outlook semicolons", "a@x; b@y", [("a@x", ""), ("b@y", "")]),
    ("only blanks", "  \t ", []),
    ("null address", "<>", [("", "")]),
    (
        "nested comment with escape",
        r"John (nested (c \) x)) Smith <j@x>",
        [("j@x", r"John (nested (c \) x)) Smith")],
    ),
    ("comment inside angle", "<(c)j@x(d)>", [("j@x", "")]),
    (
        "folded list",
        "alice@example.org,\r\n\tbob@example.org,\r\n carol",
        [("alice@example.org", ""), ("bob@example.org", ""), ("carol", "")],
    ),
    ("plus and dots", "user.name+tag@sub.example.org", [("user.name+tag@sub.example.org", "")]),
    ("not UTF-8 (surrogateescape)", "J\udcfcrgen <j\udcfc@x>", [("j\udcfc@x", "J\udcfcrgen")]),
    ("UTF-8 address", "jörg@bücher.example", [("jörg@bücher.example", "")]),
    ("obsolete spaces around dots", "john . doe @ example . org", [("john.doe@example.org", "")]),
]


@pytest.mark.parametrize(("shape", "text", "expected"), LIST_EXAMPLES, ids=[row[0] for row in LIST_EXAMPLES])
def test_parse_list_examples(shape: str, text: str, expected: list[tuple[str, str]]) -> None:
    assert [(mailbox.addr, mailbox.display) for mailbox in parse_list(text)] == expected


@pytest.mark.parametrize(
    "text",
    [row[1] for row in LIST_EXAMPLES if "spaces around" not in row[0] and "comment inside" not in row[0]],
)
def test_spans_point_at_the_addr_spec(text: str) -> None:
    for mailbox in parse_list(text):
        assert text[mailbox.start : mailbox.end] == mailbox.addr


def test_span_allows_qualifying_in_place() -> None:
    text = "root (Cron Daemon)"
    (mailbox,) = parse_list(text)
    assert text[: mailbox.end] + "@example.org" + text[mailbox.end :] == "root@example.org (Cron Daemon)"


def test_null_address_span_sits_between_the_brackets() -> None:
    assert parse_list("Name <>") == [Mailbox("", "Name", 6, 6)]


def test_mailbox_equality_and_repr() -> None:
    assert Mailbox("a@x", "", 0, 3) == Mailbox("a@x", "", 0, 3)
    assert Mailbox("a@x", "", 0, 3) != Mailbox("a@x", "A", 0, 3)
    assert Mailbox("a@x", "", 0, 3) != "a@x"
    assert "addr='a@x'" in repr(Mailbox("a@x", "", 0, 3))
    assert len({Mailbox("a@x", "", 0, 3), Mailbox("a@x", "", 0, 3)}) == 1


ERROR_EXAMPLES = [
    ("John Smith", 'no address in "John Smith"'),
    ('"unterminated', "unterminated quoted string"),
    ("(unterminated comment", "unterminated comment"),
    ("a@[192.0.2.1", "unterminated domain literal"),
    ("Name <a@x", "unterminated '<'"),
    ("a@x\r\nBcc: evil@y", "line break that is not folding whitespace"),
    ("a@x\nb@y", "line break"),
    ("a@x\rb", "line break"),
    ('"a\\\r\n b"@x', "line break"),
    ("a\x00b@x", "control character in the address"),
    ("a\x1bb@x", "control character"),
    ("a@b@c", "more than one '@'"),
    ("a@", "empty domain"),
    ("@x", "empty local part"),
    ("x y@z", "a space inside the local part"),
    ('a@"x"', "a quoted string is no domain"),
    ("[192.0.2.1]", "in the local part"),
    ("a: b: c@x;;", "a group inside a group"),
    ("<a@x> junk", 'unexpected "junk" after an address'),
    ("<a@x, b@y>", "inside <...>"),
    ("<a@x; b@y>", "inside <...>"),
    ("<@route a@x>", "source route without ':'"),
    ("a@x>", "'>' without '<'"),
    ("a)b", "unbalanced ')'"),
    ("a]b", "unbalanced ']'"),
]


@pytest.mark.parametrize(("text", "message"), ERROR_EXAMPLES)
def test_parse_list_errors(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_list(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)


def test_excerpt_is_one_printable_line() -> None:
    assert excerpt("a\r\nb\x00\udcff") == '"a\\r\\nb\\x00\\xff"'
    assert excerpt("x" * 500).endswith('x..."')
    assert len(excerpt("x" * 500)) < 120


ENVELOPE_EXAMPLES = [
    ("", ""),
    ("<>", ""),
    (" <> ", ""),
    ("bounce@example.org", "bounce@example.org"),
    ("Robot <robot@example.org>", "robot@example.org"),
    ("<robot@example.org>", "robot@example.org"),
    ("a@x.example, b@y.example", "a@x.example"),
    ("fail2ban", "fail2ban"),
    ("Name <>", ""),
]


@pytest.mark.parametrize(("text", "expected"), ENVELOPE_EXAMPLES)
def test_parse_envelope_address(text: str, expected: str) -> None:
    assert parse_envelope_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a@x\r\nRCPT TO:<victim@y>", "header injection"),
        ("a@x\n", "header injection"),
        ("a@x\r", "header injection"),
        ("a\tb@x", "control character"),
        ("a\x00@x", "control character"),
        ("John Smith", "no address in"),
        ("undisclosed-recipients:;", "no address in the sender"),
        ("b\udcffd@x", "not valid UTF-8"),
        ("<a@x", "unterminated"),
        ("a" * 70_000 + "@x", "is 70004 octets long as an SMTP path; SMTP carries at most 256"),
        ("é" * 127 + "@x", "is 258 octets long"),  # 127 characters, 254 octets of UTF-8
        ("Name <" + "a" * 253 + "@x>", "is 257 octets long"),
    ],
)
def test_parse_envelope_address_errors(text: str, message: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_envelope_address(text)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["a@x.example,b@y.example"], ["a@x.example", "b@y.example"]),  # Debian cron MAILTO
        (
            ["to@example.org", "root", "cc@example.org", "bcc@example.org"],
            [  # s-nail, mutt after --
                "to@example.org",
                "root",
                "cc@example.org",
                "bcc@example.org",
            ],
        ),
        (["Name <a@x>", "a@x"], ["a@x"]),
        (["root", "Root", "ROOT@x", "root@X"], ["root", "ROOT@x"]),
        (["root@localhost"], ["root@localhost"]),  # fail2ban dest
        ([""], []),
        ([",", "a@x"], ["a@x"]),
        (["team: a@x, b@y;"], ["a@x", "b@y"]),
    ],
)
def test_recipients_from_args(args: list[str], expected: list[str]) -> None:
    assert recipients_from_args(args) == expected


def test_the_longest_path_smtp_carries_is_an_address() -> None:
    longest = "a" * 252 + "@x"  # with its <>: 256 octets
    assert recipients_from_args([longest]) == [longest]
    assert parse_envelope_address(f"Name <{longest}>") == longest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ok@x", "a@x\nb@y"], 'the recipient "a@x\\nb@y" contains a line break'),
        (["a@x\r"], "line break"),
        (["<>"], "the null address <> cannot be a recipient"),
        (["John Smith"], "no address in"),
        (["b\udcffd@x"], "not valid UTF-8"),
        (["a\x00@x"], "control character"),
        (["ok@x", "a" * 253 + "@x"], 'the recipient "aaaa'),
        (["a" * 253 + "@x"], "is 257 octets long as an SMTP path"),
    ],
)
def test_recipients_from_args_errors(args: list[str], message: str) -> None:
    with pytest.raises(AddressError) as caught:
        recipients_from_args(args)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("addr", "domain", "expected"),
    [
        ("root", "example.org", "root@example.org"),
        ("root@localhost", "example.org", "root@localhost"),
        ("", "example.org", ""),
        ('"a@b"', "example.org", '"a@b"@example.org'),
        ('"a\\"@"@x', "example.org", '"a\\"@"@x'),
        ("root", "", "root"),
    ],
)
def test_qualify(addr: str, domain: str, expected: str) -> None:
    assert qualify(addr, domain) == expected


@pytest.mark.parametrize(
    ("addr", "expected"),
    [("root", True), ("root@x", False), ("", False), ('"a@b"', True), ('"a\\"@"', True), ('"a"@x', False)],
)
def test_is_local_part_only(addr: str, expected: bool) -> None:
    assert is_local_part_only(addr) is expected


# --- property tests -------------------------------------------------------------------------------------

_atoms = st.text(alphabet=string.ascii_letters + string.digits + "+-_", min_size=1, max_size=8)
_local_parts = st.lists(_atoms, min_size=1, max_size=3).map(".".join)
_domains = st.one_of(
    st.lists(
        st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=6),
        min_size=1,
        max_size=3,
    ).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda octets: "[" + ".".join(map(str, octets)) + "]"),
)
_addr_specs = st.one_of(
    _local_parts,  # a bare local part, as cron and mailx write
    st.tuples(_local_parts, _domains).map("@".join),
)
_display_names = st.one_of(
    st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), min_size=1, max_size=3).map(
        " ".join
    ),
    st.text(alphabet=string.ascii_letters + " ,.:;<>@()", min_size=1, max_size=12).map(
        lambda name: f'"{name}"'
    ),
)
_comments = st.text(alphabet=string.ascii_letters + " ", max_size=10).map(lambda text: f"({text})")


@st.composite
def _mailboxes(draw: st.DrawFn) -> tuple[str, list[str]]:
    addr = draw(_addr_specs)
    shape = draw(st.sampled_from(["bare", "comment", "angle", "display"]))
    if shape == "bare":
        return addr, [addr]
    if shape == "comment":
        return f"{addr} {draw(_comments)}", [addr]
    if shape == "angle":
        return f"<{addr}>", [addr]
    return f"{draw(_display_names)} <{addr}>", [addr]


@st.composite
def _address_lists(draw: st.DrawFn) -> tuple[str, list[str]]:
    members = []
    expected: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            text, addrs = draw(_mailboxes())
        else:
            inner = draw(st.lists(_mailboxes(), max_size=3))
            name = draw(st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12))
            text = f"{name}: {', '.join(member for member, _ in inner)};"
            addrs = [addr for _, member_addrs in inner for addr in member_addrs]
        members.append(text)
        expected.extend(addrs)
    separator = draw(st.sampled_from([", ", ",", " ,\r\n ", ",\r\n\t"]))
    return separator.join(members), expected


@given(_address_lists())
@example(('"Doe, John" <j@x>, root (Cron Daemon), team: a@b;', ["j@x", "root", "a@b"]))
def test_parse_list_agrees_with_getaddresses(generated: tuple[str, list[str]]) -> None:
    text, expected = generated
    mailboxes = parse_list(text)
    assert [mailbox.addr for mailbox in mailboxes] == expected
    # The generator only builds shapes the standard library reads correctly: it must agree.
    assert [addr for _, addr in getaddresses([text]) if addr] == expected
    for mailbox in mailboxes:
        assert text[mailbox.start : mailbox.end] == mailbox.addr


@given(st.text())
def test_parse_list_raises_only_address_error(text: str) -> None:
    try:
        mailboxes = parse_list(text)
    except AddressError:
        return
    for mailbox in mailboxes:
        assert 0 <= mailbox.start <= mailbox.end <= len(text)


@given(st.text(alphabet='<>@,;:."()[]\\ \t\r\nab\x00\udcff', max_size=40))
def test_parse_list_raises_only_address_error_on_specials(text: str) -> None:
    try:
        mailboxes = parse_list(text)
    except AddressError as error:
        assert "\n" not in str(error)
        return
    for mailbox in mailboxes:
        assert "\r" not in mailbox.addr and "\n" not in mailbox.addr and "\x00" not in mailbox.addr


@given(st.binary().map(lambda raw: raw.decode("utf-8", "surrogateescape")))
def test_envelope_and_args_raise_only_address_error(text: str) -> None:
    for parse in (parse_envelope_address, lambda word: recipients_from_args([word])):
        try:
            result = parse(text)
        except AddressError:
            continue
        assert "\r" not in str(result) and "\n" not in str(result)
