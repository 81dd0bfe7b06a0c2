"""Lines of at most 998 octets for SMTP (RFC 5321 4.5.3.1.6): a message with longer ones is refused by
servers that defend against SMTP smuggling, and cron output has them. `fit_line_length` folds, encodes
or breaks them, keeping every byte that quoted-printable can keep. Runs at delivery only.
"""

from pymta.mail.message import CRLF, MAX_LINE, get_header, header_block

# MIME parts nested deeper than this are not parsed when lines are fitted for SMTP: what lies below is
# treated as opaque text (its long lines broken as Postfix does). Real mail nests a few levels (a forward
# of a forward with attachments); each level costs a pass over what it holds and a few stack frames, and
# a message nested 400 deep hit Python's recursion limit and stopped every flush.
MAX_PART_DEPTH = 50
# And a part is parsed only while its depth times its size stays under this many octets: each level costs a
# few passes over all it holds, and a 30 MB message nested 50 deep took 40 s at every delivery attempt.
# A 1 MB message is still parsed 50 levels deep, one of 35 MB (max_message_size) 2 levels.
MAX_PART_WORK = 100_000_000

# Bodies that quoted-printable can carry as they are: one text part in no encoding of its own.
_PLAIN_ENCODINGS = ("", "7bit", "8bit", "binary")


# A larger text is looked at in slices of this size: a list of all the lines of a 30 MB message would cost
# 45 MB more for a moment.
LINE_SCAN = 1 << 20


def _long_lines(data: bytes) -> bool:
    """Whether a line of `data` (CRLF-separated) is over MAX_LINE octets: a split and a max, in C (a regex
    search would retry at every byte, which on a 1 MB message takes seconds), slice by slice. The slices
    overlap by more than a line's limit, and none ends inside a CRLF, so each piece is part of one line
    and every long line is seen whole in the slice where it starts."""
    if len(data) <= LINE_SCAN:
        return max(map(len, data.split(CRLF))) > MAX_LINE
    for start in range(0, len(data), LINE_SCAN):
        end = min(start + LINE_SCAN + MAX_LINE + 3, len(data))
        begin = start + 1 if start and data[start - 1 : start + 1] == CRLF else start
        stop = end - 1 if data[end - 1 : end + 1] == CRLF else end
        if max(map(len, data[begin:stop].split(CRLF))) > MAX_LINE:
            return True
    return False


def _break_line(line: bytes, *, fold: bool = False, soft: bool = False) -> bytes:
    """A line (no CRLF) over MAX_LINE cut into lines that fit. With `fold` (a header field) it is cut before
    a blank where it has one, so unfolding restores it exactly. With `soft` (a quoted-printable body) each
    cut ends in a soft line break `=` (RFC 2045 6.7), never inside an =XX escape, so decoding restores it.
    Elsewhere, and in a field without blanks, a space starts each later piece (as Postfix's
    smtp_line_length_limit does); such a cut never splits a UTF-8 character.

    Each cut looks only at the next MAX_LINE + 1 octets (`head`), so the work is linear in the line: taking
    the rest of the line again after each cut copied it, and a 30 MB line took minutes."""
    pieces = []
    lead = b""  # the space that starts the rest after a cut without a blank
    start = 0  # where the rest of `line` begins: what is left to cut is `lead + line[start:]`
    while len(lead) + len(line) - start > MAX_LINE:
        head = lead + line[start : start + MAX_LINE + 1 - len(lead)]
        cut = max(head.rfind(b" ", 1, MAX_LINE), head.rfind(b"\t", 1, MAX_LINE)) if fold else -1
        if cut > 0:
            pieces.append(head[:cut])
            after = b""
        elif soft:
            cut = MAX_LINE - 1
            cut -= 2 if head[cut - 2 : cut - 1] == b"=" else 1 if head[cut - 1 : cut] == b"=" else 0
            pieces.append(head[:cut] + b"=")
            after = b""
        else:
            cut = MAX_LINE - 1
            while cut > MAX_LINE - 4 and 0x80 <= head[cut] < 0xC0:  # a UTF-8 continuation byte: back off
                cut -= 1
            pieces.append(head[:cut])
            after = b" "
        start += cut - len(lead)
        lead = after
    pieces.append(lead + line[start:])
    return CRLF.join(pieces)


def _break_lines(text: bytes, *, fold: bool = False, soft: bool = False) -> bytes:
    return CRLF.join(
        _break_line(line, fold=fold, soft=soft) if len(line) > MAX_LINE else line for line in text.split(CRLF)
    )


def fit_line_length(message: bytes, *, part: bool = False, depth: int = 0) -> bytes:
    """`message` (CRLF) with no line over 998 octets, as SMTP requires; the same object when it has none.

    Too long a header line is folded at a blank. The body of a single text part (no Content-Type, or text/*,
    in no transfer encoding) is encoded quoted-printable (RFC 2045 6.7), which keeps every byte: the
    recipient reads exactly what was submitted; MIME-Version is added when missing (not to a `part` of a
    multipart), and a Content-Type naming UTF-8 when there is none and the body is UTF-8 beyond ASCII. A
    single part in quoted-printable already gets soft line breaks, which decoding removes. A multipart body
    has each of its parts fitted the same way, the rest left byte for byte. What is left (base64, a
    preamble, a multipart without a boundary) has each long line broken with a space inserted, as Postfix
    does: that changes its text, which is why it comes last. So does a multipart nested more than
    MAX_PART_DEPTH deep (`depth` counts the levels above `message`), or so deep for its size that parsing
    it would cost more than MAX_PART_WORK: it is not parsed, but fitted as opaque text.
    """
    if len(message) <= MAX_LINE or not _long_lines(message):
        return message
    block = header_block(message)
    head, rest = message[: block.end], message[block.end :]
    separator = CRLF if rest.startswith(CRLF) or block.separator_missing or not block.fields else b""
    body = rest[2:] if rest.startswith(CRLF) else rest
    head = _break_lines(head[:-2], fold=True) + CRLF if _long_lines(head) else head
    if not _long_lines(body):
        return head + separator + body
    raw_type = get_header(message, "content-type") or "text/plain"
    content_type = raw_type.strip().lower()
    encoding = (get_header(message, "content-transfer-encoding") or "").strip().lower()
    if content_type.startswith("multipart/") and depth < MAX_PART_DEPTH and depth * len(body) < MAX_PART_WORK:
        fitted = _fit_parts(raw_type, body, depth + 1)
        if fitted is not None:
            return head + separator + fitted
    single = not content_type.startswith(("multipart/", "message/"))
    if single and encoding == "quoted-printable":
        return head + separator + _break_lines(body, soft=True)
    if not content_type.startswith("text/") or encoding not in _PLAIN_ENCODINGS:
        return head + separator + _break_lines(body)
    import binascii

    if not body.endswith(CRLF):
        body += CRLF  # b2a_qp ends its soft breaks as the first line ends: it must be CRLF, never bare LF

    fields = [
        field for name, field in header_block(head).fields if name.lower() != "content-transfer-encoding"
    ]
    names = {name.lower() for name, _ in block.fields}
    added = [b"Content-Transfer-Encoding: quoted-printable\r\n"]
    if "mime-version" not in names and not part:
        added.insert(0, b"MIME-Version: 1.0\r\n")
    if "content-type" not in names and not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            added.insert(1, b"Content-Type: text/plain; charset=utf-8\r\n")
    encoded = binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)
    return b"".join((*fields, *added, CRLF, encoded))


def _fit_parts(content_type: str, body: bytes, depth: int) -> bytes | None:
    """A multipart `body` with each part fitted (`fit_line_length`, the parts `depth` levels deep), its
    boundaries, preamble and epilogue kept; None when the Content-Type names no boundary."""
    from email.message import Message

    holder = Message()
    holder["Content-Type"] = content_type
    boundary = holder.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return None
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    out: list[bytes] = []
    part: list[bytes] | None = None  # the lines of the part being read; None in the preamble and epilogue
    for line in body.split(CRLF):
        bare = line.rstrip(b" \t")  # transport padding after a delimiter (RFC 2046 5.1.1)
        if bare in (delimiter, delimiter + b"--"):
            if part is not None:
                out.extend(_fit_part(part, depth))
            out.append(line)
            part = [] if bare == delimiter else None
        elif part is not None:
            part.append(line)
        else:
            out.append(line)
    if part is not None:  # a part the sender never closed
        out.extend(_fit_part(part, depth))
    joined = CRLF.join(out)
    return _break_lines(joined) if _long_lines(joined) else joined


def _fit_part(lines: list[bytes], depth: int) -> list[bytes]:
    """The lines of one MIME part `depth` levels deep (its header and body; the CRLF before the next
    delimiter is not its own) with none over 998 octets."""
    text = CRLF.join(lines) + CRLF
    fitted = fit_line_length(text, part=True, depth=depth)
    return (fitted[:-2] if fitted.endswith(CRLF) else fitted).split(CRLF)
