"""The connection under a session: smtplib.SMTP reading replies within bounds, and replies as one line.

smtplib's getreply takes any number of lines, at any pace: a server that never ends a reply (250-...
forever) grew the flush without limit, and one that sent a byte a second held it for hours. `Client` reads
at most MAX_REPLY_LINES lines of at most MAX_REPLY_LINE bytes, each reply within its timeout plus
REPLY_TRANSFER_TIME, and sends text in blocks that each have the timeout to leave (RFC 5321 4.5.3.2).
"""

from __future__ import annotations

import re
import smtplib
import socket
import time

from pymta.delivery.direct import MxRelay
from pymta.delivery.smtp.outcome import SessionError
from pymta.delivery.smtp.tls import verify_pin

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

    from _typeshed import ReadableBuffer

    from pymta.config.model import Smarthost
    from pymta.delivery.smtp.outcome import Stage

# A reply may have this many lines (an EHLO reply has a dozen): a server that never ends one is cut off.
MAX_REPLY_LINES = 100
# Seconds a reply may take to arrive once the server starts it, beyond the timeout (the longest silence).
REPLY_TRANSFER_TIME = 30.0
# Bytes of one reply line (smtplib's limit too).
MAX_REPLY_LINE = 8192
# Bytes of the message text sent per block; each block has `timeout` to leave (RFC 5321 4.5.3.2.5 bounds
# each block, not the whole text): 64 KiB in 30 s is 2 KiB/s, slower than any uplink that still works.
DATA_BLOCK = 65536

_ENHANCED_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


class ReplyLimit(smtplib.SMTPServerDisconnected):
    """The server's reply went past a bound (`Client.getreply`): the connection was closed."""


class Client(smtplib.SMTP):
    """smtplib.SMTP that connects address by address (so the relay names the IP even when refused), wraps
    the socket for implicit TLS and checks the pin before reading the greeting, and reads replies within
    bounds: smtplib's getreply takes any number of lines, at any pace, so a server that never ends a reply
    (250-... forever) grew the flush without limit, and one that sent a byte a second held it for hours."""

    def __init__(self, smarthost: Smarthost, hostname: str) -> None:
        super().__init__(local_hostname=hostname, timeout=smarthost.timeout)
        self._host = smarthost.host  # smtplib sets it only when given a host at construction
        self.smarthost = smarthost
        self.peer_ip: str | None = None
        self.tls_context: ssl.SSLContext | None = None
        self._buffer = b""  # read from `_buffer_of`; from `_start` on not yet returned
        self._start = 0
        self._buffer_of: socket.socket | None = None
        self._waited = False  # a read set the socket's timeout to what was left of a reply's deadline

    def getreply(self, timeout: float | None = None) -> tuple[int, bytes]:
        """One reply, as smtplib's: (code, the lines' text joined by LF); -1 and the whole line when it has
        no code. At most MAX_REPLY_LINES lines, and the whole reply within `timeout` (default: the
        session's) plus REPLY_TRANSFER_TIME (`timeout` alone bounds only each wait for data). Past either
        the connection is closed and SMTPServerDisconnected says why."""
        # Most replies of a pipelined group came with the one before: a one-line reply in the buffer is
        # taken as `_reply` would take it, with no deadline to compute and no read to bound.
        start, buffer = self._start, self._buffer
        end = buffer.find(b"\n", start)
        if (
            0 <= end - start < MAX_REPLY_LINE
            and buffer[start + 3 : start + 4] == b" "
            and buffer[start : start + 3].isdigit()
            and self._buffer_of is self.sock is not None
        ):
            self._start = end + 1
            return int(buffer[start : start + 3]), buffer[start + 4 : end + 1].strip(b" \t\r\n")
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit + REPLY_TRANSFER_TIME
        try:
            return self._reply(deadline, limit)
        finally:
            # What sends after this expect, not the rest of a deadline; only when a read changed it: each
            # settimeout is a system call, and most replies of a pipelined group are in the buffer already.
            if self.sock is not None and self._waited:
                self.sock.settimeout(self.timeout)
                self._waited = False

    def send(self, s: ReadableBuffer | str) -> None:
        """smtplib's send, in blocks of DATA_BLOCK bytes, each within the timeout: the socket's timeout
        bounds a whole sendall (since Python 3.5), so a large text on a slow link ran out of it while it
        was still moving, and was sent again in full at every retry."""
        view = memoryview(s.encode(self.command_encoding) if isinstance(s, str) else s).cast("B")
        if view.nbytes <= DATA_BLOCK:
            super().send(s)
            return
        for start in range(0, view.nbytes, DATA_BLOCK):
            super().send(view[start : start + DATA_BLOCK])

    def _reply(self, deadline: float, limit: float) -> tuple[int, bytes]:
        texts = []
        while True:
            line = self._readline(deadline, limit)
            if len(line) > MAX_REPLY_LINE:
                self.close()
                raise smtplib.SMTPResponseException(500, b"Line too long.")
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n", b""):
                return -1, line.strip(b" \t\r\n")  # no reply: keep all of it for the error message
            texts.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                return int(code), b"\n".join(texts)
            if len(texts) >= MAX_REPLY_LINES:
                self.close()
                raise ReplyLimit(f"a reply of more than {MAX_REPLY_LINES} lines")

    def _readline(self, deadline: float, limit: float) -> bytes:
        """A line of the server's (with its line end), read straight from the socket, waiting at most
        `limit` seconds for each piece of it, and never past `deadline`: a buffer that began on another
        socket is dropped, as STARTTLS requires (text sent before the handshake must not count as said
        under TLS).

        Each settimeout is a system call, so the socket keeps its own timeout (the session's, which sends
        need) whenever that is not longer than the wait: a longer wait (DATA's end has `data_timeout`) is
        made of several reads that each time out, and only a shorter one (a reply's deadline drawing near)
        sets the socket's, which `getreply` sets back."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if self._buffer_of is not sock:
            self._buffer, self._start, self._buffer_of = b"", 0, sock
        silent_since = None  # when the wait for the next piece began
        while True:
            end = self._buffer.find(b"\n", self._start)
            if end >= 0:
                line = self._buffer[self._start : end + 1]
                self._start = end + 1
                return line
            if len(self._buffer) - self._start > MAX_REPLY_LINE:
                return self._buffer[self._start :]
            now = time.monotonic()
            if silent_since is None:
                silent_since = now
            wait = min(deadline, silent_since + limit) - now
            try:
                if wait <= 0:
                    raise TimeoutError("timed out")  # as the socket says it
                own = sock.gettimeout()
                if own is None or not 0 < own <= wait:
                    sock.settimeout(wait)
                    self._waited = True
                    own = wait
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if own < wait:  # the socket's own timeout, shorter than this wait: wait on
                        continue
                    raise
            except TimeoutError as exc:
                self.close()
                if deadline < silent_since + limit:  # the reply's deadline, not one silence, ran out
                    raise ReplyLimit(f"no complete reply within {limit + REPLY_TRANSFER_TIME:g} s") from None
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"Connection unexpectedly closed: {exc}") from exc
            silent_since = None
            if not chunk:
                rest = self._buffer[self._start :]
                if rest:  # a last line without its CRLF ("421 bye", then the close): still the server's word
                    self._buffer, self._start = b"", 0
                    return rest
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            self._buffer = self._buffer[self._start :] + chunk
            self._start = 0

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self._tcp_connect(host, port, timeout)
        if self.tls_context is None:
            return sock
        try:
            wrapped = self.tls_context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise

        def fail(stage: Stage, reason: str, *, reply: str | None = None) -> SessionError:
            relay = f"{host}[{self.peer_ip}]:{port}"
            return SessionError(relay, reason, stage=stage, reply=reply)

        try:
            verify_pin(self.smarthost, wrapped, fail)
        except BaseException:
            wrapped.close()
            raise
        return wrapped

    def _tcp_connect(self, host: str, port: int, timeout: float) -> socket.socket:
        last_error: OSError | None = None
        if isinstance(self.smarthost, MxRelay):
            timeout = min(timeout, self.smarthost.connect_timeout)
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            self.peer_ip = str(address[0])
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                if family in (socket.AF_INET, socket.AF_INET6):
                    # Our writes are whole already (a text, its end and the next message's commands in
                    # one): Nagle would only hold the last small one back for an ACK.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as error:
                sock.close()
                last_error = error
        raise last_error or OSError(f"no address for {host}")


_REPLY_CACHE_SIZE = 64
_reply_cache: dict[tuple[int, bytes], str] = {}


def transaction_reply(code: int, message: bytes) -> str:
    """`format_reply` for the replies of a mail transaction, remembered."""
    key = (code, message)
    reply = _reply_cache.get(key)
    if reply is None:
        reply = format_reply(code, message)
        if len(_reply_cache) < _REPLY_CACHE_SIZE:
            _reply_cache[key] = reply
    return reply


def format_reply(code: int, message: bytes) -> str:
    """A reply as one line, "CODE ENHANCED text"; X.0.0 stands in for a missing enhanced code."""
    if b"\n" not in message and message.isascii():
        # The common case, one printable line such as b"2.0.0 Ok: queued": no regex, no loop.
        text = message.decode("ascii").strip()
        first, _, rest = text.partition(" ")
        if text.isprintable() and _is_enhanced(first, code):
            return f"{code} {first} {rest.strip()}".rstrip()
    enhanced = ""
    texts = []
    for line in message.decode("utf-8", "replace").split("\n"):
        first, _, rest = line.strip().partition(" ")
        if _ENHANCED_RE.fullmatch(first) and first[0] == str(code)[0]:
            enhanced = enhanced or first
            line = rest
        if line.strip():
            texts.append(line.strip())
    text = " ".join(texts)
    if not text.isprintable():
        text = "".join(char if char.isprintable() else "?" for char in text)
    if not enhanced and 200 <= code <= 599:
        enhanced = f"{code // 100}.0.0"
    return " ".join(part for part in (str(code), enhanced, text) if part)


def _is_enhanced(word: str, code: int) -> bool:
    """Whether `word` is an RFC 3463 code of the reply's class, e.g. "2.0.0" for a 250."""
    if not 5 <= len(word) <= 9 or word[0] not in "245" or word[0] != str(code)[0] or word[1] != ".":
        return False
    subject, dot, detail = word[2:].partition(".")
    return bool(dot) and 0 < len(subject) <= 3 and 0 < len(detail) <= 3 and (subject + detail).isdigit()


def as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "replace")
