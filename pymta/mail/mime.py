"""The 7-bit clean pieces a notification is made of (`pymta.mail.dsn`): a body part, a text part in us-ascii
or quoted-printable, header fields folded to a line width, and text made safe for a one-line ASCII field.

Whatever goes in, what comes out is ASCII with CRLF line endings and no line over 998 bytes.
"""

from __future__ import annotations

import textwrap

from pymta.mail.message import CRLF, MAX_LINE

# A delivery-status field value is cut here: it must fit a line (998 bytes) after folding; the text part
# carries the reply in full.
MAX_FIELD_VALUE = 900
# Soft limit of a folded field line and of the wrapped text (RFC 5322 2.1.1 asks for 78).
LINE_WIDTH = 78


def body_part(headers: list[tuple[str, str]], body: bytes) -> bytes:
    """One body part: its header, an empty line, its body ending in CRLF."""
    if body and not body.endswith(CRLF):
        body += CRLF
    return header_bytes(headers) + CRLF + body


def text_part(text: str) -> bytes:
    """The notification text as a text/plain part: us-ascii as is, else UTF-8 in quoted-printable."""
    data = text.replace("\n", "\r\n").encode("utf-8")
    headers = [("Content-Description", "Notification")]
    if text.isascii() and all(len(line) <= MAX_LINE for line in data.split(CRLF)):
        headers += [("Content-Type", "text/plain; charset=us-ascii"), ("Content-Transfer-Encoding", "7bit")]
        return body_part(headers, data)
    headers += [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", "quoted-printable"),
    ]
    return body_part(headers, quoted_printable(data))


def header_bytes(fields: list[tuple[str, str]]) -> bytes:
    """Header fields (ASCII values) folded at spaces to about LINE_WIDTH, each line ending in CRLF."""
    lines = []
    for name, value in fields:
        line = f"{name}:"
        for word in value.split(" "):
            if len(line) + 1 + len(word) > LINE_WIDTH and line.strip() != f"{name}:":
                lines.append(line)
                line = " " + word
            else:
                line += " " + word
        lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def seven_bit_clean(data: bytes) -> bool:
    """ASCII without NUL, bare CR or LF, and no line longer than MAX_LINE: may go as 7bit."""
    if not data.isascii() or b"\0" in data:
        return False
    lines = data.split(CRLF)
    return all(b"\r" not in line and b"\n" not in line and len(line) <= MAX_LINE for line in lines)


def quoted_printable(data: bytes) -> bytes:
    """`data` (lines ending in CRLF) in quoted-printable (RFC 2045 6.7): every byte recoverable, lines at
    most 76 characters. Only CRLF is a line break; a lone CR or LF is encoded."""
    out: list[str] = []
    lines = data.split(CRLF)
    for line in lines:
        last = len(line) - 1
        current = ""
        for index, byte in enumerate(line):
            if (33 <= byte <= 126 and byte != ord("=")) or (byte in (9, 32) and index < last):
                token = chr(byte)
            else:
                token = f"={byte:02X}"
            if len(current) + len(token) > 75:
                out.append(current + "=")
                current = ""
            current += token
        out.append(current)
    return "\r\n".join(out).encode("ascii")


def clean_text(text: str) -> str:
    """`text` as proper Unicode: bytes that were not UTF-8 (surrogateescape) and lone surrogates become
    U+FFFD."""
    return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)


def readable(text: str | None) -> str:
    """`text` for the human-readable part: one line, control characters as spaces, bad bytes as U+FFFD."""
    cleaned = clean_text(text or "")
    return "".join(" " if ord(char) < 32 or 127 <= ord(char) < 160 else char for char in cleaned).strip()


def ascii_field(text: str) -> str:
    """`text` for a delivery-status field: printable ASCII on one line; other characters as RFC 6533
    `\\x{HEX}` escapes (a backslash too, so the escapes stay unambiguous); controls as spaces; cut at
    MAX_FIELD_VALUE."""
    out = []
    for char in clean_text(text):
        code = ord(char)
        if char == "\\":
            out.append("\\x{5C}")
        elif 32 <= code < 127:
            out.append(char)
        elif code < 32 or code == 127 or 128 <= code < 160:
            out.append(" ")
        else:
            out.append(f"\\x{{{code:X}}}")
    value = " ".join("".join(out).split())
    return value if len(value) <= MAX_FIELD_VALUE else value[:MAX_FIELD_VALUE] + "..."


def ascii_token(text: str) -> str:
    """`text` with everything but printable ASCII other than <>@ and space dropped: fit for a msg-id."""
    return "".join(char for char in text if 33 <= ord(char) < 127 and char not in '<>@\\"') or "unknown"


def wrap(paragraph: str) -> str:
    return "\n".join(textwrap.wrap(paragraph, LINE_WIDTH, break_on_hyphens=False))
