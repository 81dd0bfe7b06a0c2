"""Log lines an admin can grep, and where they go. Delivery lines follow Postfix's shape, so the usual
habits work:

    id=6b0ae6... to=<bob@example.org> relay=smtp.web.de[212.227.15.167]:587 delay=2.1 tries=1 status=sent

Where (`log:` in the config, pymta.yaml(5)): `auto`, the default, takes the first that works of
1. the journal's native socket (/run/systemd/journal/socket): each line with its priority, facility mail
   and identifier `pymta`, as `journalctl -t pymta` shows it;
2. syslog's socket (/dev/log), facility mail, tag `pymta`;
3. stderr, when it is a file or a socket (a container runtime's log, a unit's output) and neither a
   terminal (whoever sits there asks with --verbose) nor a pipe. A pipe is what cron mails back: a flush
   run by cron that logged there would mail root, whose mail the next flush delivers and logs, mailed
   again: one message every run, for ever. With a pipe and no socket the lines go nowhere.
`journal`, `syslog`, `stderr`, `none` or an absolute path name one target; one that cannot be used (no
socket listening, a file that cannot be opened) falls back to what auto finds, and the first line says why.
--verbose adds stderr to any of them, never twice. $PYMTA_JOURNAL_SOCKET and $PYMTA_SYSLOG_SOCKET move
the sockets (a container with them mounted elsewhere; the tests).

Passwords never reach this module (ARCHITECTURE.md invariant 7): callers pass replies and reasons, never
secrets.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

LOGGER_NAME = "pymta"
SYSLOG_SOCKET = "/dev/log"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
TARGETS = ("auto", "journal", "syslog", "stderr", "none")
# A journal datagram stays well below the socket's default buffer (about 208 KiB): longer text is cut.
JOURNAL_MAX_MESSAGE = 64 * 1024
# syslog's facility "mail" (RFC 5424), as the journal records it.
MAIL_FACILITY = 2
# logging's levels as syslog priorities, for the journal.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def target_problem(value: str) -> str | None:
    """Why `value` is no `log:` target, or None (for the config's check)."""
    if value in TARGETS:
        return None
    if not value.startswith("/"):
        return f"must be {', '.join(TARGETS[:-1])}, none or an absolute path such as /var/log/pymta.log"
    return None


def setup(verbose: bool = False, *, target: str = "auto") -> logging.Logger:
    """The `pymta` logger, its lines going to `target` (see the module docstring) and, under --verbose,
    to stderr as well."""
    # What a record would otherwise look up for each line and no line of ours shows: the caller's file and
    # line (a walk up the stack), the thread, the process (a getpid). logging's own advice for speed; a
    # flush makes a record per recipient (issue 12).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    handler, problem = _open(target)
    if handler is None and problem is not None:
        handler, _ = _open("auto")
    if handler is not None:
        logger.addHandler(handler)
    if verbose and not _is_stderr(handler):
        logger.addHandler(_stderr())
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    # Lines that go nowhere are not made: a flush logs a line per recipient, and a record made for nothing
    # costs a tenth of a message's own time (`isEnabledFor` says no; the lines' text is not formatted).
    logger.disabled = all(isinstance(handler, logging.NullHandler) for handler in logger.handlers)
    if problem is not None:
        logger.warning(one_line(problem))
    return logger


def _open(target: str) -> tuple[logging.Handler | None, str | None]:
    """The handler for `target` (None: nowhere), and why a named target could not be used."""
    if target == "none":
        return None, None
    if target == "stderr":
        return _stderr(), None
    if target.startswith("/"):
        return _file(target)
    sockets: tuple[tuple[str, Callable[[str], logging.Handler], str], ...] = (
        ("journal", JournalHandler, os.environ.get("PYMTA_JOURNAL_SOCKET") or JOURNAL_SOCKET),
        ("syslog", _syslog, os.environ.get("PYMTA_SYSLOG_SOCKET") or SYSLOG_SOCKET),
    )
    for name, connect, path in sockets:
        if target in ("auto", name):
            try:
                return connect(path), None
            except OSError as exc:
                if target == name:
                    return (
                        None,
                        f"log: {name}: cannot use {path} ({exc.strerror or exc}); logging here instead",
                    )
    if target == "auto" and _stderr_may_log():
        return _stderr(), None
    return None, None


def _stderr_may_log() -> bool:
    """stderr is a file or a socket: not a terminal, not a pipe that cron mails back, not closed."""
    try:
        mode = os.fstat(sys.stderr.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISREG(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode) and not os.isatty(2)


def info(logger: logging.Logger, text: str) -> None:
    """`logger.info(text)`, the same line to the same places, made cheaper for a logger as `setup` left it
    (a flush writes one per recipient, issue 12): each of its handlers writes the line itself (`line`),
    with no LogRecord made and no Formatter run. Any other logger, or one changed since (a filter, a
    handler of someone else's, a level), goes through logging as usual."""
    handlers = logger.handlers
    if logger.filters or logger.propagate or not logger.isEnabledFor(logging.INFO):
        logger.info(text)
        return
    for handler in handlers:
        if type(handler) not in _LINE_HANDLERS or handler.filters or handler.level > logging.INFO:
            logger.info(text)
            return
    for handler in handlers:
        handler.line(logging.INFO, text)  # type: ignore[attr-defined]


class _StreamLines(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler (stderr, or a log file) whose lines are `prefix` and the message, after the time
    as `time_format` gives it in UTC when there is one; `line` writes one without a LogRecord."""

    def __init__(self, stream: TextIO, prefix: str, time_format: str | None = None) -> None:
        super().__init__(stream)
        self.prefix = prefix
        self.time_format = time_format
        self._second = -1
        self._time = ""
        stamp = "%(asctime)s" if time_format is not None else ""
        formatter = logging.Formatter(stamp + prefix.replace("%", "%%") + "%(message)s", datefmt=time_format)
        formatter.converter = time.gmtime  # UTC, so lines from machines in other zones sort together
        self.setFormatter(formatter)

    def line(self, level: int, text: str) -> None:
        """What `emit` writes for a record of `text`, without the record: the same bytes, the same lock
        and flush; a failure is reported as `emit` reports it (`handleError`)."""
        if self.time_format is None:
            data = self.prefix + text + self.terminator
        else:
            now = time.time()
            second = int(now)
            if second != self._second:  # the time has no finer part: one strftime a second
                self._time = time.strftime(self.time_format, time.gmtime(second))
                self._second = second
            data = self._time + self.prefix + text + self.terminator
        self.acquire()
        try:
            self.stream.write(data)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as emit meets it: logging's own report, and the run goes on
            self.handleError(logging.LogRecord(LOGGER_NAME, level, "", 0, text, None, None))
        finally:
            self.release()


def _stderr() -> logging.Handler:
    return _StreamLines(sys.stderr, "pymta: ")


def _is_stderr(handler: logging.Handler | None) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stderr


def _syslog(path: str) -> logging.Handler:
    _require_socket(path)
    import logging.handlers  # pickle, queue and more: only when there is a syslog to log to

    handler = logging.handlers.SysLogHandler(address=path, facility=logging.handlers.SysLogHandler.LOG_MAIL)
    handler.setFormatter(logging.Formatter(f"pymta[{os.getpid()}]: %(message)s"))
    return handler


def _file(path: str) -> tuple[logging.Handler | None, str | None]:
    """Append to `path`, made 0640 if new; a link is not followed (its target could be anyone's file)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        return None, f"log: cannot open {path} ({exc.strerror or exc}); logging here instead"
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None, f"log: {path} is not a regular file; logging here instead"
    stream = os.fdopen(fd, "a", encoding="utf-8", errors="replace", buffering=1)
    return _StreamLines(stream, f" {socket.gethostname()} pymta[{os.getpid()}]: ", "%Y-%m-%dT%H:%M:%SZ"), None


def _require_socket(path: str) -> None:
    """A path that is no socket (a file planted there, a leftover) is not written to: OSError."""
    if not stat.S_ISSOCK(os.stat(path).st_mode):
        raise OSError(f"{path} is not a socket")


class JournalHandler(logging.Handler):
    """systemd-journald's native protocol: one datagram per line, `KEY=value` fields; a value with a line
    break goes as the key, a line break, its length (64-bit little-endian), the value and a line break.
    Connected at once, so that a missing journal is known before the first line, and so that the delivery
    process of a split flush keeps the socket after it has given up root."""

    def __init__(self, path: str) -> None:
        super().__init__()
        _require_socket(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.socket.connect(path)
        except OSError:
            self.socket.close()
            raise

    def emit(self, record: logging.LogRecord) -> None:
        self._send(record.levelno, self.format(record))

    def line(self, level: int, text: str) -> None:
        """What `emit` sends for a record of `text` at `level` (`info`), without the record."""
        self.acquire()
        try:
            self._send(level, text)
        finally:
            self.release()

    def _send(self, level: int, text: str) -> None:
        try:
            message = text[:JOURNAL_MAX_MESSAGE]
            fields = {
                "MESSAGE": message,
                "PRIORITY": str(PRIORITIES.get(level, 6)),
                "SYSLOG_FACILITY": str(MAIL_FACILITY),
                "SYSLOG_IDENTIFIER": LOGGER_NAME,
                "SYSLOG_PID": str(os.getpid()),
            }
            self.socket.send(b"".join(_journal_field(key, value) for key, value in fields.items()))
        except OSError:
            pass  # a full or vanished journal must not stop a delivery; the queue keeps the state

    def close(self) -> None:
        self.socket.close()
        super().close()


# The handlers `info` lets write a line themselves: those `setup` makes, whose lines it knows.
_LINE_HANDLERS = (_StreamLines, JournalHandler)


def _journal_field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" not in data:
        return key.encode() + b"=" + data + b"\n"
    return key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"


def delivery_line(
    queue_id: str,
    recipient: str,
    relay: str,
    delay: float,
    tries: int,
    status: str,
    reply: str,
    tls: str = "",
    sts: str = "",
) -> str:
    """One delivery attempt of one recipient, Postfix style; `tls` and `sts` (direct delivery: the TLS it
    got, the MTA-STS mode that applied) follow the relay."""
    shown_tls = (f" tls={tls}" if tls else "") + (f" sts={sts}" if sts else "")
    return (
        f"id={queue_id} to=<{recipient}> relay={relay}{shown_tls} delay={delay:.1f} tries={tries} "
        f"status={status} ({' '.join(reply.split())})"
    )


def one_line(text: str) -> str:
    """`text` fit for one log line: every character that is not printable (a line break, a control) as a
    space, so a text a user or a message wrote cannot forge a line."""
    return "".join(char if char.isprintable() else " " for char in text)
