"""Where `pymta flush` logs, with real sockets in a temporary directory and the installed script.

`log: auto` (the default) takes the journal's native socket, else syslog's, else stderr when stderr is a
file or a socket, and else nowhere: a pipe is what cron mails back to root, and a flush that wrote its log
there would mail itself a message every run. `log:` names a target instead: journal, syslog, stderr, none
or a file. The sockets' paths come from $PYMTA_JOURNAL_SOCKET and $PYMTA_SYSLOG_SOCKET here.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MtaEnv
from mailservers import PASSWORD, SmtpServer, certificates, smtp_server
from test_privsep import configure, system_mta

__all__ = ["certificates", "smtp_server", "system_mta"]  # fixtures imported for use

MESSAGE = b"Subject: log\n\nbody\n"


OPEN: list[socket.socket] = []


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for sockets (a unix socket's path is limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="pymta-log-", dir="/tmp"))
    yield directory
    while OPEN:
        OPEN.pop().close()
    shutil.rmtree(directory)


def listen(path: Path) -> socket.socket:
    """A datagram socket bound at `path`, as journald and syslogd listen; closed by the fixture."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    OPEN.append(server)
    server.bind(str(path))
    server.setblocking(False)
    return server


def datagrams(server: socket.socket, at_least: int = 1, timeout: float = 5.0) -> list[bytes]:
    found: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            found.append(server.recv(1 << 20))
            continue
        except BlockingIOError:
            pass
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def journal_fields(datagram: bytes) -> dict[str, str]:
    """The journal's native protocol: KEY=value lines, or KEY, newline, 64-bit length, value, newline."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            rest = after
        else:
            (length,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + length].decode()
            assert after[8 + length : 9 + length] == b"\n"
            rest = after[9 + length :]
    return fields


def queue_one(mta: MtaEnv, config: str = "") -> None:
    mta.write_config(f"domain: example.org\nhostname: mx.example.org\ndeliver: queue\n{config}")
    assert mta.sendmail("someone@example.net", input=MESSAGE).returncode == 0


def env_with(mta: MtaEnv, sockets: Path) -> dict[str, str]:
    return {
        **mta.env,
        "PYMTA_JOURNAL_SOCKET": str(sockets / "journal"),
        "PYMTA_SYSLOG_SOCKET": str(sockets / "log"),
    }


def flush(mta: MtaEnv, env: dict[str, str], *args: str, stderr: int | None = None) -> tuple[int, bytes]:
    """`pymta flush --now` with stderr a pipe (as under cron), or the file descriptor `stderr`."""
    import subprocess

    from conftest import script

    result = subprocess.run(
        [script("pymta"), "flush", "--now", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        env=env,
        timeout=60,
    )
    return result.returncode, result.stderr or b""


def test_auto_prefers_the_journal_socket(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta)
    journal, syslog = listen(sockets / "journal"), listen(sockets / "log")
    code, stderr = flush(mta, env_with(mta, sockets))
    assert (code, stderr) == (0, b"")
    (line, *_) = [journal_fields(d) for d in datagrams(journal) if b"status=deferred" in d]
    assert line["SYSLOG_IDENTIFIER"] == "pymta" and line["SYSLOG_FACILITY"] == "2"
    assert line["PRIORITY"] in ("4", "6") and int(line["SYSLOG_PID"]) > 0
    assert "to=<someone@example.net>" in line["MESSAGE"] and "no smarthost configured" in line["MESSAGE"]
    assert datagrams(syslog, at_least=0, timeout=0) == []


def test_a_multi_line_message_uses_the_journals_binary_form(sockets: Path) -> None:
    from pymta import log

    journal = listen(sockets / "journal")
    handler = log.JournalHandler(str(sockets / "journal"))
    logger = log.logging.getLogger("pymta.test.journal")
    logger.addHandler(handler)
    try:
        logger.warning("first line\nsecond line=with equals")
    finally:
        logger.removeHandler(handler)
        handler.close()
    (datagram,) = datagrams(journal)
    assert journal_fields(datagram)["MESSAGE"] == "first line\nsecond line=with equals"


def test_auto_uses_syslog_without_a_journal(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta)
    syslog = listen(sockets / "log")
    code, stderr = flush(mta, env_with(mta, sockets))
    assert (code, stderr) == (0, b"")
    lines = [d.decode() for d in datagrams(syslog) if b"status=deferred" in d]
    assert lines and lines[0].startswith(("<20>pymta[", "<22>pymta[")), lines


def test_auto_without_sockets_never_writes_to_a_pipe_that_cron_would_mail(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta)
    code, stderr = flush(mta, env_with(mta, sockets))
    assert (code, stderr) == (0, b"")
    assert mta.only_entry().attempts == 1  # the run happened; only its log went nowhere


def test_auto_without_sockets_logs_to_stderr_that_is_a_file(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta)
    path = mta.root / "stderr.log"
    with open(path, "wb") as stderr_file:
        code, _ = flush(mta, env_with(mta, sockets), stderr=stderr_file.fileno())
    assert code == 0
    lines = path.read_text().splitlines()
    assert len([line for line in lines if "status=deferred" in line]) == 1, lines
    assert all(line.startswith("pymta: ") for line in lines), lines


def test_verbose_with_stderr_as_the_log_says_each_line_once(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta)
    path = mta.root / "stderr.log"
    with open(path, "wb") as stderr_file:
        code, _ = flush(mta, env_with(mta, sockets), "--verbose", stderr=stderr_file.fileno())
    assert code == 0
    assert len([line for line in path.read_text().splitlines() if "status=deferred" in line]) == 1


def test_log_stderr_writes_to_a_pipe_when_asked(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta, "log: stderr\n")
    listen(sockets / "journal")
    code, stderr = flush(mta, env_with(mta, sockets))
    assert code == 0
    assert b"status=deferred" in stderr and stderr.startswith(b"pymta: ")


def test_log_none_logs_nowhere_even_with_a_journal(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta, "log: none\n")
    journal = listen(sockets / "journal")
    code, stderr = flush(mta, env_with(mta, sockets))
    assert (code, stderr) == (0, b"")
    assert datagrams(journal, at_least=0, timeout=0.3) == []


def test_a_log_that_goes_nowhere_makes_no_lines() -> None:
    """With nowhere to write (`log: none`, or auto with stderr a pipe and no socket), a flush makes no line
    at all: a record per recipient made for nothing cost a tenth of a message's time (issue 12)."""
    from pymta import log

    made: list[str] = []

    class Counting(log.logging.Handler):
        def emit(self, record: log.logging.LogRecord) -> None:
            made.append(record.getMessage())

    try:
        logger = log.setup(target="none")
        assert not logger.isEnabledFor(log.logging.INFO)
        logger.info("nowhere")
        log.logging.getLogger("pymta.delivery.smtp").addHandler(counting := Counting())
        log.logging.getLogger("pymta.delivery.smtp").warning("its own handler still gets it")
        assert made == ["its own handler still gets it"]
        log.logging.getLogger("pymta.delivery.smtp").removeHandler(counting)
        assert log.setup(target="stderr").isEnabledFor(log.logging.INFO)
    finally:
        log.setup(target="none")


def test_log_syslog_skips_the_journal(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta, "log: syslog\n")
    journal, syslog = listen(sockets / "journal"), listen(sockets / "log")
    assert flush(mta, env_with(mta, sockets)) == (0, b"")
    assert any(b"status=deferred" in d for d in datagrams(syslog))
    assert datagrams(journal, at_least=0, timeout=0) == []


def test_log_to_a_file(mta: MtaEnv, sockets: Path) -> None:
    path = mta.root / "pymta.log"
    queue_one(mta, f"log: {path}\n")
    journal = listen(sockets / "journal")
    assert flush(mta, env_with(mta, sockets)) == (0, b"")
    lines = path.read_text().splitlines()
    (line,) = [line for line in lines if "status=deferred" in line]
    assert " pymta[" in line and line[:4].isdigit()  # a time stamp first: no syslog adds one here
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert datagrams(journal, at_least=0, timeout=0) == []


def test_a_log_file_that_is_a_link_is_not_followed(mta: MtaEnv, sockets: Path) -> None:
    target = mta.root / "elsewhere"
    target.write_text("")
    link = mta.root / "pymta.log"
    link.symlink_to(target)
    queue_one(mta, f"log: {link}\n")
    journal = listen(sockets / "journal")
    assert flush(mta, env_with(mta, sockets)) == (0, b"")
    assert target.read_text() == ""
    said = [journal_fields(d)["MESSAGE"] for d in datagrams(journal, at_least=2)]
    assert any(str(link) in line and "cannot" in line for line in said), said  # why, where auto logs
    assert any("status=deferred" in line for line in said), said


def test_an_explicit_journal_that_is_missing_falls_back_and_says_so(mta: MtaEnv, sockets: Path) -> None:
    queue_one(mta, "log: journal\n")
    syslog = listen(sockets / "log")
    assert flush(mta, env_with(mta, sockets)) == (0, b"")
    said = [d.decode() for d in datagrams(syslog, at_least=2)]
    assert any("journal" in line and str(sockets / "journal") in line for line in said), said
    assert any("status=deferred" in line for line in said), said


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("syslogd", "must be auto, journal, syslog, stderr, none or an absolute path"),
        ("var/log/x", "absolute"),
    ],
)
def test_config_check_refuses_a_bad_log_target(mta: MtaEnv, value: str, words: str) -> None:
    mta.write_config(f"log: {value}\n")
    result = mta.run("pymta", ["config", "check"])
    assert result.returncode == 78
    assert "log" in result.stderr.decode() and words in result.stderr.decode(), result.stderr


def test_the_env_socket_paths_are_only_for_sockets(mta: MtaEnv, sockets: Path) -> None:
    """A regular file at the journal's path is no socket: nothing is written into it."""
    queue_one(mta)
    (sockets / "journal").write_text("")
    syslog = listen(sockets / "log")
    assert flush(mta, env_with(mta, sockets)) == (0, b"")
    assert (sockets / "journal").read_text() == ""
    assert any(b"status=deferred" in d for d in datagrams(syslog))
    assert os.path.exists(sockets / "log")


@pytest.mark.skipif(os.geteuid() != 0, reason="the split flush needs root")
def test_a_split_flush_logs_to_a_file_that_only_root_may_open(
    system_mta: MtaEnv, smtp_server: SmtpServer, sockets: Path
) -> None:
    configure(system_mta, smtp_server, f"echo {PASSWORD}")
    path = system_mta.root / "pymta.log"
    with system_mta.config.open("a") as config:
        config.write(f"log: {path}\n")
    assert system_mta.sendmail("bob@example.net", input=MESSAGE).returncode == 0
    assert flush(system_mta, env_with(system_mta, sockets)) == (0, b"")
    assert (path.stat().st_uid, path.stat().st_mode & 0o777) == (0, 0o640)  # the delivery process cannot
    (line,) = [line for line in path.read_text().splitlines() if "status=sent" in line]  # yet it logged
    assert "to=<bob@example.net>" in line


def test_a_delivery_line_is_written_as_logging_writes_it_without_a_record(
    tmp_path: Path, sockets: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`log.info` (a flush's line per recipient) writes to each target `setup` makes the bytes that
    `logger.info` writes there, with no LogRecord made (issue 12); a logger changed since goes through
    logging as before, and its filter is heeded."""
    import logging

    from pymta import log

    line = "id=6b0ae6 to=<bob@example.org> relay=smtp.example.org[192.0.2.1]:587 delay=2.1 status=sent"
    journal = listen(sockets / "journal")
    monkeypatch.setenv("PYMTA_JOURNAL_SOCKET", str(sockets / "journal"))
    made: list[str] = []
    factory = logging.getLogRecordFactory()

    def counted(*args: object, **kwargs: object) -> logging.LogRecord:
        made.append(str(args[4]))
        return factory(*args, **kwargs)

    logging.setLogRecordFactory(counted)
    file = tmp_path / "pymta.log"
    try:
        for target in ("journal", "stderr", str(file)):
            logger = log.setup(target=target)
            try:
                logger.info(line)
                log.info(logger, line)
            finally:
                if target.startswith("/"):
                    logger.handlers[0].stream.close()  # type: ignore[attr-defined]  # setup leaves it open
                log.setup(target="none")
    finally:
        logging.setLogRecordFactory(factory)
    assert made == [line] * 3  # logger.info's, one per target; none of log.info's

    by_logging, by_info = (journal_fields(datagram) for datagram in datagrams(journal, at_least=2))
    assert by_logging == by_info and by_info["MESSAGE"] == line and by_info["PRIORITY"] == "6"
    assert capsys.readouterr().err == f"pymta: {line}\n" * 2
    first, second = file.read_text().splitlines()
    assert first.endswith(f" pymta[{os.getpid()}]: {line}") and first[20:] == second[20:]
    stamps = [time.mktime(time.strptime(text[:20], "%Y-%m-%dT%H:%M:%SZ")) for text in (first, second)]
    assert 0 <= stamps[1] - stamps[0] <= 1 and abs(stamps[1] - time.mktime(time.gmtime())) < 60

    logger = log.setup(target="stderr")
    try:
        logger.addFilter(lambda record: "secret" not in record.getMessage())
        log.info(logger, "a secret line")
        log.info(logger, "a plain line")
    finally:
        log.setup(target="none")
    assert capsys.readouterr().err == "pymta: a plain line\n"
