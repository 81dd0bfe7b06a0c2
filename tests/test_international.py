"""International mail against real servers on 127.0.0.1 (issue 14, items 1 and 2): domains as A-labels
(IDNA 2008 / UTS 46) where SMTPUTF8 is missing, SMTPUTF8 where it is offered and needed, and 8-bit
messages down-converted (quoted-printable, base64, RFC 2047) for a server without 8BITMIME; the bytes the
server received are checked."""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import json
import quopri
from pathlib import Path

import pytest
from conftest import MtaEnv, nested_multipart
from mailservers import HOST, Certificates, SmtpServer, certificates, smtp_server
from test_smtp import session

from pymta.config.load import load
from pymta.config.routing import Router
from pymta.mail.downgrade import downgrade
from pymta.mail.idn import display_address, domain_key

__all__ = ["certificates", "smtp_server"]  # fixtures imported for use

MESSAGE = b"From: me@example.org\r\nTo: you@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


def parsed(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


# --- 1. international domains ---


def test_an_international_domain_goes_as_its_a_label_without_smtputf8(smtp_server: SmtpServer) -> None:
    smtp_server.handler.hide = {"SMTPUTF8"}
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send("me@bücher.example", ["juergen@müller.de", "JUERGEN@MÜLLER.DE"], MESSAGE)
    assert [o.status for o in outcomes] == ["delivered", "delivered"]
    assert [o.recipient for o in outcomes] == ["juergen@müller.de", "JUERGEN@MÜLLER.DE"]  # as queued
    received = smtp_server.handler.messages[0]
    assert received.mail_from == "me@xn--bcher-kva.example"
    assert received.rcpt_tos == ["juergen@xn--mller-kva.de", "JUERGEN@xn--mller-kva.de"]  # UTS 46 maps case
    assert "SMTPUTF8" not in received.mail_options


def test_idna_2008_not_2003(smtp_server: SmtpServer) -> None:
    """IDNA 2003 (Python's built-in codec) maps ß to ss: another domain, someone else's mail."""
    smtp_server.handler.hide = {"SMTPUTF8"}
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@straße.de"], MESSAGE)
    assert smtp_server.handler.messages[0].rcpt_tos == ["a@xn--strae-oqa.de"]


def test_a_non_ascii_local_part_takes_smtputf8_when_offered(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send("me@example.org", ["jürgen@müller.de"], MESSAGE)
    assert outcomes[0].status == "delivered"
    received = smtp_server.handler.messages[0]
    assert "SMTPUTF8" in received.mail_options
    assert received.rcpt_tos == ["jürgen@müller.de"]


def test_only_what_cannot_be_expressed_fails_with_5_6_7(smtp_server: SmtpServer) -> None:
    smtp_server.handler.hide = {"SMTPUTF8"}
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send(
            "me@example.org", ["jürgen@müller.de", "a@müller.de", "b@exa\u2024mple.org"], MESSAGE
        )
    local, fine, invalid = outcomes
    assert local.status == "failed" and local.reply.startswith("553 5.6.7 jürgen@müller.de: ")
    assert "local part" in local.reply and "SMTPUTF8" in local.reply
    assert fine.status == "delivered"
    assert invalid.status == "failed" and invalid.reply.startswith("553 5.6.7 ")
    assert "IDNA" in invalid.reply
    assert smtp_server.handler.messages[0].rcpt_tos == ["a@xn--mller-kva.de"]


def test_a_label_and_u_label_are_one_domain() -> None:
    assert domain_key("müller.de") == domain_key("XN--MLLER-KVA.DE.") == domain_key("Müller.De")
    assert domain_key("example.org") == "example.org"
    assert display_address("juergen@xn--mller-kva.de") == "juergen@müller.de"
    assert display_address("plain@example.org") == "plain@example.org"
    assert display_address("broken@xn--zz-.de") == "broken@xn--zz-.de"  # not an A-label: as it is


def test_local_domains_match_either_form(tmp_path: Path) -> None:
    config_file = tmp_path / "pymta.yaml"
    config_file.write_text(
        f"spool: {tmp_path / 'spool'}\nhostname: mx.example.org\ndomain: example.org\n"
        "local_domains: [müller.de, xn--bcher-kva.example]\n"
    )
    router = Router(load(str(config_file)))
    assert router.local_part("juergen@xn--mller-kva.de") == "juergen"
    assert router.local_part("juergen@MÜLLER.de") == "juergen"
    assert router.local_part("anna@bücher.example") == "anna"
    assert router.local_part("anna@elsewhere.example") is None
    assert router.sender_is_local("anna@bücher.example")


def test_the_queue_shows_the_domain_as_people_write_it(mta: MtaEnv) -> None:
    result = mta.sendmail("-i", "juergen@xn--mller-kva.de", input=b"Subject: x\n\nx\n")
    assert result.returncode == 0, result.stderr
    listing = mta.run("pymta", ["queue"])
    assert listing.returncode == 0, listing.stderr
    assert "juergen@müller.de" in listing.stdout.decode()
    as_json = json.loads(mta.run("pymta", ["queue", "--json"]).stdout)
    assert as_json[0]["recipients"][0]["address"] == "juergen@xn--mller-kva.de"  # the contract: as queued


def test_sendmail_to_an_umlaut_domain_reaches_a_server_without_smtputf8(
    mta: MtaEnv, certificates: Certificates
) -> None:
    with SmtpServer("plain") as server:
        server.handler.hide = {"SMTPUTF8", "8BITMIME"}
        mta.write_config(
            "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
            f"smarthosts: [{{host: {HOST}, port: {server.port}, security: none, timeout: 3s}}]\n"
        )
        result = mta.sendmail("-i", "juergen@müller.de", input="Subject: Grüße\n\nGrüße\n".encode())
        assert result.returncode == 0, result.stderr
        flushed = mta.run("pymta", ["flush"])
        assert flushed.returncode == 0, flushed.stderr
        assert mta.entries() == []
        received = server.handler.messages[0]
    assert received.rcpt_tos == ["juergen@xn--mller-kva.de"]
    assert received.data.isascii()  # no SMTPUTF8, no 8BITMIME: headers and body encoded
    message = parsed(received.data)
    assert message["Subject"] == "Grüße"
    assert message.get_content().replace("\r\n", "\n") == "Grüße\n"


# --- 2. 8-bit to a server without 8BITMIME ---

PLAIN_8BIT = "From: me@example.org\r\nSubject: hi\r\n\r\nGrüße aus München.\r\n.dot\r\n".encode()
MULTIPART_8BIT = (
    b"From: me@example.org\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XYZ"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--XYZ\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "Schöne Grüße\r\n".encode() + b"--XYZ\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"plain ascii part\r\n"
    b"--XYZ\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n"
    b"\x00\xff\xfe binary\r\n"
    b"--XYZ--\r\n"
)


def test_a_message_that_needs_no_change_is_the_same_object() -> None:
    assert downgrade(MESSAGE, body=True, headers=True) is MESSAGE
    eight_bit_body = PLAIN_8BIT
    assert downgrade(eight_bit_body, body=False, headers=True) is eight_bit_body


def test_an_8bit_text_body_becomes_quoted_printable() -> None:
    result = downgrade(PLAIN_8BIT, body=True, headers=False)
    assert result.isascii()
    message = parsed(result)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "text/plain" and message.get_content_charset() == "utf-8"
    body = result.split(b"\r\n\r\n", 1)[1]
    assert quopri.decodestring(body).replace(b"\r\n", b"\n") == "Grüße aus München.\n.dot\n".encode()


def test_each_8bit_part_is_encoded_and_the_others_keep_their_bytes() -> None:
    result = downgrade(MULTIPART_8BIT, body=True, headers=False)
    assert result.isascii()
    assert b"--XYZ\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain ascii part\r\n--XYZ" in result
    parts = list(parsed(result).iter_parts())
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[0].get_content() == "Schöne Grüße"  # the CRLF before --XYZ is the delimiter's
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert parts[2].get_content() == b"\x00\xff\xfe binary"
    assert result.startswith(MULTIPART_8BIT.split(b"--XYZ\r\n", 1)[0])  # the top headers and preamble


def test_raw_utf8_header_fields_are_encoded_words() -> None:
    raw = (
        '"Müller, Jürgen" <j@müller.de>\r\nTo: Anna Bär <anna@example.org>, bob@example.org\r\n'
        "Subject: Grüße aus München, wie geht's? Ein sehr langer Betreff über viele Wörter hinweg\r\n"
        "\r\nbody\r\n"
    )
    result = downgrade(("From: " + raw).encode(), body=True, headers=True)
    assert result.isascii()
    message = parsed(result)
    assert str(message["Subject"]) == (
        "Grüße aus München, wie geht's? Ein sehr langer Betreff über viele Wörter hinweg"
    )
    sender = message["From"].addresses[0]
    assert (sender.display_name, sender.addr_spec) == ("Müller, Jürgen", "j@xn--mller-kva.de")
    to = message["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Anna Bär", "anna@example.org"),
        ("", "bob@example.org"),
    ]
    assert all(len(line) <= 78 for line in result.split(b"\r\n"))
    assert result.endswith(b"\r\n\r\nbody\r\n")


def test_no_8bitmime_no_smtputf8_the_server_gets_7bit(smtp_server: SmtpServer) -> None:
    smtp_server.handler.hide = {"8BITMIME", "SMTPUTF8"}
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], MULTIPART_8BIT)
        s.send("me@example.org", ["a@example.org"], MESSAGE)
    first, second = smtp_server.handler.messages
    assert first.data.isascii() and "BODY=8BITMIME" not in first.mail_options
    assert f"SIZE={len(first.data)}" in first.mail_options  # the size of what was sent
    assert list(parsed(first.data).iter_parts())[0].get_content() == "Schöne Grüße"
    assert second.data == MESSAGE  # 7-bit: not touched


def test_with_8bitmime_the_bytes_go_as_they_are(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], MULTIPART_8BIT)
    assert smtp_server.handler.messages[0].data == MULTIPART_8BIT


def test_utf8_header_fields_ask_for_smtputf8_when_offered(smtp_server: SmtpServer) -> None:
    message = "From: Jürgen <me@example.org>\r\nSubject: Grüße\r\n\r\nGrüße\r\n".encode()
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], message)
    received = smtp_server.handler.messages[0]
    assert "SMTPUTF8" in received.mail_options and received.data == message
    smtp_server.handler.hide = {"SMTPUTF8"}
    smtp_server.handler.messages.clear()
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], message)
    received = smtp_server.handler.messages[0]
    assert "SMTPUTF8" not in received.mail_options and "BODY=8BITMIME" in received.mail_options
    head, body = received.data.split(b"\r\n\r\n", 1)
    assert head.isascii() and body == "Grüße\r\n".encode()  # 8BITMIME: only the header fields change
    assert str(parsed(received.data)["Subject"]) == "Grüße"


def test_what_a_header_field_cannot_express_stays_and_bad_bytes_do_not_break_it() -> None:
    message = b"To: j\xc3\xbcrgen@m\xc3\xbcller.de\r\nSubject: caf\xe9 \xff\r\n\r\nx\r\n"
    result = downgrade(message, body=True, headers=True)
    assert result.startswith("To: jürgen@xn--mller-kva.de\r\n".encode())  # only SMTPUTF8 carries jürgen@
    subject = result.split(b"\r\n")[1]
    assert subject.isascii() and str(parsed(result)["Subject"]) == "caf\ufffd \ufffd"


def test_a_non_ascii_file_name_becomes_an_rfc_2231_parameter() -> None:
    part = (
        b"MIME-Version: 1.0\r\nContent-Type: application/pdf\r\n"
        b'Content-Disposition: attachment; filename="Gr\xc3\xbc\xc3\x9fe 1.pdf"; size=3\r\n\r\nabc\r\n'
    )
    result = downgrade(part, body=False, headers=True)
    assert result.isascii()
    assert b"filename*=utf-8''Gr%C3%BC%C3%9Fe%201.pdf; size=3" in result.replace(b"\r\n ", b" ")
    message = parsed(result)
    assert message.get_filename() == "Grüße 1.pdf" and message.get_content_type() == "application/pdf"


def test_bare_text_without_header_fields_gets_them() -> None:
    result = downgrade("Grüße\r\n\r\nzweiter Absatz\r\n".encode(), body=True, headers=True)
    assert result.isascii()
    message = parsed(result)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content().replace("\r\n", "\n") == "Grüße\n\nzweiter Absatz\n"


def test_a_hostile_nesting_does_not_stop_the_delivery() -> None:
    deep = nested_multipart(400, line_length=10).replace(b"x" * 10, "ü".encode() * 5)
    result = downgrade(deep, body=True, headers=True)  # no RecursionError: below 50 levels, as it is
    assert result.count(b"--b49\r\n") == 1
    shallow = nested_multipart(3, line_length=10).replace(b"x" * 10, "ü".encode() * 5)
    assert downgrade(shallow, body=True, headers=True).isascii()


@pytest.mark.parametrize("cte", [b"base64", b"quoted-printable"])
def test_parts_already_encoded_are_left_alone(cte: bytes) -> None:
    body = base64.encodebytes(b"abc") if cte == b"base64" else b"abc=3D\r\n"
    message = (
        b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: " + cte + b"\r\nSubject: \xc3\xa4\r\n\r\n" + body
    )
    result = downgrade(message, body=True, headers=True)
    assert result.endswith(b"\r\n\r\n" + body)
    assert email.header.decode_header(parsed(result)["Subject"])  # readable
    assert str(parsed(result)["Subject"]) == "ä"
