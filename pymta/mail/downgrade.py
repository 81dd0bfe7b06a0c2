"""An 8-bit message made 7-bit for a server that cannot take it: bytes in, bytes out.

RFC 6152 lets a client send 8-bit text only to a server that offers 8BITMIME, and RFC 6532 raw UTF-8 in
header fields only with SMTPUTF8. Without them pymta converts, as Postfix does, rather than sending what
the server did not agree to take:
- the body (`body=True`): each MIME part whose content holds 8-bit bytes, in the 7bit, 8bit or binary
  encoding, is encoded again: quoted-printable for text (and for a message without MIME header fields,
  which is text/plain: its MIME-Version and Content-Type are added, charset utf-8 when the bytes are
  UTF-8), base64 for any other type. Multiparts are walked part by part, message/rfc822 into the enclosed
  message; a part already in base64 or quoted-printable is left as it is.
- the header fields (`headers=True`): a field holding 8-bit bytes gets RFC 2047 encoded words for its
  non-ASCII words and quoted display names, and its address domains as A-labels (a non-ASCII local part
  cannot be expressed and stays); a Content-* field's parameters (a file name) go as RFC 2231 writes them.
  The header fields of the parts of a converted body are converted with it: they are body too.
Multiparts are parsed as deep and as much as `linefit.fit_line_length` parses them (MAX_PART_DEPTH,
MAX_PART_WORK); below that a part goes as it is.

Main invariant: only what must change changes. A message that needs no conversion is returned as the same
object, and every part, line and header field without 8-bit bytes keeps its bytes. A conversion breaks a
DKIM signature over the body or the converted fields; nothing can prevent that but a server with 8BITMIME.
The input has CRLF line endings (as at delivery) and is not dot-stuffed.
"""

from __future__ import annotations

import base64
import binascii
import re

from pymta.mail.idn import wire_address
from pymta.mail.linefit import MAX_PART_DEPTH, MAX_PART_WORK
from pymta.mail.message import header_fields

_CRLF = b"\r\n"
# RFC 2047 2: an encoded word is at most 75 characters; 45 bytes of text make 60 of base64, with
# "=?utf-8?b?" and "?=" 72.
_WORD_BYTES = 45
_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)
_PARAM_RE = re.compile(rb';\s*([!#-\'*+.0-9A-Z^-~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)', re.ASCII)
# A header value's pieces: quoted strings, angle addresses, bare addresses, other words, and the rest
# (white space, commas, specials) as separators.
_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|<[^<>]*>|[^\s"<>,;()]+@[^\s"<>,;()]+|[^\s"<>,;()]+|\s+|.', re.S)
_MIME_PARAM_RE = re.compile(r'([!#-\'*+.0-9A-Z^-~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]+)', re.ASCII)
_ADDRESS_FIELDS = frozenset(
    {b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc", b"resent-from", b"resent-sender", b"resent-to",
     b"resent-cc", b"resent-bcc", b"return-path", b"disposition-notification-to"}
)  # fmt: skip
_UNENCODED = (None, b"7bit", b"8bit", b"binary")


def downgrade(message: bytes, *, body: bool, headers: bool) -> bytes:
    """`message` for a server without 8BITMIME (`body`) and/or without SMTPUTF8 (`headers`); the same
    object when nothing in it needs that."""
    if message.isascii() or not (body or headers):
        return message
    if not body and message.partition(b"\r\n\r\n")[0].isascii():
        return message
    converted = _entity(message, body=body, headers=headers, top=True)
    return message if converted == message else converted


def _entity(
    data: bytes,
    *,
    body: bool,
    headers: bool,
    top: bool = False,
    default: bytes = b"text/plain",
    depth: int = 0,
) -> bytes:
    """One MIME entity (a message or a part, `depth` levels deep): its header fields, then its content,
    each converted only where it holds 8-bit bytes."""
    if data.isascii():
        return data
    fields, separator, content = _split(data)
    kind, params = _content_type(fields, default)
    encoding = _field_value(fields, b"content-transfer-encoding")
    cte = encoding.strip().lower() if encoding is not None else None
    changes: dict[bytes, bytes] = {}
    additions: list[bytes] = []
    if body and not content.isascii():
        if kind.startswith(b"multipart/") or kind == b"message/rfc822":
            # As deep and as much as `fit_line_length` parses; below that a part goes as it is.
            if depth < MAX_PART_DEPTH and depth * len(content) < MAX_PART_WORK:
                if kind == b"message/rfc822":
                    content = _entity(content, body=True, headers=True, depth=depth + 1)
                elif params.get(b"boundary"):
                    content = _multipart(content, params[b"boundary"], depth + 1)
            if content.isascii() and cte in (b"8bit", b"binary"):
                changes[b"content-transfer-encoding"] = b"7bit"
        elif cte in _UNENCODED:
            if kind.startswith(b"text/"):
                content, name = _quoted_printable(content), b"quoted-printable"
            else:
                content, name = _base64(content), b"base64"
            if top and not content.endswith(_CRLF):
                content += _CRLF
            if encoding is None:
                additions.append(b"Content-Transfer-Encoding: " + name + _CRLF)
            else:
                changes[b"content-transfer-encoding"] = name
            if top and _field_value(fields, b"content-type") is None:
                charset = b"utf-8" if _is_utf8(data) else b"unknown-8bit"  # RFC 1428
                additions.insert(0, b"Content-Type: text/plain; charset=" + charset + _CRLF)
            if top and _field_value(fields, b"mime-version") is None:
                additions.insert(0, b"MIME-Version: 1.0" + _CRLF)
    out = []
    for field in fields:
        name = _name(field)
        if name in changes:
            field = field[: field.index(b":") + 1] + b" " + changes[name] + _CRLF
        elif headers and not field.isascii():
            field = _encode_field(field, name)
        out.append(field)
    if additions and not separator:  # bare text got header fields: a blank line now ends them
        separator = _CRLF
    return b"".join(out) + b"".join(additions) + separator + content


def _split(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """The header fields (each with its continuation lines and CRLF; none when the text starts with no
    field, `message.header_fields`), the blank line after them, the content."""
    fields = [field for _, field in header_fields(data)]
    rest = data[sum(len(field) for field in fields) :]
    if rest.startswith(_CRLF):
        return fields, _CRLF, rest[2:]
    return fields, b"", rest


def _name(field: bytes) -> bytes:
    found = _FIELD_RE.match(field)
    return found.group(1).lower() if found else b""


def _field_value(fields: list[bytes], name: bytes) -> bytes | None:
    for field in fields:
        if _name(field) == name:
            return field.split(b":", 1)[1].replace(_CRLF, b"").strip()
    return None


def _content_type(fields: list[bytes], default: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    value = _field_value(fields, b"content-type")
    if value is None:
        return default, {}
    kind = value.split(b";", 1)[0].strip().lower()
    params = {}
    for key, raw in _PARAM_RE.findall(value):
        params[key.lower()] = raw[1:-1].replace(b"\\", b"") if raw.startswith(b'"') else raw
    return kind or default, params


def _multipart(content: bytes, boundary: bytes, depth: int) -> bytes:
    """The parts between the boundary lines converted one by one (their header fields are body too: they
    go 7-bit as well); the preamble, the boundary lines and the epilogue as they are."""
    delimiter = b"--" + boundary
    lines = content.split(_CRLF)
    out: list[bytes] = []
    part: list[bytes] | None = None  # None: in the preamble or the epilogue
    for line in lines:
        stripped = line.rstrip(b" \t")
        if stripped in (delimiter, delimiter + b"--"):
            if part is not None:
                out.append(_part(part, depth=depth))
            out.append(line)
            part = [] if stripped == delimiter else None
        elif part is not None:
            part.append(line)
        else:
            out.append(line)
    if part is not None:  # no closing delimiter: the rest is the last part
        out.append(_part(part, depth=depth))
    return _CRLF.join(out)


def _part(lines: list[bytes], *, depth: int) -> bytes:
    """A body part; the CRLF before the next delimiter belongs to the delimiter (RFC 2046 5.1.1)."""
    data = _CRLF.join(lines)
    if data.isascii():
        return data
    return _entity(data, body=True, headers=True, depth=depth)


def _quoted_printable(content: bytes) -> bytes:
    lines = content.split(_CRLF)
    ending = lines[-1] == b""
    encoded = [
        binascii.b2a_qp(line, quotetabs=False, istext=False, header=False)
        for line in (lines[:-1] if ending else lines)
    ]
    # b2a_qp breaks long lines with soft breaks (=\n); SMTP wants CRLF, and a line-initial dot is fine
    # (dot-stuffing is done when the text is sent).
    text = _CRLF.join(line.replace(b"=\n", b"=\r\n") for line in encoded)
    return text + (_CRLF if ending else b"")


def _base64(content: bytes) -> bytes:
    """Lines of 76 characters; no CRLF after the last one (a part's last CRLF is its delimiter's)."""
    return base64.encodebytes(content).rstrip(b"\n").replace(b"\n", _CRLF)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- header fields (RFC 2047) ---


def _encode_field(field: bytes, name: bytes) -> bytes:
    """A header field with 8-bit bytes as 7-bit: encoded words, A-label domains; folded."""
    label, _, value = field.partition(b":")
    text = value.replace(_CRLF, b"").decode("utf-8", "surrogateescape").strip()
    if name.startswith(b"content-"):  # MIME parameters (a file name): RFC 2231, not encoded words
        return label + b":" + _fold(re.split(r"(\s+)", _MIME_PARAM_RE.sub(_rfc2231, text)), len(label) + 1)
    addresses = name in _ADDRESS_FIELDS
    # In an unstructured field an encoded word must stand between white space (RFC 2047 5): words there
    # are what lies between white space.
    tokens = _TOKEN_RE.findall(text) if addresses else re.findall(r"\s+|\S+", text)
    pieces: list[str] = []
    run: list[str] = []  # non-ASCII words and the white space between them: one encoded text

    def close_run() -> None:
        if not run:
            return
        trailing = []
        while run and run[-1].isspace():
            trailing.append(run.pop())
        pieces.extend(_encoded_words("".join(run)))
        pieces.extend(reversed(trailing))
        run.clear()

    for token in tokens:
        if token.isascii():
            if token.isspace() and run:
                run.append(token)
                continue
            close_run()
            pieces.append(token)
        elif token.startswith("<") or (addresses and "@" in token and not token.startswith('"')):
            close_run()
            inner = token[1:-1] if token.startswith("<") else token
            converted = wire_address(inner)
            pieces.append(f"<{converted}>" if token.startswith("<") else converted)
        elif token.startswith('"'):
            close_run()
            pieces.extend(_encoded_words(re.sub(r"\\(.)", r"\1", token[1:-1])))
        else:
            run.append(token)
    close_run()
    return label + b":" + _fold(pieces, len(label) + 1)


def _rfc2231(found: re.Match[str]) -> str:
    """A parameter with a non-ASCII value as RFC 2231 writes it: name*=utf-8''percent-encoded."""
    key, raw = found.group(1), found.group(2)
    if raw.isascii():
        return found.group(0)
    value = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
    data = value.encode("utf-8", "surrogateescape")
    return f"{key}*=utf-8''" + "".join(
        chr(byte) if chr(byte).isalnum() and byte < 128 or chr(byte) in "-._~" else f"%{byte:02X}"
        for byte in data
    )


def _encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 encoded words (utf-8, base64) of at most 75 characters, split between
    characters; white space between encoded words is not shown, so splitting loses nothing."""
    words: list[str] = []
    chunk = b""
    for char in text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"):
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(_word(chunk))
            chunk = b""
        chunk += encoded
    if chunk:
        words.append(_word(chunk))
    return [word for pair in zip(words, [" "] * len(words), strict=True) for word in pair][:-1]


def _word(data: bytes) -> str:
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="


def _fold(pieces: list[str], used: int) -> bytes:
    """The value's pieces on lines of at most 78 characters where white space allows (RFC 5322 2.2.3)."""
    line_length = used
    out = ""
    pending_space = " "
    for piece in pieces:
        if piece.isspace():
            pending_space = pending_space or piece
            continue
        if out and line_length + len(pending_space) + len(piece) > 78 and pending_space:
            out += "\r\n "
            line_length = 1
        elif pending_space:
            out += pending_space
            line_length += len(pending_space)
        out += piece
        line_length += len(piece)
        pending_space = ""
    # What cannot be expressed (a non-ASCII local part) stays as it came, UTF-8 or the original bytes.
    return (out + "\r\n").encode("utf-8", "surrogateescape")
