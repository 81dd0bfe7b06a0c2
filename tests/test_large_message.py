"""A 30 MB message through the real `sendmail` and `pymta flush` to aiosmtpd on loopback, byte for byte: the
paths that avoid copies of a large text (the queue file read in two parts, the text written on its own
after DATA) change nothing in what arrives. Its peak memory is a bench figure (bench/compare.py, "30 MB").
"""

from __future__ import annotations

import json

from conftest import MtaEnv
from mailservers import Handler, SmtpServer

LINE = b"a line of a large attachment, as base64 would send it: 76 characters wide....\n"
# Every 1000th line starts with a dot (dot-stuffed on the wire), and the text ends without a line end.
BODY = b"".join((b"." + LINE if number % 1000 == 0 else LINE) for number in range(390_000)) + b"no newline"


def test_a_30_mb_message_arrives_byte_for_byte(mta: MtaEnv) -> None:
    assert len(BODY) > 30_000_000
    handler = Handler()
    with SmtpServer("plain", handler=handler) as server:
        mta.write_config(
            "domain: example.org\nhostname: mx.example.org\ndeliver: queue\n"
            f"smarthosts: {json.dumps([{'host': '127.0.0.1', 'port': server.port, 'security': 'none'}])}\n"
        )
        submitted = mta.sendmail("-i", "big@example.net", input=b"Subject: 30 MB\n\n" + BODY)
        assert submitted.returncode == 0, submitted.stderr
        flushed = mta.run("pymta", ["flush", "-v"], timeout=120)
        assert flushed.returncode == 0, flushed.stderr
    [received] = handler.messages
    assert received.rcpt_tos == ["big@example.net"]
    header, _, body = received.data.partition(b"\r\n\r\n")
    assert b"Subject: 30 MB" in header
    assert body == BODY.replace(b"\n", b"\r\n") + b"\r\n"  # the wire's line ends; the last line ended
    assert mta.entries() == []
