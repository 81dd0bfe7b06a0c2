"""One SMTP session with a smarthost, on smtplib: connect, TLS, AUTH, and a result for every recipient.

    with SmtpSession(smarthost, hostname=config.hostname) as session:   # connect, EHLO, TLS, EHLO, AUTH
        outcomes = session.send(sender, recipients, message_bytes)       # one RecipientOutcome per recipient

One session carries many messages: RSET goes before every message but the first. When the server offers
PIPELINING (RFC 2920), RSET, MAIL, every RCPT and DATA go out in one write, and a message costs two round
trips: its commands, and its text. A caller with many messages starts the next one before it finishes the
current one (`start()`, then `finish()` in the same order): the next message's commands then ride in the
write of the current one's text, behind its final dot, and a message costs one round trip. The current
message's final reply is read and returned before any of the next one's text is sent, so the caller records
it first (ARCHITECTURE.md invariant 3); nothing of a message is delivered before its text has gone out.

Each wait has its limit, as RFC 5321 4.5.3.2 gives each step its own: `timeout` (short) for the
connection, the greeting, each command's reply and each block of text sent; `data_timeout` (10 minutes by
default) for the reply to the final dot, which a server may send only after scanning the message. When
that reply never comes the outcome is unknown, and the error says that the smarthost may already have
the message (`SessionError.outcome_unknown`).

Results are values, failures of the session are exceptions. `send()` returns, per recipient, `delivered` (the
server said 250 to DATA), `deferred` (a 4xx to MAIL, RCPT or DATA) or `failed` (a 5xx), with the server's
reply. Anything that ends the session (no connection, a timeout, TLS or certificate trouble, a pin
mismatch, STARTTLS or AUTH missing or refused, a password source failing, 421, the connection lost) raises
`SessionError`, one line that says what failed, why and what to do. The caller defers on it.

ESMTP parameters are sent only when the server offers them: SIZE; BODY=8BITMIME for a message with 8-bit
bytes (without 8BITMIME the message is converted to 7-bit first, `mail.downgrade`); SMTPUTF8 when a local
part is non-ASCII or a header field holds raw UTF-8; NOTIFY, RET, ENVID and ORCPT (xtext, RFC 3461) with DSN.
An international domain goes as its A-label (IDNA 2008, `mail.idn`) unless the transaction uses SMTPUTF8;
what cannot be expressed without SMTPUTF8 (a non-ASCII local part, a domain that is not valid IDNA) fails
with 553 5.6.7, as RFC 6531 and Postfix do: no smarthost setting can make it deliverable there.

A server that wants AUTH from a client that did not log in (530 at MAIL or RCPT) ends the session with
the fix (`explain.auth_wanted`): the admin's mistake defers the mail, it never bounces it.

Connecting, TLS and AUTH, and their invariants, are `connection.Connection`'s, under this class.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from pymta.delivery.smtp.commands import check_arguments, command_lines, doing, join
from pymta.delivery.smtp.connection import Connection
from pymta.delivery.smtp.data import DataEncoder
from pymta.delivery.smtp.explain import auth_wanted, auth_wanted_reason, unanswered
from pymta.delivery.smtp.outcome import RecipientOutcome, SessionError, known_status, status_of
from pymta.delivery.smtp.replies import transaction_reply
from pymta.mail.downgrade import downgrade
from pymta.mail.idn import wire_address
from pymta.mail.linefit import fit_line_length
from pymta.mail.text import BLOCK, Text, UnreadableText
from pymta.records import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pymta.config.model import Smarthost
    from pymta.delivery.credentials import Secret


# RFC 6531 3.4: a non-ASCII local part cannot go to a server without SMTPUTF8, nor a domain that has no
# A-label; the message is undeliverable there (Postfix bounces with the same code). Down-conversion of
# addresses (RFC 6857) is not attempted.
SMTPUTF8_MISSING_REPLY = "553 5.6.7 {address}: {what}, and the smarthost does not offer SMTPUTF8"
NON_ASCII_LOCAL_PART = "non-ASCII local part"
NOT_IDNA = "the domain is not a valid international domain name (IDNA 2008)"


@record(eq=False, slots=True)
class Transaction:
    """A message started on a session (`SmtpSession.start`) and not finished yet."""

    recipients: list[str]  # as given to start(), in order
    outcomes: dict[str, RecipientOutcome]  # decided so far; those known without the server at start
    pending: list[str] = field(default_factory=list)  # the recipients that go to the server
    message: Text = field(default_factory=lambda: Text(b""))
    mail: str = ""  # the MAIL command
    rcpts: list[str] = field(default_factory=list)  # the RCPT commands, one per pending recipient
    reset: bool = False  # RSET goes first: a message went before on this connection
    pipelined: bool = False  # the server offers PIPELINING
    encoding: str = "ascii"  # of the commands: utf-8 with SMTPUTF8
    written: bool = False  # the commands went out
    lost: bool = False  # the connection ended before this message was finished: start it again


# --- The session ---


class SmtpSession(Connection):
    """One connection to a smarthost, reusable for many messages (RSET between them); opening it and its
    failures are `Connection`'s."""

    def __init__(
        self,
        smarthost: Smarthost,
        hostname: str,
        secret: Callable[[], Secret] | None = None,
    ) -> None:
        super().__init__(smarthost, hostname, secret)
        self._transactions = 0
        self._started: list[Transaction] = []  # started and not finished, oldest first

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes | Text,
        *,
        notify: str | None = None,
        ret: str | None = None,
        envid: str | None = None,
        body_type: str | None = None,
        expanded: Collection[str] = (),
    ) -> list[RecipientOutcome]:
        """Send one message; one outcome per recipient, in the order given.

        `message` (bytes, or a `Text` read from the spool as it is sent) has CRLF line endings and is not
        dot-stuffed. `notify` ("never" or a comma list of
        success, failure, delay), `ret` ("hdrs"/"full") and `envid` go out as DSN parameters when the
        server offers DSN, `body_type` ("8BITMIME"/"7BIT") asks for BODY=8BITMIME (which is also used
        whenever the message has 8-bit bytes and the server offers it). The `expanded` recipients are the
        targets of an alias: their NOTIFY leaves out SUCCESS (RFC 3461 5.2.7.3), since the address the
        sender named was reported as expanded, and the targets are not the sender's to know.

        Raises SessionError when the session fails (see the class), ValueError before sending anything
        when an argument cannot be carried by SMTP (CR, LF, <, > in an address; an unknown NOTIFY word).
        """
        if self._started:
            raise RuntimeError("a started message must be finished first")
        return self.finish(
            self.start(
                sender,
                recipients,
                message,
                notify=notify,
                ret=ret,
                envid=envid,
                body_type=body_type,
                expanded=expanded,
            )
        )

    def start(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes | Text,
        *,
        notify: str | None = None,
        ret: str | None = None,
        envid: str | None = None,
        body_type: str | None = None,
        expanded: Collection[str] = (),
    ) -> Transaction:
        """Start one message (arguments as for `send()`); `finish()` sends it and gives the outcomes.

        Nothing is sent here. Messages are finished in the order they were started; a message started
        while an earlier one is not finished has its commands sent behind that one's text (see the module
        docstring). Raises ValueError as `send()` does; failures of the session come from `finish()`.
        """
        client = self._require_open()
        params = check_arguments(sender, recipients, notify, ret, envid)
        text = message if isinstance(message, Text) else Text(message)
        if text.has_long_lines():  # a line over 998 octets would be refused, and the mail bounced
            text = Text(fit_line_length(text.whole()))
        features = client.esmtp_features
        dsn = "dsn" in features
        wire = {address: wire_address(address) for address in (sender, *recipients)}  # domains as A-labels
        head_utf8 = not text.header_isascii()
        needs_utf8 = head_utf8 or not all(address.isascii() for address in wire.values())
        utf8 = needs_utf8 and "smtputf8" in features
        if utf8:  # the server takes addresses as people write them
            wire = {address: address for address in wire}
        outcomes: dict[str, RecipientOutcome] = {}
        for recipient in recipients if not utf8 else ():
            address = sender if not wire[sender].isascii() else recipient
            if not wire[address].isascii():
                what = NON_ASCII_LOCAL_PART if not address.rpartition("@")[0].isascii() else NOT_IDNA
                outcomes[recipient] = RecipientOutcome(
                    recipient, "failed", SMTPUTF8_MISSING_REPLY.format(address=address, what=what)
                )
        pending = [r for r in dict.fromkeys(recipients) if r not in outcomes]
        if not pending:
            return Transaction(list(recipients), outcomes)
        text = _for_server(text, features, utf8=utf8)

        mail_params = []
        if "size" in features:
            mail_params.append(f"SIZE={len(text)}")
        if "8bitmime" in features and (utf8 or body_type == "8BITMIME" or not text.isascii()):
            mail_params.append("BODY=8BITMIME")
        if utf8:
            mail_params.append("SMTPUTF8")
        if dsn:
            mail_params += params.mail
        mail = f"MAIL FROM:<{wire[sender]}>{join(mail_params)}"
        rcpts = [
            f"RCPT TO:<{wire[r]}>{join(params.for_recipient(r, expanded) if dsn else [])}" for r in pending
        ]
        reset = self._transactions > 0
        self._transactions += 1
        transaction = Transaction(
            list(recipients),
            outcomes,
            pending,
            text,
            mail,
            rcpts,
            reset=reset,
            pipelined="pipelining" in features,
            encoding="utf-8" if utf8 else "ascii",
        )
        self._started.append(transaction)
        return transaction

    def finish(
        self, transaction: Transaction, *, while_waiting: Callable[[], None] | None = None
    ) -> list[RecipientOutcome]:
        """Send a started message; one outcome per recipient, in the order given to `start()`.

        `while_waiting`, if given, is called once the text (with the commands of the message started behind
        it) is written and before its reply is read: local work that overlaps the round trip. It must not
        raise, and must neither send nor record anything.

        Raises SessionError as `send()` does. When the connection ended before anything of this message
        was sent (a failure while finishing the one before it), the error says `reconnect` and the
        transaction is `lost`: start the message again, on this session reopened or another one.
        """
        outcomes = transaction.outcomes
        recipients = transaction.recipients
        if not transaction.pending:
            return [outcomes[r] for r in recipients]
        if transaction.lost:
            raise SessionError(
                self.relay,
                "the connection ended before this message was sent; try again later",
                stage="closed",
                reconnect=True,
            )
        if not self._started or self._started[0] is not transaction:
            raise RuntimeError("started messages are finished in the order they were started")
        client = self._require_open()
        client.command_encoding = transaction.encoding
        pending, message, reset = transaction.pending, transaction.message, transaction.reset

        # RSET before every message but the first. With PIPELINING (RFC 2920) RSET, MAIL, every RCPT and DATA
        # go out in one write (DATA may end a group), often behind the text of the message before; a message
        # then costs one or two round trips. A plain smtplib loop needs 3 + recipients.
        pipelining = transaction.pipelined
        lines = [transaction.mail, *transaction.rcpts, "DATA"] if pipelining else [transaction.mail]
        replies = self._exchange(lines, reset=reset, written=transaction.written)
        transaction.written = True
        code, reply = replies[0]
        if auth_wanted(code, reply):
            raise self._auth_wanted(reply, "MAIL FROM")
        status = known_status(code)
        if status != "delivered":  # with PIPELINING the RCPTs and DATA were answered too (503): moot
            if pipelining and replies[-1][0] == 354:
                self._data(Text(b""))  # the server took DATA anyway; end the empty transaction
            outcomes.update((r, RecipientOutcome(r, status, reply)) for r in pending)
            return self._finished(transaction)
        rcpt_replies = (
            replies[1:-1] if pipelining else [self._exchange([line])[0] for line in transaction.rcpts]
        )

        accepted = []
        for recipient, (code, reply) in zip(pending, rcpt_replies, strict=True):
            if auth_wanted(code, reply):
                raise self._auth_wanted(reply, "RCPT TO")
            status = known_status(code)
            if status == "delivered":
                accepted.append(recipient)
            else:
                outcomes[recipient] = RecipientOutcome(recipient, status, reply)
        if pipelining:
            code, reply = replies[-1]
        elif accepted:
            code, reply = self._command("DATA", "", "DATA")
        if code == 354:
            if not accepted:  # every RCPT refused, yet the server wants the text: send none (RFC 2920 3.1)
                self._data(Text(b""))
                return self._finished(transaction)
            code, reply = self._data(message, while_waiting)
        elif accepted and status_of(code) == "delivered":
            raise self._fail("protocol", f"the server answered DATA with {reply}, not 354", reply=reply)
        if accepted:
            status = known_status(code)
            outcomes.update((r, RecipientOutcome(r, status, reply)) for r in accepted)
        return self._finished(transaction)

    def probe(self, sender: str, recipient: str) -> tuple[str, str | None]:
        """MAIL FROM `sender` and RCPT TO `recipient` as a message would send them, then RSET: what a
        delivery will meet, sending nothing (`pymta test`). The replies to MAIL and to RCPT (None when
        MAIL was refused). Raises SessionError as `send()` does, a server wanting AUTH included."""
        client = self._require_open()
        wire = [wire_address(sender), wire_address(recipient)]
        utf8 = not all(address.isascii() for address in wire) and "smtputf8" in client.esmtp_features
        client.command_encoding = "utf-8" if utf8 else "ascii"
        if utf8:
            wire = [sender, recipient]
        replies: list[str] = []
        for verb, arguments, step in (
            ("MAIL", f"FROM:<{wire[0]}>{' SMTPUTF8' if utf8 else ''}", "MAIL FROM"),
            ("RCPT", f"TO:<{wire[1]}>", "RCPT TO"),
        ):
            code, reply = self._command(verb, arguments, step)
            if auth_wanted(code, reply):
                raise self._auth_wanted(reply, step)
            replies.append(reply)
            if status_of(code) != "delivered":
                break
        self._command("RSET", "", "RSET")
        return replies[0], replies[1] if len(replies) > 1 else None

    def _auth_wanted(self, reply: str, step: str) -> SessionError:
        """The server wants a login at MAIL or RCPT: the config's to fix, so every message waits; nothing of
        this one was sent (another smarthost may take it)."""
        failure = self._fail("auth", auth_wanted_reason(reply, step, self.smarthost), reply=reply)
        failure.untouched = True
        return failure

    def _finished(self, transaction: Transaction) -> list[RecipientOutcome]:
        self._started.pop(0)
        return [transaction.outcomes[r] for r in transaction.recipients]

    def __repr__(self) -> str:
        return f"<SmtpSession {self.relay} {'open' if self.is_open else 'closed'}>"

    # -- transactions --

    def _exchange(
        self, lines: Sequence[str], *, reset: bool = False, written: bool = False
    ) -> list[tuple[int, str]]:
        """Send `lines` (with RSET first when `reset`) in one write and read one reply per line; `written`:
        they went out already, behind the text of the message before (`_data`), and are only read.

        The replies are 2xx, 4xx or 5xx; anything else, a 421 or a lost connection raises SessionError.
        When the server turns out to be gone at the RSET (closed the idle connection, or 421), the error
        says `reconnect`: nothing of this message reached it. Every error here is `untouched`: the message's
        text is sent only after these commands.
        """
        client = self._require_open()
        commands = ["RSET", *lines] if reset else list(lines)
        if not written:
            try:
                client.send(command_lines(commands, client.command_encoding))
            except Exception as error:
                failure = self._network_failure(error, doing(commands[0]))
                failure.reconnect, failure.untouched = reset, True
                raise failure from error
        replies = []
        for index, command in enumerate(commands):
            at_reset = reset and index == 0
            try:
                code, message = client.getreply()
            except Exception as error:
                failure = self._network_failure(error, doing(command))
                failure.reconnect, failure.untouched = at_reset, True
                raise failure from error
            if at_reset and code == 250:
                continue
            reply = transaction_reply(code, message)
            if code == 421:
                failure = self._closed(reply, doing(command))
            elif at_reset:
                failure = self._fail("protocol", f"the server answered RSET with {reply}", reply=reply)
            elif status_of(code) is None and not (code == 354 and command == "DATA"):
                failure = self._fail(
                    "protocol", f"unexpected reply to {doing(command)}: {reply!r}", reply=reply
                )
            else:
                replies.append((code, reply))
                continue
            failure.reconnect, failure.untouched = at_reset and code == 421, True
            raise failure
        return replies

    def _command(self, verb: str, arguments: str, doing: str) -> tuple[int, str]:
        """Send one command, read its reply; a 421, a lost connection or a timeout raise SessionError."""
        client = self._require_open()
        try:
            code, message = client.docmd(verb, arguments)
        except Exception as error:
            raise self._network_failure(error, doing) from error
        reply = transaction_reply(code, message)
        if code == 421:
            raise self._closed(reply, doing)
        if status_of(code) is None and code != 354:
            raise self._fail("protocol", f"unexpected reply to {doing}: {reply!r}", reply=reply)
        return code, reply

    def _data(self, message: Text, while_waiting: Callable[[], None] | None = None) -> tuple[int, str]:
        """Send the text of the first started message and read the reply to its end; the commands of the
        message started behind it go out in the same write (the module docstring says why that is safe).
        `while_waiting` runs between the write and the read (`finish`).

        A small message goes out in one write with its end and those commands. A larger one is read from
        the spool and sent block by block (`data.DataEncoder`), never held whole. When the spool file cannot
        be read on the way, the connection is dropped without the final dot, so the server discards what
        it got, and UnreadableText goes up (the flush defers that message): nothing of it was delivered."""
        client = self._require_open()
        encoder = DataEncoder()
        try:
            if len(message) <= BLOCK:  # one write: the text, its end and the next message's commands
                text = encoder.encode(message.whole())
                client.send(b"".join((text, encoder.finish(), self._commands_behind())))
            else:
                for block in message.blocks():
                    client.send(encoder.encode(block))
                client.send(b"".join((encoder.finish(), self._commands_behind())))
        except UnreadableText:
            self._abort()  # no final dot: the server drops the part it got
            raise
        except Exception as error:
            raise self._network_failure(error, "the message text (DATA)") from error
        if while_waiting is not None:
            while_waiting()
        try:
            code, reply_bytes = client.getreply(self.smarthost.data_timeout)  # RFC 5321 4.5.3.2.6
        except Exception as error:
            raise self._unanswered_text(error) from error
        reply = transaction_reply(code, reply_bytes)
        if code == 421:
            raise self._closed(reply, "the end of DATA")
        if status_of(code) is None:
            raise self._fail("protocol", f"unexpected reply to the end of DATA: {reply!r}", reply=reply)
        return code, reply

    def _commands_behind(self) -> bytes:
        """The commands of the message started after the one whose text is going out, if the server takes
        them pipelined (marked as sent); b"" when there is none (or they cannot be encoded: then `_exchange`
        reports that when that message is finished)."""
        if len(self._started) < 2:
            return b""
        following = self._started[1]
        if not following.pipelined or following.written or following.lost:
            return b""
        lines = [following.mail, *following.rcpts, "DATA"]
        try:
            data = command_lines(["RSET", *lines] if following.reset else lines, following.encoding)
        except UnicodeError:
            return b""
        following.written = True
        return data

    def _forget_started(self) -> bool:
        """Mark the started messages lost (the connection is going); True when one had commands sent."""
        started, self._started = self._started, []
        self._transactions = 0
        for transaction in started:
            transaction.lost = True
        return any(transaction.written for transaction in started)

    def _unanswered_text(self, error: BaseException) -> SessionError:
        """The text went out and the answer to its end never came (`explain.unanswered`)."""
        failure = self._fail("closed", unanswered(error, self.smarthost.data_timeout))
        failure.outcome_unknown = True
        return failure


def _for_server(message: Text, features: Collection[str], *, utf8: bool) -> Text:
    """The message as this server can take it: converted to 7-bit (`mail.downgrade`) only when it has 8-bit
    bytes the server did not agree to (no 8BITMIME; raw UTF-8 header fields without SMTPUTF8); else the
    same bytes. The one place delivery changes a message's encoding."""
    if message.isascii():
        return message
    body = "8bitmime" not in features
    headers = not utf8 and not message.header_isascii()
    if not (body or headers):
        return message
    return Text(downgrade(message.whole(), body=body, headers=headers))  # whole: rare, and never streamed
