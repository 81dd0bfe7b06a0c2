"""pymta.delivery.smtp against real servers on 127.0.0.1: aiosmtpd with trustme certificates, and scripted
faults."""

from __future__ import annotations

import base64
import datetime
import logging
import socket
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
from mailservers import (
    PASSWORD,
    TOKEN,
    USER,
    Attempt,
    Certificates,
    Close,
    Expect,
    Handler,
    Hang,
    ReadData,
    ScriptedServer,
    Send,
    SmtpServer,
    StartTls,
    Step,
    accept_message,
    certificates,
    greet,
    make_smarthost,
    plain_server,
    self_signed_context,
    smtp_server,
    tls_server,
)

from pymta.config.model import PasswordSource, Smarthost
from pymta.delivery.credentials import CredentialError, Secret
from pymta.delivery.smtp.commands import xtext
from pymta.delivery.smtp.outcome import RecipientOutcome, SessionError
from pymta.delivery.smtp.session import SmtpSession

__all__ = ["certificates", "plain_server", "smtp_server", "tls_server"]  # fixtures imported for use

HOSTNAME = "client.example.org"
MESSAGE = b"From: me@example.org\r\nTo: you@example.org\r\nSubject: hi\r\n\r\nHello.\r\n.leading dot\r\n"


class SecretCalls:
    """A secret source that counts how often it is asked."""

    def __init__(self, value: str = PASSWORD) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> Secret:
        self.calls += 1
        return Secret(self.value)


def session(smarthost: Smarthost, secret: Callable[[], Secret] | None = None) -> SmtpSession:
    return SmtpSession(smarthost, HOSTNAME, secret or SecretCalls())


def open_fails(smarthost: Smarthost, secret: Callable[[], Secret] | None = None) -> SessionError:
    attempt = session(smarthost, secret)
    with pytest.raises(SessionError) as caught:
        attempt.open()
    assert not attempt.is_open
    assert "\n" not in str(caught.value)
    return caught.value


# --- delivery and per-recipient outcomes ---


def test_starttls_with_ca_file_and_auth_delivers(smtp_server: SmtpServer) -> None:
    secret = SecretCalls()
    with SmtpSession(smtp_server.smarthost(username=USER), HOSTNAME, secret) as s:
        info = s.info
        outcomes = s.send("me@example.org", ["you@example.org"], MESSAGE)
    assert outcomes == [RecipientOutcome("you@example.org", "delivered", "250 2.0.0 OK: queued as 1")]
    assert outcomes[0].code == 250 and outcomes[0].enhanced == "2.0.0"
    received = smtp_server.handler.messages[0]
    assert (received.mail_from, received.rcpt_tos, received.data) == (
        "me@example.org",
        ["you@example.org"],
        MESSAGE,
    )
    assert received.login == USER
    assert smtp_server.handler.ehlo_names == [HOSTNAME, HOSTNAME]  # before and after STARTTLS
    assert smtp_server.auth.attempts == [Attempt("PLAIN", USER, True)]  # the non-ASCII password went through
    assert secret.calls == 1
    assert info.relay == f"127.0.0.1[127.0.0.1]:{smtp_server.port}"
    assert info.authenticated == f"PLAIN as {USER}"
    assert info.tls is not None and info.tls.version.startswith("TLSv1.")
    assert info.tls.certificate.fingerprint == smtp_server.tls.fingerprint  # type: ignore[union-attr]
    assert "trustme" in info.tls.certificate.issuer
    assert info.tls.certificate.not_after and info.tls.certificate.not_after.year > 2030
    assert any(e.startswith("AUTH ") for e in info.extensions) and "STARTTLS" not in info.extensions


def test_implicit_tls(tls_server: SmtpServer) -> None:
    with session(tls_server.smarthost(username=USER)) as s:
        assert s.info.tls is not None
        assert s.send("me@example.org", ["you@example.org"], MESSAGE)[0].status == "delivered"
    assert tls_server.handler.ehlo_names == [HOSTNAME]


@pytest.mark.parametrize("mechanism", ["plain", "login", "cram-md5"])
def test_non_ascii_password_with_each_mechanism(smtp_server: SmtpServer, mechanism: str) -> None:
    with session(smtp_server.smarthost(username=USER, auth=mechanism)) as s:
        assert s.info.authenticated == f"{mechanism.upper()} as {USER}"
    assert smtp_server.auth.attempts == [Attempt(mechanism.upper(), USER, True)]


def test_each_recipient_gets_its_own_outcome(smtp_server: SmtpServer) -> None:
    smtp_server.handler.rejections = {
        "bad@example.org": "550 5.1.1 <bad@example.org>: user unknown",
        "full@example.org": "452 4.2.2 mailbox full",
    }
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send(
            "me@example.org", ["ok@example.org", "bad@example.org", "full@example.org"], MESSAGE
        )
    assert [(o.recipient, o.status, o.reply) for o in outcomes] == [
        ("ok@example.org", "delivered", "250 2.0.0 OK: queued as 1"),
        ("bad@example.org", "failed", "550 5.1.1 <bad@example.org>: user unknown"),
        ("full@example.org", "deferred", "452 4.2.2 mailbox full"),
    ]
    assert smtp_server.handler.messages[0].rcpt_tos == ["ok@example.org"]


@pytest.mark.parametrize(
    ("reply", "status"), [("552 5.3.4 message too big", "failed"), ("451 4.3.0 try again later", "deferred")]
)
def test_data_reply_applies_to_every_accepted_recipient(
    smtp_server: SmtpServer, reply: str, status: str
) -> None:
    smtp_server.handler.data_reply = reply
    smtp_server.handler.rejections = {"bad@example.org": "550 5.1.1 user unknown"}
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send("me@example.org", ["a@example.org", "bad@example.org", "b@example.org"], MESSAGE)
    assert [(o.status, o.reply) for o in outcomes] == [
        (status, reply),
        ("failed", "550 5.1.1 user unknown"),
        (status, reply),
    ]


@pytest.mark.parametrize(
    ("reply", "status"), [("550 5.7.1 sender rejected", "failed"), ("451 4.7.1 greylisted", "deferred")]
)
def test_mail_from_reply_applies_to_all_recipients(smtp_server: SmtpServer, reply: str, status: str) -> None:
    smtp_server.handler.mail_reply = reply
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send("me@example.org", ["a@example.org", "b@example.org"], MESSAGE)
        assert [(o.status, o.reply) for o in outcomes] == [(status, reply)] * 2
        smtp_server.handler.mail_reply = None
        assert (
            s.send("me@example.org", ["a@example.org"], MESSAGE)[0].status == "delivered"
        )  # RSET, then fine


def test_pipelined_mail_failure_consumes_the_rcpt_replies() -> None:
    script = [
        *greet(("PIPELINING", "8BITMIME")),
        Expect("MAIL"), Expect("RCPT"), Expect("RCPT"), Expect("DATA"),  # one write: all four come at once
        Send("550 5.7.1 sender blocked\n503 5.5.1 need MAIL\n503 5.5.1 need MAIL\n503 5.5.1 need MAIL"),
        Expect("RSET"), Send("250 2.0.0 ok"), *accept_message(), Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        first = s.send("me@example.org", ["a@example.org", "b@example.org"], MESSAGE)
        second = s.send("me@example.org", ["a@example.org"], MESSAGE)
    assert [(o.status, o.reply) for o in first] == [("failed", "550 5.7.1 sender blocked")] * 2
    assert second[0].status == "delivered"
    assert server.errors == []


def test_reply_without_enhanced_code_gets_a_class_default() -> None:
    script = [
        *greet(),
        Expect("MAIL"), Send("250 ok"), Expect("RCPT"), Send("550 no such user\n"[:-1]),
        Expect("DATA"), Send("554 no valid recipients"), Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        outcome = s.send("me@example.org", ["x@example.org"], MESSAGE)[0]
    assert outcome.reply == "550 5.0.0 no such user" and outcome.enhanced == "5.0.0"


def test_multiline_reply_becomes_one_line() -> None:
    script = [
        *greet(), Expect("MAIL"), Send("250 2.1.0 ok"), Expect("RCPT"),
        Send("550-5.7.1 first line\n550 5.7.1 second line"), Expect("DATA"), Send("554 5.5.1 no recipients"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        outcome = s.send("me@example.org", ["x@example.org"], MESSAGE)[0]
    assert outcome.reply == "550 5.7.1 first line second line"


# --- ESMTP parameters ---


def test_8bitmime_and_size_only_when_offered(smtp_server: SmtpServer) -> None:
    eight_bit = MESSAGE.replace(b"Hello.", "Grüße.".encode())
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], eight_bit)
        s.send("me@example.org", ["a@example.org"], MESSAGE)
        s.send("me@example.org", ["a@example.org"], MESSAGE, body_type="8BITMIME")
    first, second, third = smtp_server.handler.messages
    assert first.mail_options == [f"SIZE={len(eight_bit)}", "BODY=8BITMIME"]
    assert first.data == eight_bit
    assert second.mail_options == [f"SIZE={len(MESSAGE)}"]
    assert third.mail_options == [f"SIZE={len(MESSAGE)}", "BODY=8BITMIME"]
    smtp_server.handler.hide = {"8BITMIME", "SIZE"}
    smtp_server.handler.messages.clear()
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], eight_bit)
    assert smtp_server.handler.messages[0].mail_options == []  # sent as is: no BODY the server did not offer


def test_smtputf8_when_an_address_needs_it(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send("me@example.org", ["jörg@exämple.org", "a@example.org"], MESSAGE)
    assert [o.status for o in outcomes] == ["delivered", "delivered"]
    received = smtp_server.handler.messages[0]
    assert "SMTPUTF8" in received.mail_options and "BODY=8BITMIME" in received.mail_options
    assert received.rcpt_tos == ["jörg@exämple.org", "a@example.org"]


def test_non_ascii_address_fails_when_smtputf8_is_not_offered(smtp_server: SmtpServer) -> None:
    smtp_server.handler.hide = {"SMTPUTF8"}
    with session(smtp_server.smarthost()) as s:
        outcomes = s.send("me@example.org", ["jörg@exämple.org", "a@example.org"], MESSAGE)
        assert outcomes[0].status == "failed" and outcomes[0].reply.startswith("553 5.6.7 jörg@exämple.org")
        assert outcomes[1].status == "delivered"
        assert "SMTPUTF8" not in smtp_server.handler.messages[0].mail_options
        everyone = s.send("jörg@exämple.org", ["a@example.org"], MESSAGE)
    assert everyone[0].status == "failed" and "SMTPUTF8" in everyone[0].reply
    assert len(smtp_server.handler.messages) == 1


def test_dsn_parameters_only_when_offered(smtp_server: SmtpServer) -> None:
    dsn = {"notify": "success,failure", "ret": "hdrs", "envid": "Q1+x=2"}
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], MESSAGE, **dsn)
    without = smtp_server.handler.messages[0]
    assert not any(o.startswith(("NOTIFY", "RET", "ENVID", "ORCPT")) for o in without.mail_options)
    assert without.rcpt_options == {"a@example.org": []}
    smtp_server.handler.extensions = ["DSN"]
    with session(smtp_server.smarthost()) as s:
        s.send("me@example.org", ["a+b@example.org"], MESSAGE, **dsn)
    with_dsn = smtp_server.handler.messages[1]
    assert (
        "RET=HDRS" in with_dsn.mail_options and "ENVID=Q1+2BX+3D2" in with_dsn.mail_options
    )  # aiosmtpd uppercases
    assert with_dsn.rcpt_options == {
        "a+b@example.org": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;A+2BB@EXAMPLE.ORG"]
    }


@pytest.mark.parametrize(
    ("notify", "for_targets"), [("success,failure", "NOTIFY=FAILURE"), ("success", "NOTIFY=NEVER")]
)
def test_an_alias_target_is_not_asked_to_report_success(
    smtp_server: SmtpServer, notify: str, for_targets: str
) -> None:
    smtp_server.handler.extensions = ["DSN"]
    with session(smtp_server.smarthost()) as s:
        s.send(
            "me@example.org",
            ["named@example.org", "t@example.org"],
            MESSAGE,
            notify=notify,
            expanded={"t@example.org"},
        )
    [received] = smtp_server.handler.messages
    assert received.rcpt_options["named@example.org"][0] == f"NOTIFY={notify.upper()}"
    assert received.rcpt_options["t@example.org"][0] == for_targets  # RFC 3461 5.2.7.3


def test_dsn_parameters_exactly_as_sent() -> None:
    script = [
        *greet(("DSN", "8BITMIME")), *accept_message(), Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        s.send("me@example.org", ["a+b@example.org"], MESSAGE, notify="never", ret="full", envid="id=1")
    assert server.lines[1] == "MAIL FROM:<me@example.org> RET=FULL ENVID=id+3D1"
    assert server.lines[2] == "RCPT TO:<a+b@example.org> NOTIFY=NEVER ORCPT=rfc822;a+2Bb@example.org"
    assert server.data == [MESSAGE.replace(b"\r\n.leading", b"\r\n..leading")]  # dot-stuffed on the wire


def test_xtext() -> None:
    assert xtext("plain-id.123") == "plain-id.123"
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") == "+C3+A9"


@pytest.mark.parametrize(
    ("sender", "recipients", "extra"),
    [
        ("me@example.org\r\nRCPT TO:<x@y>", ["a@example.org"], {}),
        ("me@example.org", ["a@example.org>"], {}),
        ("me@example.org", [], {}),
        ("me@example.org", ["a@example.org"], {"notify": "sometimes"}),
        ("me@example.org", ["a@example.org"], {"ret": "body"}),
        ("me@example.org", ["a\ud800@example.org"], {}),  # no byte stands behind an unpaired surrogate
        ("m\udcffe@example.org", ["a@example.org"], {}),  # a byte that is not UTF-8 (surrogateescape)
    ],
)
def test_arguments_smtp_cannot_carry_are_refused_before_sending(
    smtp_server: SmtpServer, sender: str, recipients: list[str], extra: dict[str, str]
) -> None:
    with session(smtp_server.smarthost()) as s:
        with pytest.raises(ValueError):
            s.send(sender, recipients, MESSAGE, **extra)
        assert s.send("me@example.org", ["a@example.org"], MESSAGE)[0].status == "delivered"


# --- one connection, many messages ---


def test_rset_between_messages_on_one_connection(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost(username=USER)) as s:
        for number in range(3):
            assert s.send("me@example.org", [f"r{number}@example.org"], MESSAGE)[0].status == "delivered"
    assert smtp_server.handler.resets == 2
    assert len(smtp_server.handler.ehlo_names) == 2  # one connection: EHLO before and after STARTTLS
    assert len(smtp_server.auth.attempts) == 1


def test_server_closing_between_messages_asks_for_a_reconnect() -> None:
    first = [*greet(), *accept_message(), Close()]
    second = [*greet(), *accept_message(), Expect("QUIT"), Send("221 bye")]
    with ScriptedServer(first, second) as server:
        s = session(server.smarthost())
        s.open()
        assert s.send("me@example.org", ["a@example.org"], MESSAGE)[0].status == "delivered"
        with pytest.raises(SessionError) as caught:
            s.send("me@example.org", ["b@example.org"], MESSAGE)
        assert caught.value.reconnect and not s.is_open
        assert caught.value.stage == "closed" and "RSET" in str(caught.value)
        s.open()  # a closed session opens again
        assert s.send("me@example.org", ["b@example.org"], MESSAGE)[0].status == "delivered"
        s.close()
        assert server.finished.wait(5)
    assert server.errors == []
    verbs = [line.split()[0].upper() for line in server.lines]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA"] * 2 + ["QUIT"]


def test_421_to_rset_asks_for_a_reconnect() -> None:
    script = [*greet(), *accept_message(), Expect("RSET"), Send("421 4.4.2 idle too long"), Close()]
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        s.send("me@example.org", ["a@example.org"], MESSAGE)
        with pytest.raises(SessionError) as caught:
            s.send("me@example.org", ["b@example.org"], MESSAGE)
    assert caught.value.reconnect and caught.value.reply == "421 4.4.2 idle too long"


# --- pipelining across messages (RFC 2920) ---

# The replies to a pipelined RSET, MAIL, one RCPT and DATA, in one write.
NEXT_ACCEPTED = "250 2.0.0 ok\n250 2.1.0 ok\n250 2.1.5 ok\n354 go ahead"


def first_envelope() -> list[Step]:
    """The first message's MAIL, RCPT and DATA (one write), answered in one write."""
    return [Expect("MAIL"), Expect("RCPT"), Expect("DATA"), Send("250 2.1.0 ok\n250 2.1.5 ok\n354 go ahead")]


def next_envelope() -> list[Step]:
    """The next message's commands, read before the text before them is answered: a client that waited for
    that answer first would hang here."""
    return [Expect("RSET"), Expect("MAIL"), Expect("RCPT"), Expect("DATA")]


def test_a_started_message_s_commands_go_out_behind_the_text_before_it() -> None:
    script = [
        *greet(), *first_envelope(), ReadData(), *next_envelope(),
        Send("250 2.0.0 queued as 1\n" + NEXT_ACCEPTED), ReadData(), *next_envelope(),
        Send("250 2.0.0 queued as 2\n" + NEXT_ACCEPTED), ReadData(), Send("250 2.0.0 queued as 3"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost(timeout=2.0)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        assert s.finish(first) == [RecipientOutcome("a@example.org", "delivered", "250 2.0.0 queued as 1")]
        third = s.start("me@example.org", ["c@example.org"], MESSAGE)
        assert s.finish(second)[0].reply == "250 2.0.0 queued as 2"
        assert s.finish(third)[0].reply == "250 2.0.0 queued as 3"
    assert server.errors == []
    assert server.data == [MESSAGE.replace(b"\r\n.leading", b"\r\n..leading")] * 3


def test_a_5xx_to_a_text_while_the_next_message_is_in_flight_fails_only_that_one() -> None:
    script = [
        *greet(), *first_envelope(), ReadData(), *next_envelope(),
        Send("554 5.6.0 message refused\n" + NEXT_ACCEPTED), ReadData(), Send("250 2.0.0 queued as 2"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost(timeout=2.0)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        assert s.finish(first) == [RecipientOutcome("a@example.org", "failed", "554 5.6.0 message refused")]
        assert s.finish(second) == [RecipientOutcome("b@example.org", "delivered", "250 2.0.0 queued as 2")]
    assert server.errors == []


def test_a_refused_envelope_still_lets_the_message_behind_it_go() -> None:
    # Every RCPT of the first message refused: its empty text ends it, and carries the next one's commands.
    script = [
        *greet(), Expect("MAIL"), Expect("RCPT"), Expect("DATA"),
        Send("250 2.1.0 ok\n550 5.1.1 no such user\n354 go ahead"), ReadData(), *next_envelope(),
        Send("554 5.5.1 no valid recipients\n" + NEXT_ACCEPTED), ReadData(), Send("250 2.0.0 queued as 2"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost(timeout=2.0)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        assert s.finish(first) == [RecipientOutcome("a@example.org", "failed", "550 5.1.1 no such user")]
        assert s.finish(second)[0].status == "delivered"
    assert server.errors == []
    assert server.data == [b"", MESSAGE.replace(b"\r\n.leading", b"\r\n..leading")]


def test_a_server_closing_after_a_text_asks_to_send_the_next_message_again() -> None:
    # It answered the text, then went away with the next message's commands unanswered.
    script = [
        *greet(),
        *first_envelope(),
        ReadData(),
        *next_envelope(),
        Send("250 2.0.0 queued as 1"),
        Close(),
    ]
    with ScriptedServer(script) as server, session(server.smarthost(timeout=2.0)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        assert s.finish(first)[0].status == "delivered"
        with pytest.raises(SessionError) as caught:
            s.finish(second)
    assert caught.value.reconnect and caught.value.stage == "closed" and "RSET" in str(caught.value)
    assert len(server.data) == 1


def test_a_session_failing_in_a_text_loses_the_message_started_behind_it() -> None:
    script = [*greet(), *first_envelope(), ReadData(), *next_envelope(), Close()]
    with ScriptedServer(script) as server, session(server.smarthost(timeout=2.0)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        with pytest.raises(SessionError) as in_flight:
            s.finish(first)
        assert not in_flight.value.reconnect  # its text went out: it may have been delivered
        assert second.lost and not s.is_open
        with pytest.raises(SessionError) as lost:
            s.finish(second)
    assert lost.value.reconnect and "before this message was sent" in str(lost.value)
    assert server.errors == []


def test_without_pipelining_started_messages_go_one_after_the_other() -> None:
    script = [
        *greet(("8BITMIME",)), *accept_message("250 2.0.0 queued as 1"),
        Expect("RSET"), Send("250 2.0.0 ok"), *accept_message("250 2.0.0 queued as 2"),
        Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost(timeout=2.0)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        assert s.finish(first)[0].reply == "250 2.0.0 queued as 1"
        assert s.finish(second)[0].reply == "250 2.0.0 queued as 2"
    assert server.errors == []


def test_started_messages_are_finished_in_order(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost(username=USER)) as s:
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        with pytest.raises(RuntimeError):
            s.finish(second)
        with pytest.raises(RuntimeError):
            s.send("me@example.org", ["c@example.org"], MESSAGE)
        assert s.finish(first)[0].status == "delivered"
        assert s.finish(second)[0].status == "delivered"
    assert [m.rcpt_tos for m in smtp_server.handler.messages] == [["a@example.org"], ["b@example.org"]]


def test_closing_with_a_message_half_sent_says_no_quit_into_its_text() -> None:
    # The second message's DATA got 354 when the first was finished; closing then must not send QUIT,
    # which the server would take for a line of the second message.
    script = [
        *greet(), *first_envelope(), ReadData(), *next_envelope(),
        Send("250 2.0.0 queued as 1\n" + NEXT_ACCEPTED), ReadData(),
    ]  # fmt: skip
    with ScriptedServer(script) as server:
        s = session(server.smarthost(timeout=2.0))
        s.open()
        first = s.start("me@example.org", ["a@example.org"], MESSAGE)
        second = s.start("me@example.org", ["b@example.org"], MESSAGE)
        assert s.finish(first)[0].status == "delivered"
        started = time.monotonic()
        s.close()
        assert time.monotonic() - started < 1  # no wait for an answer to QUIT
        assert server.finished.wait(5)
    assert second.lost
    assert server.data[1] == b""  # the connection ended, with no QUIT inside the text
    assert server.errors == []


# --- TLS verification ---


def test_certificate_for_another_name_fails(certificates: Certificates) -> None:
    context = certificates.server_context(certificates.issue("other.example"))
    with SmtpServer("starttls", certificates, server_context=context) as server:
        error = open_fails(server.smarthost(username=USER))
    assert error.stage == "tls" and error.certificate_failed  # typed: `pymta test` offers the pin on it
    assert "certificate verify failed" in str(error) and "not valid for '127.0.0.1'" in str(error)
    assert "write host:" in str(error)
    assert server.auth.attempts == []


def test_expired_certificate_fails(certificates: Certificates) -> None:
    expired = certificates.issue(not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    with SmtpServer("tls", certificates, server_context=certificates.server_context(expired)) as server:
        error = open_fails(server.smarthost(username=USER))
    assert (
        error.stage == "tls"
        and "certificate has expired" in str(error)
        and "renewed" in str(error)
        and str(error).count("expired") == 1
    )
    assert str(error).startswith(f"127.0.0.1[127.0.0.1]:{server.port}: certificate verify failed")


def test_self_signed_needs_a_pin(certificates: Certificates) -> None:
    context, fingerprint = self_signed_context()
    with SmtpServer("starttls", server_context=context) as server:
        error = open_fails(server.smarthost(username=USER))
        assert error.stage == "tls" and "self-signed" in str(error) and "fingerprint" in str(error)
        assert error.certificate_failed
        # The CA file of another CA does not help either.
        assert open_fails(server.smarthost(ca_file=str(certificates.ca_file))).stage == "tls"
        with session(server.smarthost(username=USER, fingerprint=fingerprint)) as s:
            assert s.send("me@example.org", ["a@example.org"], MESSAGE)[0].status == "delivered"
            certificate = s.info.tls.certificate  # type: ignore[union-attr]
        assert certificate.fingerprint == fingerprint and "not checked" in certificate.verification
        assert certificate.subject == "CN=self-signed.test"
        wrong = "sha256:" + ":".join(["AB"] * 32)
        error = open_fails(server.smarthost(username=USER, fingerprint=wrong))
    assert error.stage == "tls" and "does not match the pinned fingerprint" in str(error)
    assert not error.certificate_failed  # the pin, not the chain: nothing to offer
    assert fingerprint in str(error)
    assert [a.success for a in server.auth.attempts] == [True]  # no AUTH after a failed pin


def test_pin_with_implicit_tls_is_checked_before_the_greeting(certificates: Certificates) -> None:
    with SmtpServer("tls", certificates) as server:
        wrong = "sha256:" + ":".join(["01"] * 32)
        error = open_fails(server.smarthost(username=USER, fingerprint=wrong))
        assert error.stage == "tls" and "does not match" in str(error)
        with session(server.smarthost(username=USER, fingerprint=certificates.fingerprint)) as s:
            assert "verified against ca_file" in s.info.tls.certificate.verification  # type: ignore[union-attr]


def test_system_store_does_not_trust_a_private_ca(smtp_server: SmtpServer) -> None:
    error = open_fails(smtp_server.smarthost(ca_file=None))
    assert error.stage == "tls" and "ca_file" in str(error)


def test_missing_ca_file_is_explained(smtp_server: SmtpServer, tmp_path: object) -> None:
    error = open_fails(smtp_server.smarthost(ca_file="/nonexistent/ca.pem"))
    assert error.stage == "tls" and "cannot load ca_file /nonexistent/ca.pem" in str(error)


def test_no_starttls_offered_is_an_error_not_a_downgrade() -> None:
    with ScriptedServer([*greet(("AUTH PLAIN LOGIN", "8BITMIME")), Expect("QUIT")]) as server:
        error = open_fails(server.smarthost(security="starttls", username=USER))
        assert server.finished.wait(5)
    assert error.stage == "tls" and "does not offer STARTTLS" in str(error)
    assert [line.split()[0].upper() for line in server.lines] == ["EHLO"]  # nothing else was sent


def test_starttls_refused(certificates: Certificates) -> None:
    with ScriptedServer(
        [*greet(("STARTTLS",)), Expect("STARTTLS"), Send("454 4.7.0 TLS not available")]
    ) as server:
        error = open_fails(server.smarthost(security="starttls"))
    assert error.stage == "tls" and "454 4.7.0 TLS not available" in str(error)


def test_tls_to_a_plain_port_is_explained() -> None:
    with ScriptedServer([Send("220 plain ESMTP"), Hang()]) as server:
        error = open_fails(server.smarthost(security="tls"))
    assert error.stage == "tls" and "security: starttls" in str(error)


def test_scripted_starttls_step_works(certificates: Certificates) -> None:
    script = [
        *greet(("STARTTLS",)), Expect("STARTTLS"), Send("220 go ahead"), StartTls(),
        Expect("EHLO"), Send("250 scripted.test"), *accept_message(), Expect("QUIT"), Send("221 bye"),
    ]  # fmt: skip
    with ScriptedServer(script, tls_context=certificates.server_context()) as server:
        smarthost = server.smarthost(security="starttls", ca_file=str(certificates.ca_file))
        with session(smarthost) as s:
            assert s.send("me@example.org", ["a@example.org"], MESSAGE)[0].status == "delivered"
    assert server.errors == []


# --- AUTH ---


def test_auth_rejected(smtp_server: SmtpServer) -> None:
    error = open_fails(smtp_server.smarthost(username=USER), SecretCalls("wrong"))
    assert error.stage == "auth" and error.reply == "535 5.7.8 Authentication credentials invalid"
    assert f"rejected the login of {USER} with AUTH PLAIN" in str(error)


def test_auth_not_offered(certificates: Certificates) -> None:
    with SmtpServer("starttls", certificates, handler=Handler(hide={"AUTH"})) as server:
        secret = SecretCalls()
        error = open_fails(server.smarthost(username=USER), secret)
    assert error.stage == "auth" and "offers no AUTH after STARTTLS" in str(error)
    assert secret.calls == 0


def test_auth_is_refused_over_plaintext_unless_allowed(plain_server: SmtpServer) -> None:
    secret = SecretCalls()
    error = open_fails(plain_server.smarthost(username=USER), secret)
    assert error.stage == "auth" and "unencrypted" in str(error) and "auth_plaintext" in str(error)
    assert secret.calls == 0 and plain_server.auth.attempts == []
    with session(plain_server.smarthost(username=USER, auth_plaintext=True)) as s:
        # Without TLS, auto prefers CRAM-MD5: the one mechanism that does not put the password on the wire.
        assert s.info.authenticated == f"CRAM-MD5 as {USER}"


def test_mechanism_not_offered_is_explained() -> None:
    with ScriptedServer([*greet(("AUTH PLAIN",)), Expect("QUIT")]) as server:
        error = open_fails(server.smarthost(username=USER, auth_plaintext=True, auth="login"))
    assert error.stage == "auth" and "auth: login is configured but the server offers only PLAIN" in str(
        error
    )


def test_xoauth2_sends_the_token(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost(username=USER, auth="xoauth2"), SecretCalls(TOKEN)) as s:
        assert s.info.authenticated == f"XOAUTH2 as {USER}"
    assert smtp_server.auth.initial_responses == [f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode()]
    error = open_fails(smtp_server.smarthost(username=USER, auth="xoauth2"), SecretCalls("expired-token"))
    assert error.stage == "auth" and "535" in str(error) and "status 401" in str(error)


def test_oauthbearer_sends_the_token(smtp_server: SmtpServer) -> None:
    with session(smtp_server.smarthost(username=USER, auth="oauthbearer"), SecretCalls(TOKEN)) as s:
        assert s.info.authenticated == f"OAUTHBEARER as {USER}"
    expected = f"n,a={USER},\x01host=127.0.0.1\x01port={smtp_server.port}\x01auth=Bearer {TOKEN}\x01\x01"
    assert smtp_server.auth.initial_responses == [expected.encode()]
    error = open_fails(smtp_server.smarthost(username=USER, auth="oauthbearer"), SecretCalls("bad"))
    assert error.stage == "auth" and "535" in str(error)


def test_password_fetched_only_when_auth_is_needed(smtp_server: SmtpServer) -> None:
    secret = SecretCalls()
    with SmtpSession(smtp_server.smarthost(), HOSTNAME, secret):
        pass
    assert secret.calls == 0


def test_failing_password_source(smtp_server: SmtpServer) -> None:
    def broken() -> Secret:
        raise CredentialError(
            "127.0.0.1: the password command `pass show x` exited with status 1: no such entry"
        )

    error = open_fails(smtp_server.smarthost(username=USER), broken)
    assert (
        error.stage == "credentials"
        and "cannot get the password" in str(error)
        and "pass show x" in str(error)
    )
    assert smtp_server.auth.attempts == []


def test_default_secret_comes_from_the_password_source(
    smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    smarthost = smtp_server.smarthost(username=USER, password=PasswordSource("env", "PYMTA_TEST_SECRET"))
    attempt = SmtpSession(smarthost, HOSTNAME)
    with pytest.raises(SessionError) as caught:
        attempt.open()
    assert caught.value.stage == "credentials" and "PYMTA_TEST_SECRET is not set" in str(caught.value)
    monkeypatch.setenv("PYMTA_TEST_SECRET", PASSWORD)
    with SmtpSession(smarthost, HOSTNAME) as s:
        assert s.info.authenticated == f"PLAIN as {USER}"


# --- faults ---


def test_connection_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    error = open_fails(make_smarthost(port, security="none"))
    assert error.stage == "connect" and "connection refused" in str(error)
    assert str(error).startswith(f"127.0.0.1[127.0.0.1]:{port}: ")


def test_hang_after_connect_times_out() -> None:
    with ScriptedServer([Hang()]) as server:
        started = time.monotonic()
        error = open_fails(server.smarthost(timeout=0.3))
    assert time.monotonic() - started < 3
    assert (
        error.stage == "greeting"
        and "no greeting within 0.3 s" in str(error)
        and "security: tls" in str(error)
    )


class _HostileServer:
    """A server on 127.0.0.1 that greets with `greeting` bytes sent `pace` seconds apart, then answers
    EHLO with continuation lines until the client hangs up, counting what it sent."""

    def __init__(self, greeting: bytes = b"220 hi\r\n", pace: float = 0.0) -> None:
        import threading

        self.greeting, self.pace, self.lines = greeting, pace, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                for byte in self.greeting if self.pace else [self.greeting]:
                    conn.sendall(bytes([byte]) if self.pace else byte)  # type: ignore[arg-type]
                    time.sleep(self.pace)
                conn.recv(1024)  # EHLO
                while True:
                    conn.sendall(b"250-" + b"x" * 60 + b"\r\n")
                    self.lines += 1
            except OSError:
                return

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


def test_a_reply_that_never_ends_is_cut_off_after_a_bounded_number_of_lines() -> None:
    server = _HostileServer()
    try:
        error = open_fails(make_smarthost(server.port, security="none", timeout=5))
    finally:
        server.close()
    assert "a reply of more than 100 lines to" in str(error) and "pymta hung up" in str(error)
    assert not server.thread.is_alive()  # the client hung up: the server's sends failed


def test_a_reply_dripping_byte_by_byte_is_cut_off_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from pymta.delivery.smtp import replies

    monkeypatch.setattr(replies, "REPLY_TRANSFER_TIME", 0.5)
    server = _HostileServer(b"220 a very slow greeting indeed\r\n", pace=0.2)  # each wait well under timeout
    try:
        error = open_fails(make_smarthost(server.port, security="none", timeout=1))
    finally:
        server.close()
    assert "no complete reply within 1.5 s" in str(error), error


def test_a_last_reply_line_without_its_crlf_before_the_close_is_still_read() -> None:
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"421 4.3.2 going down now")  # no CRLF, then the close

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        error = open_fails(make_smarthost(listener.getsockname()[1], security="none", timeout=5))
    finally:
        thread.join(timeout=10)
        listener.close()
    assert "421 4.3.2 going down now" in str(error), error


def test_a_greeting_without_a_code_is_quoted_whole() -> None:
    with ScriptedServer([Send("OK thanks, I am not SMTP"), Close()]) as server:
        error = open_fails(server.smarthost())
    assert "OK thanks, I am not SMTP" in str(error) and "hanks" not in str(error).replace("thanks", ""), error


def test_421_greeting() -> None:
    with ScriptedServer([Send("421 4.3.2 too busy, try later"), Close()]) as server:
        error = open_fails(server.smarthost())
    assert error.stage == "greeting" and "refused the session: 421 4.3.2 too busy" in str(error)


def test_no_answer_to_the_end_of_the_text_says_the_server_may_have_it() -> None:
    script = [*greet(), Expect("MAIL"), Send("250 ok"), Expect("RCPT"), Send("250 ok"), Expect("DATA"),
              Send("354 go"), Hang()]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost(timeout=5, data_timeout=0.3)) as s:
        with pytest.raises(SessionError) as caught:
            s.send("me@example.org", ["a@example.org"], MESSAGE)
    error = caught.value
    assert error.stage == "closed" and "no answer to the end of the message text within 0.3 s" in str(error)
    assert "the smarthost may already have the message" in str(error) and "data_timeout" in str(error)
    assert error.outcome_unknown and not error.reconnect and not error.untouched
    assert "\n" not in str(error)


def test_the_end_of_the_text_may_take_longer_than_a_command(plain_server: SmtpServer) -> None:
    # A content scanner answers the final dot after more than `timeout`: RFC 5321 4.5.3.2.6 allows 10 min.
    plain_server.handler.slow = {"a@example.org": 2.5}
    with session(plain_server.smarthost(timeout=1)) as s:
        [outcome] = s.send("me@example.org", ["a@example.org"], MESSAGE)
    assert outcome.status == "delivered" and outcome.reply == "250 2.0.0 OK: queued as 1"
    assert len(plain_server.handler.messages) == 1


class _SlowReader:
    """A plain SMTP server on 127.0.0.1 that takes one message, reading its text `block` bytes at a time,
    `pace` seconds apart: a slow link, where the text moves all along but takes longer than the timeout
    to arrive."""

    def __init__(self, block: int = 16384, pace: float = 0.02) -> None:
        import threading

        self.block, self.pace, self.received = block, pace, 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, block)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        with conn:
            try:
                conn.sendall(b"220 slow ESMTP\r\n")
                for reply in (b"250 slow\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
                    conn.recv(1024)  # EHLO, MAIL, RCPT, DATA, one at a time (no PIPELINING)
                    conn.sendall(reply)
                tail = b""
                while not tail.endswith(b"\r\n.\r\n"):
                    chunk = conn.recv(self.block)
                    if not chunk:
                        return
                    self.received += len(chunk)
                    tail = (tail + chunk)[-5:]
                    time.sleep(self.pace)
                conn.sendall(b"250 2.0.0 all of it\r\n")
                conn.recv(1024)  # QUIT
                conn.sendall(b"221 bye\r\n")
            except OSError:
                return

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.listener.close()


def test_a_long_text_on_a_slow_link_may_take_longer_than_the_timeout_while_it_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `timeout` bounds each block of the text (RFC 5321 4.5.3.2.5), not the whole of it: sendall's
    # timeout covered the whole call, so a large message on a slow uplink could never be sent.
    from pymta.delivery.smtp import replies

    connect = replies.Client._tcp_connect

    def small_buffers(client: replies.Client, host: str, port: int, timeout: float) -> socket.socket:
        sock = connect(client, host, port, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # a link's buffers, not loopback's 4 MB
        return sock

    monkeypatch.setattr(replies.Client, "_tcp_connect", small_buffers)
    # 1.5 MB: at most 16 kB each 20 ms is read, so it cannot arrive within the 1 s timeout
    message = MESSAGE + (b"x" * 76 + b"\r\n") * 20000
    server = _SlowReader()
    try:
        with session(make_smarthost(server.port, security="none", timeout=1)) as s:
            [outcome] = s.send("me@example.org", ["a@example.org"], message)
    finally:
        server.close()
    assert outcome.status == "delivered" and outcome.reply == "250 2.0.0 all of it"
    assert server.received >= len(message)


def test_close_mid_data() -> None:
    script = [*greet(), Expect("MAIL"), Send("250 ok"), Expect("RCPT"), Send("250 ok"), Expect("DATA"),
              Send("354 go"), Close()]  # fmt: skip
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        with pytest.raises(SessionError) as caught:
            s.send("me@example.org", ["a@example.org"], MESSAGE * 1000)
    assert caught.value.stage == "closed" and "DATA" in str(caught.value)


def test_421_in_the_middle_of_a_transaction() -> None:
    script = [
        *greet(),
        Expect("MAIL"),
        Send("250 ok"),
        Expect("RCPT"),
        Send("421 4.3.0 shutting down"),
        Close(),
    ]
    with ScriptedServer(script) as server, session(server.smarthost()) as s:
        with pytest.raises(SessionError) as caught:
            s.send("me@example.org", ["a@example.org"], MESSAGE)
    assert caught.value.stage == "closed" and caught.value.reply == "421 4.3.0 shutting down"
    assert not s.is_open


# --- secrets never leak ---


def _forms(secret: str, user: str = USER) -> list[str]:
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    return [
        secret,
        b64(secret),
        b64(f"\0{user}\0{secret}"),
        b64(f"user={user}\x01auth=Bearer {secret}\x01\x01"),
        secret.encode().hex(),
    ]


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def test_password_appears_in_no_error_or_log(
    certificates: Certificates, smtp_server: SmtpServer, everything_logged: pytest.LogCaptureFixture
) -> None:
    texts: list[str] = []

    def record(error: BaseException) -> None:
        texts.extend([str(error), repr(error), "".join(traceback.format_exception(error))])

    for mechanism in ("plain", "login", "cram-md5"):
        with session(smtp_server.smarthost(username=USER, auth=mechanism)) as s:
            texts += [repr(s), repr(s.info), str(s.info)]
            s.send("me@example.org", ["a@example.org"], MESSAGE)
    for mechanism, secret in (
        ("plain", "wrong-" + PASSWORD),
        ("login", "wrong-" + PASSWORD),
        ("xoauth2", PASSWORD),
    ):
        try:
            session(smtp_server.smarthost(username=USER, auth=mechanism), SecretCalls(secret)).open()
        except SessionError as error:
            record(error)
    with ScriptedServer(
        [*greet(("AUTH PLAIN LOGIN",)), Expect("AUTH"), Send("535 5.7.8 bad"), Close()]
    ) as server:
        try:
            session(server.smarthost(username=USER, auth_plaintext=True)).open()
        except SessionError as error:
            record(error)
    # A server that echoes what it got must not make us repeat it.
    echo = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with ScriptedServer(
        [*greet(("AUTH PLAIN",)), Expect("AUTH"), Send(f"535 5.7.8 cannot decode {echo}")]
    ) as server:
        try:
            session(server.smarthost(username=USER, auth_plaintext=True)).open()
        except SessionError as error:
            record(error)
            assert "cannot decode ********" in str(error)
    texts += [repr(Secret(PASSWORD)), str(Secret(PASSWORD)), f"{Secret(PASSWORD)}"]
    texts += [record.getMessage() for record in everything_logged.records]
    texts.append(everything_logged.text)
    assert len(texts) > 20
    leaked = [
        form for form in _forms(PASSWORD) + _forms("wrong-" + PASSWORD) if any(form in t for t in texts)
    ]
    assert leaked == []
