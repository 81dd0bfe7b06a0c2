"""A 30 MB message through the real `sendmail` and `pymta flush` to aiosmtpd on loopback, byte for byte: the
paths that avoid copies of a large text (the header completed apart from the body, the body read from the
queue file and sent block by block) change nothing in what arrives. The flush's peak memory is held well
below the message's size twice, which only streaming can give, and so is sendmail's, which streams the
message to the spool; its time is a bench figure (bench/compare.py, "30 MB").
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from conftest import MtaEnv, script
from mailservers import Handler, SmtpServer

LINE = b"a line of a large attachment, as base64 would send it: 76 characters wide....\n"
# Every 1000th line starts with a dot (dot-stuffed on the wire), and the text ends without a line end.
BODY = b"".join((b"." + LINE if number % 1000 == 0 else LINE) for number in range(390_000)) + b"no newline"


# A command runs under this small parent, which reports the peak resident memory of that child alone
# (wait4): ru_maxrss of a child of pytest's would start from pytest's own size, copied at fork, and this
# test's process holds the 30 MB body several times over.
PEAK_RSS = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "sys.stderr.write(f'PEAK RSS {usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)
MIB = 1024  # ru_maxrss is in KiB on Linux


def peak_rss(mta: MtaEnv, command: list[str], data: bytes | None = None) -> tuple[int, bytes, float]:
    """Run an installed command (with `data` piped in): its exit code, stderr, and peak RSS in MiB (its
    children's, such as the flush's delivery child, count too)."""
    argv = [sys.executable, "-S", "-c", PEAK_RSS, script(command[0]), *command[1:]]
    result = subprocess.run(argv, input=data, capture_output=True, env=mta.env, timeout=120)
    stderr, _, peak = result.stderr.rpartition(b"PEAK RSS ")
    return result.returncode, stderr, int(peak) / MIB


def flush_peak_mib(mta: MtaEnv) -> float:
    """Run the installed `pymta flush`; its peak resident memory (and its delivery children's) in MiB."""
    code, stderr, peak = peak_rss(mta, ["pymta", "flush"])
    assert code == 0, stderr
    return peak


def test_a_30_mb_message_arrives_byte_for_byte_and_is_never_held_whole(mta: MtaEnv) -> None:
    assert len(BODY) > 30_000_000
    handler = Handler()
    with SmtpServer("plain", handler=handler) as server:
        mta.write_config(
            "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
            f"smarthosts: {json.dumps([{'host': '127.0.0.1', 'port': server.port, 'security': 'none'}])}\n"
        )
        submitted = mta.sendmail("-i", "big@example.net", input=b"Subject: 30 MB\n\n" + BODY)
        assert submitted.returncode == 0, submitted.stderr
        peak = flush_peak_mib(mta)
    [received] = handler.messages
    assert received.rcpt_tos == ["big@example.net"]
    header, _, body = received.data.partition(b"\r\n\r\n")
    assert b"Subject: 30 MB" in header
    expected = BODY.replace(b"\n", b"\r\n") + b"\r\n"  # the wire's line ends; the last line ended
    assert len(body) == len(expected)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert mta.entries() == []
    assert peak < 60, f"pymta flush peaked at {peak:.0f} MiB for a 30 MB message: it was held whole"


def test_a_30_mb_message_is_streamed_to_the_spool(mta: MtaEnv) -> None:
    data = b"Subject: 30 MB\nBcc: hidden@example.net\n\n" + BODY
    code, stderr, peak = peak_rss(mta, ["sendmail", "-i", "big@example.net"], data)
    assert code == 0, stderr
    # Held whole, the message and its CRLF copy took about 70 MiB; streamed, a few MiB above Python's own.
    assert peak < 60, f"sendmail's peak RSS was {peak:.0f} MiB for a 30 MB message"
    stored = mta.message(mta.only_entry())
    assert stored == b"Subject: 30 MB\r\n\r\n" + BODY.replace(b"\n", b"\r\n") + b"\r\n"  # Bcc gone


def test_a_streamed_message_over_the_size_limit_leaves_nothing(mta: MtaEnv) -> None:
    mta.write_config("deliver: queue\nmax_message_size: 3M\n")
    # Within the limit as read, over it once its 50,000 line ends are CRLF: refused while it streams.
    data = b"Subject: big\n\n" + b"x" * 58 + b"\n" + (b"y" * 59 + b"\n") * 49_998
    assert len(data) < 3_000_000 < len(data) + 50_000
    code, stderr, _ = peak_rss(mta, ["sendmail", "-i", "big@example.net"], data)
    assert code == 65, stderr
    assert b"message too large: more than 3000000 bytes" in stderr
    assert mta.entries() == [] and os.listdir(mta.spool / "tmp") == []
    code, stderr, _ = peak_rss(mta, ["sendmail", "-i", "big@example.net"], data * 2)  # over it as read
    assert code == 65 and b"message too large" in stderr, stderr
    assert mta.entries() == [] and os.listdir(mta.spool / "tmp") == []


def test_a_30_mb_message_for_a_local_mailbox_is_written_without_holding_it(mta: MtaEnv) -> None:
    """The mbox gets the message read from the queue file block by block (LF line ends, `>From ` quoting
    at every line start, block edges or not); neither the flush nor its delivery child holds it whole."""
    text = b"From the start of a line\n" + BODY[:15_000_000] + b"\nFrom here\nend\n"
    mta.write_config("domain: example.org\nhostname: mx.example.org\ndeliver: queue\n")
    submitted = mta.sendmail("-i", "root", input=b"Subject: 30 MB\n\n" + text)
    assert submitted.returncode == 0, submitted.stderr
    submitted = mta.sendmail("-i", "root", input=b"Subject: 15 MB\n\n" + text)  # twice: over 30 MB queued
    assert submitted.returncode == 0, submitted.stderr
    peak = flush_peak_mib(mta)
    assert mta.entries() == []
    [mbox] = list((mta.root / "mail").iterdir())
    data = mbox.read_bytes()
    quoted = text.replace(b"\nFrom ", b"\n>From ")
    expected_body = b">" + quoted if quoted.startswith(b"From ") else quoted
    messages = data.split(b"\n\nFrom ")
    assert len(messages) == 2
    for message in messages:  # each ends with its blank line; the split took the first one's
        body = message.partition(b"\n\n")[2].rstrip(b"\n")
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected_body.rstrip(b"\n")).hexdigest()
    assert peak < 60, f"pymta flush peaked at {peak:.0f} MiB writing 2 x 15 MB into an mbox: held whole"
