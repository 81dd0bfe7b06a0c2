"""SMTP on standard input and output (`sendmail -bs`): the server side of RFC 5321, for local programs only.

Symfony Mailer, SwiftMailer and Laravel run `sendmail -bs` and speak SMTP to it over pipes. With the systemd
socket unit in examples/ (`pymta-smtpd.socket`, Accept=yes, bound to 127.0.0.1:25 and [::1]:25 only), programs
that can only speak SMTP to localhost:25 (monit, rsyslog's ommail, AIDE) get one `sendmail -bs` per
connection, with the connection as its standard input and output. This module has no network code at all: it
reads one file descriptor and writes another. It never relays and never opens a socket; it only queues
(ARCHITECTURE.md invariants 5 and 9).

Every message is queued by the `queue` function it is handed, which is plain sendmail's `submit()`: the
same `prepare_submission`, the same envelope (submitted_by is the real user running this process), the same
`Spool.submit` and background flush. `250 2.0.0 Ok: queued as ID` is said only once that commit is durable
(invariant 1); a message cut off (end of input or a timeout inside DATA) is never queued.

The dialogue, with the enhanced status codes of RFC 2034 (not on the greeting, EHLO/HELO and 354):

    220 HOST ESMTP pymta                      greeting
    EHLO name   250 HOST + PIPELINING, SIZE n, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES
    HELO name   250 HOST                       (both also reset the transaction; 501 without a name)
    MAIL FROM:<addr> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]
                250 2.1.0 | 503 5.5.1 nested | 501 5.5.4 syntax | 553 5.1.7 bad address | 552 5.3.4 SIZE too
                big | 555 5.5.4 unknown parameter | 553 5.6.7 non-ASCII address without SMTPUTF8
                | 452 4.3.1 the user has max_queued_per_user messages waiting (system mode)
    RCPT TO:<addr>   250 2.1.5 | 503 5.5.1 no MAIL | 553 5.1.3 bad address | 452 4.5.3 too many recipients
    DATA        354, then the text to CRLF.CRLF: 250 2.0.0 queued as ID | 552 5.3.4 too big
                | 552 5.6.0 a line over 998 octets | 503 5.5.1 no MAIL or no RCPT
                | 451 4.3.0 / 452 4.3.1 the spool failed, or max_queued_per_user was reached meanwhile
                (with the reason; the session goes on)
    RSET 250 2.0.0 · NOOP 250 2.0.0 · VRFY 252 2.0.0 · HELP 214 2.0.0 · QUIT 221 2.0.0 (and the end)
    EXPN, STARTTLS, AUTH, BDAT, ETRN... 502 5.5.1 · anything else 500 5.5.2
    a command line over 2048 octets 500 5.5.2
    MAX_ERRORS 5xx replies, an HTTP request or a header line as a command: 421 4.7.0 and the end
    nothing read for IDLE_TIMEOUT: 421 4.4.2 and the end

SMTP smuggling: only <CR><LF>.<CR><LF> ends DATA. Lines ending in a bare LF are accepted (and stored with
CRLF, as everything pymta queues), but a `.` line after or before a bare LF is message text, so a sender
cannot hide a second message behind an end of data that another server would see differently.

Reading is buffered, so pipelined commands (RFC 2920) are answered in order; replies are held until no
further input is waiting, then written together.
"""

from __future__ import annotations

import os
import select

from pymta.config import paths
from pymta.config.limits import DEFAULT_MAX_MESSAGE_SIZE, parse_size
from pymta.errors import (
    EX_CANTCREAT,
    EX_OK,
    EX_TEMPFAIL,
    AddressError,
    PymtaError,
    SpoolFullError,
    UsageError,
)
from pymta.mail.address import parse_envelope_address, parse_list, recipient_addrs

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from pymta.submission.invocation import Invocation

# Seconds without input before the session ends with 421 (RFC 5321 4.5.3.2.7 asks for at least 5 minutes).
IDLE_TIMEOUT = 300.0
# Octets of a command line with its CRLF: RFC 5321 4.5.3.1.4 says 512; extensions need more (Postfix: 2048).
COMMAND_LINE_LIMIT = 2048
# Octets of a line of message text with its CRLF (RFC 5321 4.5.3.1.6): 998 and the line ending.
TEXT_LINE_LIMIT = 1000
# Recipients per message: RFC 5321 4.5.3.1.8 asks for at least 100; more get 452 and go in another message.
MAX_RECIPIENTS = 1000
# 5xx replies before the session is closed with 421: a confused or hostile client (Postfix: 20 too).
MAX_ERRORS = 20
# The message size limit when the config sets no max_message_size.
DEFAULT_MAX_SIZE = DEFAULT_MAX_MESSAGE_SIZE

_READ_SIZE = 1 << 16
# Commands of other protocols: a web page or a confused proxy talking to localhost:25 (Postfix refuses them).
_FORBIDDEN = frozenset(("GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"))
_NOT_IMPLEMENTED = frozenset(
    ("EXPN", "STARTTLS", "AUTH", "BDAT", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML")
)
_HELP = "commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT; see sendmail(8)"


# The input ended inside DATA: the message is incomplete, so nothing of it is queued.
INCOMPLETE_DATA = (
    "the input ended inside DATA, so that message was not queued; DATA ends with a line holding only "
    "'.' after CR LF (a line ending in a bare LF does not end it)"
)


class _SessionEndError(Exception):
    """The session is over; `code` is the exit status, `reason` a line for stderr when the caller should
    know why."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.reason = reason


class _ClientTimeoutError(Exception):
    """Nothing arrived for the idle timeout."""


class _ReplyError(Exception):
    """A command is answered with an error: raised inside a handler, written by the dispatcher."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _Input:
    """Buffered lines from a file descriptor, waiting at most `timeout` seconds for each piece of input."""

    def __init__(self, fd: int, timeout: float, before_wait: Callable[[], None]) -> None:
        self.fd = fd
        self.timeout_ms = max(1, int(timeout * 1000))
        self.before_wait = before_wait  # called before blocking: pending replies go out first
        self.buffer = bytearray()
        self.eof = False
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)

    def _fill(self) -> bool:
        """Read more input into the buffer; False at the end of input. Raises _ClientTimeoutError."""
        while not self.eof:
            if not self.poller.poll(0):
                self.before_wait()
                if not self.poller.poll(self.timeout_ms):
                    raise _ClientTimeoutError
            try:
                chunk = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                continue  # a non-blocking descriptor woke up without data
            except OSError:
                chunk = b""  # a reset connection, a closed descriptor: the end of input
            if chunk:
                self.buffer += chunk
                return True
            self.eof = True
        return False

    def readline(self, limit: int) -> tuple[bytes, bool]:
        """The next line with its LF, and False; (b"", False) at the end of input (an unterminated last
        piece is dropped). A line of more than `limit` octets is read to its LF and discarded: its line
        ending alone (b"\\r\\n" or b"\\n") is returned, with True."""
        overlong = False
        cr_last = False  # whether the discarded part ended in CR
        scanned = 0
        while True:
            newline = self.buffer.find(b"\n", scanned)
            if newline >= 0:
                if overlong or newline + 1 > limit:
                    cr = self.buffer[newline - 1] == 0x0D if newline else cr_last
                    del self.buffer[: newline + 1]
                    return (b"\r\n" if cr else b"\n"), True
                line = bytes(self.buffer[: newline + 1])
                del self.buffer[: newline + 1]
                return line, False
            if len(self.buffer) > limit:
                overlong = True
                cr_last = self.buffer[-1] == 0x0D
                self.buffer.clear()
            scanned = len(self.buffer)
            if not self._fill():
                return b"", False


class _Output:
    """Replies, held until the session would wait for input (or ends), then written at once."""

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd = fd
        self.timeout_ms = max(1, int(timeout * 1000))
        self.pending: list[bytes] = []

    def add(self, line: str) -> None:
        self.pending.append(line.encode("ascii", "backslashreplace") + b"\r\n")

    def flush(self) -> None:
        """Write what is pending. Raises _SessionEndError when the client is gone."""
        if not self.pending:
            return
        view = memoryview(b"".join(self.pending))
        self.pending.clear()
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                poller = select.poll()
                poller.register(self.fd, select.POLLOUT)
                if not poller.poll(self.timeout_ms):
                    raise _SessionEndError(EX_TEMPFAIL) from None
                continue
            except OSError:
                raise _SessionEndError(EX_TEMPFAIL) from None
            view = view[written:]


def _clean(text: str, limit: int = 400) -> str:
    """`text` as the text of one reply line: no line breaks or control characters, not too long."""
    text = "".join(" " if ord(char) < 32 or ord(char) == 127 else char for char in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _closing_bracket(text: str) -> int:
    """The index of the '>' that closes the '<' at text[0], skipping quoted strings; -1 when there is none."""
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
        index += 1
    return -1


def _path_and_params(argument: str, keyword: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Split `FROM:<path> KEY=VALUE ...` (or TO:) into the path, with its angle brackets, and the parameters.

    Lenient as Postfix is by default: a space after the colon and a path without <> are accepted.
    """
    head = keyword + ":"
    if argument[: len(head)].upper() != head:
        raise _ReplyError(501, f"5.5.4 Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
    rest = argument[len(head) :].lstrip(" ")
    if rest.startswith("<"):
        close = _closing_bracket(rest)
        if close < 0:
            raise _ReplyError(501, "5.5.4 Syntax: unterminated <address>")
        path, params_text = rest[: close + 1], rest[close + 1 :]
        if params_text and not params_text.startswith(" "):
            raise _ReplyError(501, "5.5.4 Syntax: a space must follow <address>")
    else:
        bare, _, params_text = rest.partition(" ")
        if not bare:
            raise _ReplyError(501, f"5.5.4 Syntax: no address after {keyword}:")
        path = f"<{bare}>"
    params: list[tuple[str, str | None]] = []
    for word in params_text.split(" "):
        if word:
            key, equals, value = word.partition("=")
            params.append((key.upper(), value if equals else None))
    return path, params


def _sender(path: str) -> str:
    """The envelope sender of a MAIL FROM path ("" for <>), checked as `sendmail -f` checks it."""
    try:
        return parse_envelope_address(path)
    except AddressError as exc:
        raise _ReplyError(553, f"5.1.7 bad sender address {path}: {exc}") from None


def _recipient(path: str) -> str:
    """The one recipient of a RCPT TO path, checked as sendmail's command-line recipients are."""
    try:
        mailboxes = parse_list(path)
        if len(mailboxes) != 1:
            raise AddressError("give one address per RCPT TO")
        return recipient_addrs(mailboxes, path)[0]
    except AddressError as exc:
        raise _ReplyError(553, f"5.1.3 bad recipient address {path}: {exc}") from None


class Session:
    """One SMTP session on a pair of file descriptors; every message goes to `queue`."""

    def __init__(
        self,
        input_fd: int,
        output_fd: int,
        *,
        hostname: str,
        max_size: int,
        queue: Callable[[str, list[str], str | None, bytes], str],
        timeout: float = IDLE_TIMEOUT,
        refusal: Callable[[], str | None] | None = None,
    ) -> None:
        self.hostname = hostname
        self.timeout = timeout
        self.max_size = max_size
        self.queue = queue
        self.refusal = refusal  # why no message may be queued now (max_queued_per_user), or None
        self.output = _Output(output_fd, timeout)
        self.input = _Input(input_fd, timeout, self.output.flush)
        self.errors = 0
        self.sender: str | None = None  # None: no transaction; "" is the null sender
        self.recipients: list[str] = []
        self.body_type: str | None = None
        self.smtputf8 = False
        self.handlers: dict[str, Callable[[str], None]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "VRFY": self._vrfy,
            "HELP": self._help,
            "QUIT": self._quit,
        }

    def run(self) -> int:
        """Hold the session until QUIT, the end of input, a timeout or too many errors; the exit status:
        0 after QUIT or the end of input between commands, EX_TEMPFAIL when the session was cut off."""
        try:
            try:
                self.output.add(f"220 {self.hostname} ESMTP pymta")
                while True:
                    line, overlong = self.input.readline(COMMAND_LINE_LIMIT)
                    if not line:
                        return EX_OK
                    if overlong:
                        self._reply(
                            500, f"5.5.2 line too long: a command has at most {COMMAND_LINE_LIMIT} octets"
                        )
                        continue
                    self._command(line)
            except _ClientTimeoutError:
                self.output.add(f"421 4.4.2 {self.hostname} nothing received for {self.timeout:g}s; closing")
                return EX_TEMPFAIL
            finally:
                self.output.flush()
        except _SessionEndError as end:
            if end.reason:
                _note(end.reason)
            return end.code

    def _reply(self, code: int, text: str) -> None:
        self.output.add(f"{code} {_clean(text)}")
        if code >= 500:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                self.output.add(f"421 4.7.0 {self.hostname} too many errors; closing")
                raise _SessionEndError(EX_TEMPFAIL)

    def _command(self, line: bytes) -> None:
        raw = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(500, "5.5.2 the command is not valid UTF-8")
            return
        verb, _, argument = text.strip(" ").partition(" ")
        verb = verb.upper()
        argument = argument.strip(" ")
        handler = self.handlers.get(verb)
        if handler is not None:
            try:
                handler(argument)
            except _ReplyError as reply:
                self._reply(reply.code, reply.text)
        elif verb in _FORBIDDEN or verb.endswith(":"):
            self.output.add(f"421 4.7.0 {self.hostname} this is an SMTP service for local mail only; closing")
            raise _SessionEndError(EX_TEMPFAIL)
        elif verb in _NOT_IMPLEMENTED:
            self._reply(502, f"5.5.1 {verb} is not implemented")
        elif not verb:
            self._reply(500, "5.5.2 empty command")
        else:
            self._reply(500, f"5.5.2 command not recognized: {verb[:20]}")

    def _reset(self) -> None:
        self.sender = None
        self.recipients = []
        self.body_type = None
        self.smtputf8 = False

    # -- the commands --

    def _ehlo(self, argument: str) -> None:
        if not argument:
            raise _ReplyError(501, "5.5.4 Syntax: EHLO hostname")
        self._reset()
        self.output.add(f"250-{self.hostname}")
        for keyword in ("PIPELINING", f"SIZE {self.max_size}", "8BITMIME", "SMTPUTF8"):
            self.output.add(f"250-{keyword}")
        self.output.add("250 ENHANCEDSTATUSCODES")

    def _helo(self, argument: str) -> None:
        if not argument:
            raise _ReplyError(501, "5.5.4 Syntax: HELO hostname")
        self._reset()
        self.output.add(f"250 {self.hostname}")

    def _mail(self, argument: str) -> None:
        if self.sender is not None:
            raise _ReplyError(503, "5.5.1 nested MAIL command: send RSET first")
        path, params = _path_and_params(argument, "FROM")
        body_type = None
        smtputf8 = False
        for key, value in params:
            if key == "SIZE":
                if not (value and value.isascii() and value.isdigit()):
                    raise _ReplyError(501, "5.5.4 SIZE= takes a number of octets")
                if int(value) > self.max_size:
                    raise _ReplyError(
                        552, f"5.3.4 the message is larger than the limit of {self.max_size} octets"
                    )
            elif key == "BODY" and value is not None:
                body_type = value.upper()
                if body_type not in ("7BIT", "8BITMIME"):
                    raise _ReplyError(555, "5.5.4 BODY= takes 7BIT or 8BITMIME")
            elif key == "SMTPUTF8" and value is None:
                smtputf8 = True
            else:
                raise _ReplyError(555, f"5.5.4 MAIL parameter not supported: {key[:20]}")
        if not path.isascii() and not smtputf8:
            raise _ReplyError(553, "5.6.7 a non-ASCII address needs the SMTPUTF8 parameter")
        refusal = self.refusal() if self.refusal is not None else None
        if refusal:
            raise _ReplyError(452, f"4.3.1 {refusal}")
        self.sender = _sender(path)
        self.body_type = body_type
        self.smtputf8 = smtputf8
        self._reply(250, "2.1.0 Ok")

    def _rcpt(self, argument: str) -> None:
        if self.sender is None:
            raise _ReplyError(503, "5.5.1 need MAIL before RCPT")
        path, params = _path_and_params(argument, "TO")
        if params:
            raise _ReplyError(555, f"5.5.4 RCPT parameter not supported: {params[0][0][:20]}")
        if len(self.recipients) >= MAX_RECIPIENTS:
            raise _ReplyError(452, f"4.5.3 too many recipients: at most {MAX_RECIPIENTS} per message")
        if not path.isascii() and not self.smtputf8:
            raise _ReplyError(553, "5.6.7 a non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM")
        self.recipients.append(_recipient(path))
        self._reply(250, "2.1.5 Ok")

    def _data(self, argument: str) -> None:
        if argument:
            raise _ReplyError(501, "5.5.4 Syntax: DATA")
        if self.sender is None:
            raise _ReplyError(503, "5.5.1 need MAIL and RCPT before DATA")
        if not self.recipients:
            raise _ReplyError(503, "5.5.1 need RCPT before DATA")
        self.output.add("354 End data with <CR><LF>.<CR><LF>")
        message, problem = self._read_text()
        sender, recipients, body_type = self.sender, self.recipients, self.body_type
        self._reset()
        if problem:
            self._reply(552, problem)
            return
        try:
            queue_id = self.queue(sender, recipients, body_type, message)
        except SpoolFullError as exc:
            self._reply(452, f"4.3.1 not queued: {exc}")
        except PymtaError as exc:
            if exc.exit_code in (EX_TEMPFAIL, EX_CANTCREAT):  # the spool: passing, or for the admin to fix
                self._reply(451, f"4.3.0 not queued: {exc}")
            else:
                self._reply(554, f"5.6.0 not queued: {exc}")
        except OSError as exc:
            self._reply(451, f"4.3.0 not queued: {exc.strerror or exc}")
        else:
            self._reply(250, f"2.0.0 Ok: queued as {queue_id}")

    def _read_text(self) -> tuple[bytes, str]:
        """The message text up to CRLF.CRLF, dot-unstuffed, lines joined with CRLF; and what is wrong with
        it ("" when nothing is). Raises _SessionEndError when the input ends first: nothing is queued."""
        lines: list[bytes] = []
        size = 0
        too_big = False
        long_line = 0
        after_crlf = True  # the 354 followed a command line
        number = 0
        while True:
            line, overlong = self.input.readline(TEXT_LINE_LIMIT)
            if not line:
                raise _SessionEndError(EX_TEMPFAIL, INCOMPLETE_DATA)
            crlf = line.endswith(b"\r\n")
            if after_crlf and line == b".\r\n":
                break
            after_crlf = crlf
            number += 1
            content = line[:-2] if crlf else line[:-1]
            if overlong or len(content) > TEXT_LINE_LIMIT - 2:
                long_line = long_line or number
                continue
            if content[:1] == b"." and len(content) > 1:
                content = content[1:]  # RFC 5321 4.5.2: a leading dot was doubled by the client
            size += len(content) + 2
            if size > self.max_size:
                too_big = True
            if not too_big and not long_line:
                lines.append(content)
        if too_big:
            return b"", f"5.3.4 the message is larger than the limit of {self.max_size} octets; not queued"
        if long_line:
            return b"", (
                f"5.6.0 line {long_line} is longer than {TEXT_LINE_LIMIT - 2} octets (RFC 5321 4.5.3.1.6); "
                "not queued: encode the body (quoted-printable or base64)"
            )
        return (b"\r\n".join(lines) + b"\r\n" if lines else b""), ""

    def _rset(self, argument: str) -> None:
        self._reset()
        self._reply(250, "2.0.0 Ok")

    def _noop(self, argument: str) -> None:
        self._reply(250, "2.0.0 Ok")

    def _vrfy(self, argument: str) -> None:
        if not argument:
            raise _ReplyError(501, "5.5.4 Syntax: VRFY address")
        self._reply(252, "2.0.0 cannot VRFY, but will accept the message and attempt delivery")

    def _help(self, argument: str) -> None:
        self._reply(214, f"2.0.0 {_HELP}")

    def _quit(self, argument: str) -> None:
        self.output.add(f"221 2.0.0 {self.hostname} closing")
        raise _SessionEndError(EX_OK)


def _note(line: str) -> None:
    try:
        os.write(2, f"sendmail: {line}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def _settings(config: str | None) -> tuple[str, int]:
    """How the greeting names us (`hostname:`, else the node name: no DNS lookup) and the message size limit
    (`max_message_size:`), read without YAML where possible. A broken config never stops the session."""
    values: dict[str, str | None] = {}
    path = paths.find_config(config)
    if path is not None:
        values = paths.read_plain(path, frozenset(("hostname", "max_message_size")))[0]
    hostname = values.get("hostname") or os.uname().nodename or "localhost"
    max_size = DEFAULT_MAX_SIZE
    text = values.get("max_message_size")
    if text:
        try:
            max_size = parse_size(text)
        except ValueError:
            _note(
                f"max_message_size: {text!r} is not a size; using {DEFAULT_MAX_SIZE} octets"
                " (run 'pymta config check')"
            )
    return _clean(hostname, 200).replace(" ", ""), max_size


def serve_stdio(
    invocation: Invocation,
    submit: Callable[[Invocation, bytes], tuple[str, list[str]]],
    refusal: Callable[[Invocation], str | None] | None = None,
) -> int:
    """`sendmail -bs`: one SMTP session on standard input and output; each message is queued by `submit`
    (sendmail's own) with an invocation that carries the envelope from MAIL FROM and RCPT TO. `refusal`
    says why the user may queue nothing now (max_queued_per_user): MAIL FROM is answered 452 with it."""
    if invocation.recipients:
        raise UsageError("-bs: SMTP mode takes no recipients on the command line; they come with RCPT TO")
    if invocation.verbose:
        for note in invocation.notes:
            _note(note)
        if invocation.extract or invocation.sender is not None:
            _note("-t, -f: ignored with -bs; MAIL FROM and RCPT TO give the envelope")
    hostname, max_size = _settings(invocation.config)

    def queue(sender: str, recipients: list[str], body_type: str | None, message: bytes) -> str:
        one = type(invocation)()  # what the command line said that still applies; MAIL and RCPT say the rest
        one.config = invocation.config
        one.verbose = invocation.verbose
        one.queue_only = invocation.queue_only
        one.full_name = invocation.full_name
        one.sender = sender
        one.recipients = recipients
        one.body_type = body_type
        queue_id, queued_for = submit(one, message)
        if invocation.verbose:
            _note(f"queued as {queue_id} for {', '.join(queued_for)}")
        return queue_id

    check = (lambda: refusal(invocation)) if refusal is not None else None
    return Session(0, 1, hostname=hostname, max_size=max_size, queue=queue, refusal=check).run()
