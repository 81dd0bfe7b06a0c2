"""A large message is sent block by block from the spool (`delivery.smtp.data`, `mail.text`): whatever the
blocks, what goes out is what the whole message, encoded at once as before, would have been; and the header
completed from the start of a message is the one completed from all of it."""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailservers import SmtpServer, certificates, smtp_server

from pymta.delivery.maildir import deliver_maildir
from pymta.delivery.mbox import deliver_mbox, from_line, mbox_entry
from pymta.delivery.smtp.data import DataEncoder, encoded
from pymta.delivery.smtp.session import SmtpSession
from pymta.delivery.writing import DeferredError, unix_lines
from pymta.mail.message import complete, complete_head, header_known, normalise_line_endings, rewrite_from
from pymta.mail.text import Text, UnreadableText
from pymta.queue.spool import Spool

__all__ = ["certificates", "smtp_server"]  # fixtures imported for use

# What the session sent before streaming: the whole text dot-stuffed at once, a last line ended, the dot.
_DOT_LINE = re.compile(rb"^\.", re.MULTILINE)


def whole_encoding(message: bytes) -> bytes:
    body = message
    if body.startswith(b".") or b"\n." in body:
        body = _DOT_LINE.sub(b"..", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def in_pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def spooled(data: bytes, head: int) -> Text:
    """`data` as a Text whose first `head` bytes are in memory and the rest read on demand."""
    head = min(head, len(data))
    return Text(data[:head], lambda n, offset: data[offset : offset + n], head, len(data) - head)


# Messages rich in what the encoding cares about: dots, CR, LF, CRLF, at any place, and plain text.
pieces = st.sampled_from(
    [b".", b"\r", b"\n", b"\r\n", b"..", b"\r\n.", b"\n.", b"x", b"line of text", b"\xc3\xa9"]
)
messages = st.lists(pieces, max_size=60).map(b"".join) | st.binary(max_size=300)


@given(messages, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=400)
def test_the_stream_is_the_whole_encoding_of_the_normalised_message(message: bytes, cuts: list[int]) -> None:
    streamed = b"".join(encoded(in_pieces(message, cuts)))
    assert streamed == whole_encoding(normalise_line_endings(message))


@given(messages, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
@settings(max_examples=300)
def test_a_spooled_message_is_sent_exactly_as_before(message: bytes, cuts: list[int]) -> None:
    """What the spool holds (CRLF everywhere) goes out byte for byte as the whole encoding made it."""
    normal = normalise_line_endings(message)
    assert b"".join(encoded(in_pieces(normal, cuts))) == whole_encoding(normal)


def test_a_block_edge_inside_a_crlf_or_before_a_dot_changes_nothing() -> None:
    encoder = DataEncoder()
    out = [encoder.encode(block) for block in (b"a\r", b"\n.b\r", b"\r", b".c\n", b"d\r")]
    assert b"".join(out) + encoder.finish() == b"a\r\n..b\r\n\r\n..c\r\nd\r\n.\r\n"


@given(
    st.lists(st.sampled_from([b"x" * 500, b"y" * 998, b"z", b"\r\n", b"\r", b"\n"]), max_size=12).map(
        b"".join
    ),
    st.integers(min_value=0, max_value=3000),
    st.integers(min_value=1, max_value=2000),
)
@settings(max_examples=300)
def test_long_lines_are_found_across_blocks(message: bytes, head: int, block: int) -> None:
    text = spooled(message, head)
    expected = any(len(line) > 998 for line in message.split(b"\r\n"))
    assert Text.has_long_lines(_blocked(text, block)) == expected


def _blocked(text: Text, size: int) -> Text:
    """`text` read `size` bytes at a time (the read function shortens every read)."""
    read = text.read
    assert read is not None or text.in_memory
    if read is None:
        return text
    return Text(text.head, lambda n, offset: read(min(n, size), offset), text.start, text.rest)


fields = st.sampled_from(
    [
        b"Subject: hello\r\n",
        b"To: someone\r\n",
        b"From: a@b.example\r\n",
        b"Date: Mon, 7 Dec 2026 06:00:00 +0000\r\n",
        b" folded on\r\n",
        b"X-Long: " + b"v" * 200 + b"\r\n",
        b"not a field\r\n",
        b"\r\n",
    ]
)
bodies = st.sampled_from([b"", b"body\r\n", b"\r\n\r\nmore\r\n", b"Subject: in the body\r\n", b"x" * 300])


@given(st.lists(fields, max_size=10).map(b"".join), bodies, st.integers(min_value=1, max_value=2500))
@settings(max_examples=300)
def test_a_header_completed_from_the_start_of_a_message_is_the_one_completed_from_all_of_it(
    header: bytes, body: bytes, cut: int
) -> None:
    message = header + body
    head = message[:cut]
    if not header_known(head) and head != message:
        return  # the loader reads on until it knows, or has it all
    options = {
        "queued_at": 1.8e9,
        "message_id": "6b1656c80018d60783e93a99",
        "sender": "root",
        "submitted_by": "root",
        "full_name": "",
        "domain": "example.org",
        "hostname": "mx.example.org",
    }
    completed, end = complete_head(head, **options)  # type: ignore[arg-type]
    assert completed + message[end:] == complete(message, **options)
    # and a From: rewritten in that head alone is the one rewritten in the whole
    whole = completed + message[end:]
    in_head = rewrite_from(completed + head[end:], "account@example.net") + message[len(head) :]
    assert in_head == rewrite_from(whole, "account@example.net")


def test_the_flush_reads_a_large_message_through_its_lock_and_holds_only_its_head(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    message = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 100_000
    queue_id = spool.submit({"sender": "a@example.org", "recipients": ["b@example.net"]}, message)
    assert spool.pick_up(1 << 24, print) == [queue_id]
    lock = spool.lock_message(queue_id)
    assert lock is not None
    try:
        entry, text = spool.load_text(queue_id, lock)
        assert not text.in_memory and len(text.head) < len(message) // 4
        assert text.head.startswith(b"Subject: big\r\n\r\n")
        assert len(text) == entry.size == len(message)
        assert text.whole() == message
        os.truncate(os.path.join(spool.dir("queue"), queue_id), 1000)  # never done to a locked file
        try:
            text.whole()
        except UnreadableText as error:
            assert "shorter" in str(error)
        else:
            raise AssertionError("a truncated queue file went unnoticed")
    finally:
        spool.unlock_message(lock)


# --- through a real server ---

EIGHT_BIT = (
    b"Subject: greetings\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + (".früh\r\n" + "Grüße aus der Mühle, Zeile um Zeile\r\n" * 20_000).encode()
)


def test_a_spooled_8bit_message_is_downgraded_as_a_whole_one_is(smtp_server: SmtpServer) -> None:
    """A server without 8BITMIME gets the 7-bit conversion of the whole message (not streamed), the same
    from the spool as from memory; one with it gets the text as it is, streamed."""
    for smarthost_hides in ({"8BITMIME"}, set()):
        smtp_server.handler.hide = smarthost_hides
        with SmtpSession(smtp_server.smarthost(), "client.example.org") as s:
            s.send("me@example.org", ["a@example.org"], EIGHT_BIT)
            s.send("me@example.org", ["a@example.org"], spooled(EIGHT_BIT, 100))
    converted, from_spool, plain, plain_from_spool = smtp_server.handler.messages
    assert converted.data == from_spool.data and converted.data.isascii()
    assert plain.data == plain_from_spool.data == EIGHT_BIT
    assert plain_from_spool.mail_options == [f"SIZE={len(EIGHT_BIT)}", "BODY=8BITMIME"]


def test_a_queue_file_that_fails_while_it_is_sent_delivers_nothing(smtp_server: SmtpServer) -> None:
    """The file fails on the pass that sends it (the passes before, that look at it, go well): the
    connection is dropped without the final dot, so the server keeps nothing; the error says why."""
    whole = EIGHT_BIT
    passes: list[int] = []

    def read(n: int, at: int) -> bytes:
        if at == 100:
            passes.append(at)
        return b"" if failing_pass and len(passes) >= failing_pass and at > 600_000 else whole[at : at + n]

    failing_pass = 0
    with SmtpSession(smtp_server.smarthost(), "client.example.org") as s:
        s.send("me@example.org", ["a@example.org"], Text(whole[:100], read, 100, len(whole) - 100))
    assert smtp_server.handler.messages[0].data == whole
    failing_pass, looks = len(passes), len(passes)
    passes.clear()
    with SmtpSession(smtp_server.smarthost(), "client.example.org") as s:
        try:
            s.send("me@example.org", ["a@example.org"], Text(whole[:100], read, 100, len(whole) - 100))
        except UnreadableText as error:
            assert "shorter" in str(error)
        else:
            raise AssertionError("a queue file that ended early was sent as a whole message")
        assert not s.is_open and len(passes) == looks
    assert len(smtp_server.handler.messages) == 1


# --- into a mailbox ---


def whole_mbox_entry(message: bytes, sender: str, now: float) -> bytes:
    """What local delivery wrote before it streamed: the whole message with LF line ends, quoted at once."""
    data = b"Return-Path: <" + sender.encode() + b">\n" + message.replace(b"\r\n", b"\n")
    body = (b"\n" + data).replace(b"\nFrom ", b"\n>From ")[1:]
    if not body.endswith(b"\n"):
        body += b"\n"
    return from_line(sender, now) + b"\n" + body + b"\n"


mbox_pieces = st.sampled_from(
    [b"From ", b"\r\n", b"\n", b"\r", b">From ", b"x", b"From", b" ", b"\r\nFrom x"]
)


@given(
    st.lists(mbox_pieces, max_size=40).map(b"".join),
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=1, max_value=50),
)
@settings(max_examples=400)
def test_an_mbox_entry_written_block_by_block_is_the_one_written_whole(
    message: bytes, head: int, block: int
) -> None:
    text = _blocked(spooled(message, head), block)
    pieces = [b"Return-Path: <a@example.org>\n", *unix_lines(text.blocks(block))]
    assert all(piece.endswith(b"\n") for piece in pieces[:-1])
    streamed = b"".join(mbox_entry(pieces, "a@example.org", 1.8e9))
    assert streamed == whole_mbox_entry(message, "a@example.org", 1.8e9)


def test_a_queue_file_that_fails_while_a_mailbox_is_written_leaves_the_mailbox_as_it_was(
    tmp_path: Path,
) -> None:
    entry = pwd.getpwuid(os.getuid())
    mbox = tmp_path / entry.pw_name
    mbox.write_bytes(b"From someone Mon Dec  7 06:00:00 2026\nSubject: before\n\nkept\n\n")
    before = mbox.read_bytes()
    mbox.chmod(0o600)

    def pieces() -> Iterator[bytes]:
        yield b"From a@example.org Mon Dec  7 07:00:00 2026\nSubject: cut\n\n" + b"x" * 100_000
        raise UnreadableText("the queued message is shorter than when it was read")

    with pytest.raises(DeferredError, match="shorter than when it was read; the mailbox is unchanged"):
        deliver_mbox(str(mbox), pieces, entry, 1.0, in_child=True)
    assert mbox.read_bytes() == before
    maildir = tmp_path / "Maildir"
    with pytest.raises(DeferredError, match="shorter than when it was read"):
        deliver_maildir(str(maildir), pieces, entry, create=True)
    assert not list((maildir / "new").iterdir()) and not list((maildir / "tmp").iterdir())
